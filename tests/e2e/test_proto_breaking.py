"""scripts/proto_breaking.sh (`make proto-breaking`) in throwaway git repositories.

It must fail on a breaking change, fail (not skip) when a shallow clone hides the
previous commit, and pass only when there truly is no earlier contract.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".venv" / "bin" / "buf"
PROTO = "proto/quotad/v1/quota.proto"


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/proto_breaking.sh"],
        cwd=repo,
        env={"PATH": "/usr/bin:/bin", "BUF": str(BUF)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose first commit holds today's proto/ and the script."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", repo / "proto")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "proto_breaking.sh", repo / "scripts")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "contract")
    return repo


def test_first_commit_has_nothing_to_break(repo: Path) -> None:
    result = check(repo)
    assert result.returncode == 0, result.stderr
    assert "first commit" in result.stdout


def test_compatible_change_passes(repo: Path) -> None:
    proto = repo / PROTO
    # A new message is a compatible change whatever the existing messages hold.
    proto.write_text(
        proto.read_text() + "\n// Extra is new.\nmessage Extra {\n  // X is new.\n  int32 x = 1;\n}\n"
    )
    git(repo, "commit", "-q", "-am", "add a message")
    result = check(repo)
    assert result.returncode == 0, result.stderr


def test_breaking_change_fails(repo: Path) -> None:
    proto = repo / PROTO
    proto.write_text(proto.read_text().replace("string binding_limit = 7;", "string binding = 7;"))
    git(repo, "commit", "-q", "-am", "rename a field")
    result = check(repo)
    assert result.returncode != 0
    assert "binding_limit" in result.stdout + result.stderr


def test_shallow_clone_fails_instead_of_skipping(repo: Path, tmp_path: Path) -> None:
    git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    result = check(shallow)
    assert result.returncode == 1
    assert "git fetch --unshallow" in result.stderr
