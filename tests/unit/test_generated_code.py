"""The committed stubs (the Python package's, the Go module's) are exactly what `buf generate` makes.

buf.gen.yaml runs pinned local plugins (`make tools`); the test regenerates into a
temporary directory and compares each generated directory file by file, so a changed,
missing or stale file fails with the command that fixes it. The TypeScript and Java clients
generate their stubs in their own builds; nothing generated for them may be committed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".venv" / "bin" / "buf"
# Every directory buf.gen.yaml writes to, and the hand-written files that live there.
GENERATED = {
    "clients/python/quotad/v1": {"__init__.py"},
    "clients/go/gen": set(),
}
PLUGINS = [".tools/bin/protoc-gen-go", ".tools/bin/protoc-gen-go-grpc"]
PROTO = ROOT / "proto" / "quotad" / "v1" / "quota.proto"


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


def git_files(*paths: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def test_no_typescript_or_java_stub_is_committed() -> None:
    generated = git_files("clients/typescript/src/gen", "clients/java/src/main/java/**/v1/*.java")
    assert not generated, f"generated in the clients' builds, not committed: {generated}"


def test_the_java_package_follows_the_maven_group() -> None:
    """protoc reads java_package from the contract; it is the pom's groupId, as Java spells it."""
    pom = (ROOT / "clients" / "java" / "pom.xml").read_text()
    group = re.search(r"<groupId>(io\.github\.[^<]+)</groupId>", pom)
    assert group, "clients/java/pom.xml has no io.github groupId"
    package = re.search(r'option java_package = "([^"]+)";', PROTO.read_text())
    assert package, f"{PROTO} has no java_package option"
    assert package.group(1) == group.group(1).replace("-", "_") + ".quotad.v1"
    client = ROOT / "clients" / "java" / "src" / "main" / "java" / Path(*package.group(1).split(".")[:-1])
    assert (client / "client" / "QuotaClient.java").is_file(), f"the client is not under {client}"


def test_the_go_module_path_is_the_one_buf_generates_for() -> None:
    module = (ROOT / "clients" / "go" / "go.mod").read_text().splitlines()[0].removeprefix("module ")
    config = (ROOT / "buf.gen.yaml").read_text()
    assert f"value: {module}/gen" in config, f"buf.gen.yaml's go_package_prefix is not under {module}"
