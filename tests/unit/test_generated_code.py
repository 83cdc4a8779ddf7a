"""The committed stubs are exactly what the pinned generator makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "clients" / "python" / "quotad" / "v1"


def test_generated_python_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_text() for p in (tmp_path / "quotad" / "v1").iterdir() if p.is_file()}
    committed = {
        p.name: p.read_text() for p in GENERATED.iterdir() if p.is_file() and p.name != "__init__.py"
    }
    assert sorted(fresh) == sorted(committed), "generated files differ: run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is out of date with proto/: run `make proto`"
