#!/usr/bin/env bash
# requirements.lock: every third-party package the container image installs, pinned with the
# hashes of all its distributions, for CPython 3.11 on Linux (x86_64 and aarch64 alike). The
# Dockerfile installs it with `pip install --require-hashes`, then quotad and its client with
# --no-deps. Run this after changing a dependency in pyproject.toml or clients/python/pyproject.toml
# (any uv: `pip install uv`); tests/unit/test_dockerfile.py fails while the lock misses one.
set -euo pipefail
cd "$(dirname "$0")/.."
uv="${UV:-uv}"
printf '%s\n' ./clients/python . 'setuptools>=69' |
    "$uv" pip compile - --quiet --generate-hashes --python-version 3.11 --python-platform linux \
        --no-emit-package quotad --no-emit-package quotad-server \
        --custom-compile-command scripts/lock_image.sh --output-file requirements.lock
