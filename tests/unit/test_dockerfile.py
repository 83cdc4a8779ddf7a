"""The Dockerfile cannot be built here (no Docker engine): check what a build would rely on."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
from quotad_server.cli import main
from quotad_server.entry import main as entry
from quotad_server.settings import Settings, SettingsError
from quotad_server.tokens import load_encodings

ROOT = Path(__file__).resolve().parents[2]
# The base image: its tag, and its digest when one is given (`@sha256:...` only then).
PINNED_BASE = "${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST}"
Instruction = tuple[str, str]  # (keyword, arguments)


def instructions() -> list[Instruction]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)  # line continuations
    found = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, arguments))
    return result


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    path = path.rstrip("/")
    for pattern in patterns:
        if path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatch(path, pattern):
            return True
    return False


def test_every_copied_file_exists_and_is_not_dockerignored() -> None:
    copies = [arguments for keyword, arguments in instructions() if keyword == "COPY"]
    local = [arguments.split() for arguments in copies if not arguments.startswith("--from")]
    assert local, "the build copies the sources"
    for *sources, _destination in local:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    # What the install needs is really copied: the project, its readme, the server, the client.
    copied = {source.rstrip("/") for *sources, _ in local for source in sources}
    assert {"pyproject.toml", "README.md", "server", "clients/python"} <= copied


def test_the_build_is_multi_stage_and_the_final_stage_is_slim_and_compiler_free() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    names = {
        arguments.split()[-1] for (_, arguments) in (stage[0] for stage in all_stages) if " AS " in arguments
    }
    for keyword, arguments in instructions():
        if keyword == "COPY" and arguments.startswith("--from="):
            assert arguments.split()[0].removeprefix("--from=") in names
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base.group(1))
    final = all_stages[-1]
    assert final[0][1] == PINNED_BASE  # a fresh slim base, not the build stage
    final_text = " ".join(arguments for _, arguments in final)
    for compiler in ("gcc", "g++", "build-essential", "clang", "apt-get install"):
        assert compiler not in final_text


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    users = [arguments for keyword, arguments in stages()[-1] if keyword == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert int(uid) > 0  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert int(gid) > 0


def test_the_entry_point_is_the_real_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    final = stages()[-1]
    entrypoint = json.loads(next(arguments for keyword, arguments in final if keyword == "ENTRYPOINT"))
    command = json.loads(next(arguments for keyword, arguments in final if keyword == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["quotad"]
    assert entrypoint[0] in scripts
    module, _, function = scripts[entrypoint[0]].partition(":")
    assert getattr(import_module(module), function) is entry  # `quotad health` alone, or cli.main
    # `quotad serve` is a real subcommand.
    assert command == ["serve"]
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: quotad serve" in capsys.readouterr().out


def test_the_tokenizer_encodings_are_baked_in_at_build_time(tmp_path: Path) -> None:
    runs = " ".join(arguments for keyword, arguments in stages()[0] if keyword == "RUN")
    baked = re.search(r"quotad prepare-encodings (\S+)", runs)
    assert baked, "the build stage must bake the encodings"
    final = " ".join(arguments for keyword, arguments in stages()[-1] if keyword == "ENV")
    assert f"TIKTOKEN_CACHE_DIR={baked.group(1)}" in final
    # And the step really bakes them: tiktoken then loads both from that directory alone.
    assert main(["prepare-encodings", str(tmp_path)]) == 0
    for name in ("cl100k_base", "o200k_base"):
        assert load_encodings(str(tmp_path), [name])[name].encode_ordinary("quotad")


def final_env() -> dict[str, str]:
    pairs = " ".join(arguments for keyword, arguments in stages()[-1] if keyword == "ENV").split()
    return dict(pair.split("=", 1) for pair in pairs)


def test_every_stage_starts_from_the_base_pinned_by_digest_when_given() -> None:
    for stage in stages():
        assert stage[0][1].removesuffix(" AS build") == PINNED_BASE
    digest = re.search(r"^ARG PYTHON_DIGEST=(\S*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert digest is not None, "the Dockerfile must take the base's digest (ARG PYTHON_DIGEST)"
    # Empty (the tag alone) until a digest is known; never anything but a real sha256 digest.
    assert re.fullmatch(r"(sha256:[0-9a-f]{64})?", digest.group(1))


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(pyproject: Path) -> set[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {normalized(re.split(r"[<>=!~\[; ]", dependency, maxsplit=1)[0]) for dependency in dependencies}


def test_dependencies_come_from_the_lock_checked_against_their_hashes() -> None:
    runs = [
        arguments for keyword, arguments in stages()[0] if keyword == "RUN" and "pip install" in arguments
    ]
    assert runs[0].endswith("pip install --require-hashes --no-deps -r requirements.lock"), runs
    for later in runs[1:]:
        assert "--no-deps" in later, f"only the lock may bring dependencies: {later}"
    lock = (ROOT / "requirements.lock").read_text()
    entries = re.findall(
        r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M
    )
    pinned = {normalized(name) for name, _version, _hashes in entries}
    assert len(pinned) == len(re.findall(r"^[A-Za-z0-9]", lock, re.M)), (
        "every entry is name==version with hashes"
    )
    ours = {"quotad", "quotad-server"}
    needed = (
        requirement_names(ROOT / "pyproject.toml") | requirement_names(ROOT / "clients/python/pyproject.toml")
    ) - ours
    missing = needed - pinned
    assert not missing, f"requirements.lock lacks {sorted(missing)}: run scripts/lock_image.sh"
    assert "setuptools" in pinned  # quotad itself is built from source without build isolation
    assert not ours & pinned


def test_the_image_has_a_healthcheck_over_the_local_socket() -> None:
    checks = [arguments for keyword, arguments in stages()[-1] if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert json.loads(command) == ["quotad", "health"]
    assert "--start-period=" in options  # the tokenizers load before the first SERVING
    socket = final_env().get("QUOTAD_LOCAL_SOCKET", "")
    assert socket.startswith("/tmp/"), "the local socket needs a writable directory (/tmp)"


def test_a_container_without_a_redis_url_refuses_to_start() -> None:
    env = final_env()
    assert "QUOTAD_REDIS_URL" not in env
    assert "QUOTAD_EMBEDDED_REDIS" not in env
    with pytest.raises(SettingsError, match="QUOTAD_REDIS_URL is not set"):
        Settings.from_env({**env, "QUOTAD_POLICY": "/etc/quotad/policy/policy.yaml"})
