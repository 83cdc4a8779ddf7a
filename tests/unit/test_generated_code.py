"""The committed stubs of every language are exactly what `buf generate` makes from proto/.

buf.gen.yaml runs pinned local plugins (`make tools`); the test regenerates into a
temporary directory and compares each generated directory file by file, so a changed,
missing or stale file fails with the command that fixes it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".venv" / "bin" / "buf"
# Every directory buf.gen.yaml writes to, and the hand-written files that live there.
GENERATED = {
    "clients/python/quotad/v1": {"__init__.py"},
    "clients/go/gen": set(),
    "clients/typescript/src/gen": set(),
    "clients/java/src/main/java/io/github/quotad/v1": set(),
}
PLUGINS = [
    ".tools/bin/protoc-gen-go",
    ".tools/bin/protoc-gen-go-grpc",
    ".tools/bin/protoc",
    ".tools/bin/protoc-gen-grpc-java",
    "clients/typescript/node_modules/.bin/protoc-gen-ts_proto",
]


def files_under(directory: Path, hand_written: set[str]) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): path.read_text()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in hand_written and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [plugin for plugin in PLUGINS if not (ROOT / plugin).exists()]
    if missing:
        pytest.fail(f"protoc plugins missing ({', '.join(missing)}): run `make tools`")
    out = tmp_path_factory.mktemp("buf-generate")
    result = subprocess.run(
        [str(BUF), "generate", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("directory", sorted(GENERATED))
def test_committed_stubs_match_the_proto(regenerated: Path, directory: str) -> None:
    fresh = files_under(regenerated / directory, GENERATED[directory])
    committed = files_under(ROOT / directory, GENERATED[directory])
    assert fresh, f"buf generate wrote nothing into {directory}"
    assert sorted(committed) == sorted(fresh), f"{directory}: generated files differ, run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{directory}/{name} is out of date with proto/: run `make proto`"


def test_every_generated_directory_is_checked(regenerated: Path) -> None:
    written = {path.parent for path in regenerated.rglob("*") if path.is_file()}
    unchecked = [
        str(path.relative_to(regenerated))
        for path in written
        if not any(path.is_relative_to(regenerated / directory) for directory in GENERATED)
    ]
    assert not unchecked, f"buf.gen.yaml writes to directories this test does not compare: {unchecked}"
