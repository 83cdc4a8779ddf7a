"""Every non-Python client's own test suite and README example, against a live quotad.

Each suite does reserve -> commit, a denial, an INVALID_ARGUMENT with its field
violations, and replays tests/conformance/scenario.json (the Java suite also runs its
README example). Their runners' output is shown when one fails.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.clients.conftest import MAVEN_REPO, ROOT, LiveQuotad, run

CLIENTS = ROOT / "clients"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not on PATH: the {name} client's tests need it (see the README)")
    return found


def maven(*goals: str) -> list[str]:
    return [tool("mvn"), "-B", "-q", f"-Dmaven.repo.local={MAVEN_REPO}", *goals]


def test_go_client(conformance_quotad: LiveQuotad) -> None:
    output = run([tool("go"), "test", "-count=1", "-v", "./..."], CLIENTS / "go", conformance_quotad.env)
    for name in ("TestReserveThenCommit", "TestDenialIsAValue", "TestInvalidArgument", "TestConformance"):
        assert f"--- PASS: {name}" in output, output


def test_typescript_client(conformance_quotad: LiveQuotad) -> None:
    output = run([tool("npm"), "test"], CLIENTS / "typescript", conformance_quotad.env)
    assert re.search(r"\bpass [1-9]", output), output
    assert re.search(r"\bfail 0\b", output), output


def test_java_client(conformance_quotad: LiveQuotad) -> None:
    surefire_reports = CLIENTS / "java" / "target" / "surefire-reports"
    shutil.rmtree(surefire_reports, ignore_errors=True)
    output = run(maven("test"), CLIENTS / "java", conformance_quotad.env)
    reports = sorted(surefire_reports.glob("TEST-*.xml"))
    assert reports, f"surefire ran no test class:\n{output}"
    for report in reports:
        header = report.read_text().split(">", 2)[1]
        assert 'failures="0"' in header, report.read_text()
        assert 'errors="0"' in header, report.read_text()
        assert 'skipped="0"' in header, report.read_text()
        assert not re.search(r'tests="0"', header), f"{report.name} ran no test"


def python_readme_example() -> str:
    readme = (CLIENTS / "python" / "README.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    return blocks[0]


EXAMPLE_OUTPUT = re.compile(r"^requests-per-minute: 9 of 10 left$", re.MULTILINE)


def test_python_readme_example_runs(example_quotad: LiveQuotad, tmp_path: Path) -> None:
    example_quotad.flush()
    script = tmp_path / "example.py"
    script.write_text(python_readme_example())
    output = run([sys.executable, str(script)], tmp_path, example_quotad.env, 60)
    assert EXAMPLE_OUTPUT.search(output), output
    assert "tokens-per-minute: 603 of 1000 left" in output, output  # 300 in + 97 out committed


def test_go_example_runs(example_quotad: LiveQuotad) -> None:
    example_quotad.flush()
    output = run([tool("go"), "run", "./example"], CLIENTS / "go", example_quotad.env, 300)
    assert EXAMPLE_OUTPUT.search(output), output


def test_typescript_example_runs(example_quotad: LiveQuotad) -> None:
    example_quotad.flush()
    output = run([tool("npm"), "run", "--silent", "example"], CLIENTS / "typescript", example_quotad.env)
    assert EXAMPLE_OUTPUT.search(output), output
