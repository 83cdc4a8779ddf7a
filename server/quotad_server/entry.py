"""The `quotad` command: `quotad health` imports only what a probe needs; the rest is cli.py."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["health"]:
        import argparse  # noqa: PLC0415  (lazily: a probe runs every few seconds)
        import os  # noqa: PLC0415

        from quotad_server.probe import health  # noqa: PLC0415

        parser = argparse.ArgumentParser(prog="quotad health")
        parser.add_argument("--service", default="")
        parser.add_argument("--timeout", type=float, default=2.0)
        args = parser.parse_args(sys.argv[2:])
        return health(os.environ, args.service, args.timeout)
    from quotad_server.cli import main as cli  # noqa: PLC0415

    return cli()
