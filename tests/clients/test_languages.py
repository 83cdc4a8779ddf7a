"""Every non-Python client's own test suite and every README example, against a live quotad.

Each suite does reserve -> commit, a denial, an INVALID_ARGUMENT with its field
violations, a reserve that retries through a real Redis outage, reserves that wait in
quotad's line past the client's default deadline (server wait), and replays
tests/conformance/scenario.json (the Java suite also runs its README example). Each also
replays the scenario over mutual TLS, is refused without a client certificate (the handshake
fails: UNAVAILABLE), reserves with a bearer token over TLS and is refused without one
(UNAUTHENTICATED), against the secure quotads of conftest.py. Their runners' output is shown
when one fails.
"""

from __future__ import annotations

import json
import os
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


def test_go_client(clients_env: dict[str, str]) -> None:
    output = run([tool("go"), "test", "-count=1", "-v", "./..."], CLIENTS / "go", clients_env)
    for name in (
        "TestReserveThenCommit",
        "TestDenialIsAValue",
        "TestInvalidArgument",
        "TestConformance",
        "TestConformanceOverMutualTLS",
        "TestMutualTLSWithoutAClientCertificateIsRefused",
        "TestBearerTokenOverTLS",
        "TestWithoutAKnownTokenTheCallIsUnauthenticated",
        "TestTokenIsNotSentOverPlaintextUnlessAllowed",
        "TestReserveRetriesThroughARedisOutage",
        "TestServerWaitIsAdmittedWhenCapacityFrees",
        "TestServerWaitLongerThanTheDefaultDeadlineIsNotCutOff",
        "TestRetriesKeepTheDeadlineOfTimeoutPlusServerWait",
    ):
        assert f"--- PASS: {name}" in output, output


def test_typescript_client(clients_env: dict[str, str]) -> None:
    output = run([tool("npm"), "test"], CLIENTS / "typescript", clients_env)
    assert re.search(r"\bpass [1-9]", output), output
    assert re.search(r"\bfail 0\b", output), output
    for name in (
        "reserve retries through a Redis outage and reserves once",
        "a server wait longer than the default deadline is not cut off by it",
        "conformance scenario over mutual TLS",
        "mutual TLS: without a client certificate the handshake fails",
        "a bearer token over TLS names the caller; asked for before every call",
        "without a known token the call is UNAUTHENTICATED",
    ):
        assert f"✔ {name}" in output, output


def test_java_client(clients_env: dict[str, str]) -> None:
    surefire_reports = CLIENTS / "java" / "target" / "surefire-reports"
    shutil.rmtree(surefire_reports, ignore_errors=True)
    output = run(maven("test"), CLIENTS / "java", clients_env)
    reports = sorted(surefire_reports.glob("TEST-*.xml"))
    assert reports, f"surefire ran no test class:\n{output}"
    assert {report.name for report in reports} >= {
        f"TEST-io.github.quotad_dev.quotad.client.{name}.xml"
        for name in (
            "QuotaClientTest",
            "ConformanceTest",
            "ExampleTest",
            "OutageTest",
            "WaitingTest",
            "TlsTest",
        )
    }, output
    for report in reports:
        assert_passed(report)


def assert_passed(report: Path) -> None:
    """A surefire report whose tests all ran and passed."""
    header = report.read_text().split(">", 2)[1]
    assert 'failures="0"' in header, report.read_text()
    assert 'errors="0"' in header, report.read_text()
    assert 'skipped="0"' in header, report.read_text()
    assert not re.search(r'tests="0"', header), f"{report.name} ran no test"


def python_readme_example() -> str:
    readme = (CLIENTS / "python" / "README.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    return blocks[0]


# The example policy's per-user limits after one run of an example: it reserves 300 + 200 tokens and
# commits 300 + 97. Each run is a new user, so these hold run after run (its tenant and global
# limits, shared by every user, keep going down and are not checked). The token bucket refills one
# token every 60 ms (1000 a minute) between the reserve and the usage read, which on a loaded machine
# shows: 603 up to 649 (3 s). A commit of the estimate instead would show 500.
EXAMPLE_OUTPUT = (
    re.compile(r"^requests-per-minute: 9 of 10 left$", re.MULTILINE),
    re.compile(r"^tokens-per-minute: (?:60[3-9]|6[1-4][0-9]) of 1000 left$", re.MULTILINE),
)


def run_example_twice(command: list[str], cwd: Path, quotad: LiveQuotad, timeout_s: float) -> None:
    """Run an example, then again at once: the second run must not be denied by the first."""
    for attempt in ("first", "second"):
        output = run(command, cwd, quotad.env, timeout_s)
        for expected in EXAMPLE_OUTPUT:
            assert expected.search(output), f"{attempt} run:\n{output}"


def test_python_readme_example_runs(example_quotad: LiveQuotad, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_readme_example())
    run_example_twice([sys.executable, str(script)], tmp_path, example_quotad, 60)


def test_go_example_runs(example_quotad: LiveQuotad) -> None:
    run_example_twice([tool("go"), "run", "./example"], CLIENTS / "go", example_quotad, 300)


def test_typescript_example_runs(example_quotad: LiveQuotad) -> None:
    command = [tool("npm"), "run", "--silent", "example"]
    run_example_twice(command, CLIENTS / "typescript", example_quotad, 300)


def test_java_example_runs(example_quotad: LiveQuotad) -> None:
    """ReserveExample in a fresh JVM, as its README runs it: ExampleTest runs it twice and checks it
    (Maven exits non-zero if it fails); its output is the example's."""
    output = run(maven("test", "-Dtest=ExampleTest"), CLIENTS / "java", example_quotad.env)
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # Maven's colour resets, even in batch mode
    for expected in EXAMPLE_OUTPUT:
        assert len(expected.findall(output)) == 2, output  # once per run


def test_typescript_readme_snippet_compiles(tmp_path: Path) -> None:
    """The first ts block of the TypeScript README, compiled as a user's module importing the package."""
    typescript = CLIENTS / "typescript"
    readme = (typescript / "README.md").read_text()
    blocks: list[str] = re.findall(r"```ts\n(.*?)```", readme, re.DOTALL)
    assert blocks, "the TypeScript README has no ts block"
    (tmp_path / "snippet.ts").write_text(blocks[0])
    config = {
        "compilerOptions": {
            "target": "ES2022",
            "module": "node16",
            "moduleResolution": "node16",
            "lib": ["ES2022"],
            "strict": True,
            "noUnusedLocals": True,
            "esModuleInterop": True,
            "skipLibCheck": True,
            "noEmit": True,
            "types": ["node"],
            "typeRoots": [str(typescript / "node_modules" / "@types")],
            # The package as a user's project resolves it: its entry point.
            "paths": {"@quotad/client": [str(typescript / "src" / "index.ts")]},
        },
        "files": ["snippet.ts"],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    run([tool("npm"), "run", "--silent", "generate"], typescript, dict(os.environ))
    run([str(typescript / "node_modules" / ".bin" / "tsc"), "-p", str(tmp_path)], tmp_path, dict(os.environ))
