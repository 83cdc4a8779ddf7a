"""Policy hot reload: notice a new version of the policy file and put it in force.

Kubernetes updates a mounted ConfigMap by writing the new files into a fresh
directory and atomically re-pointing the `..data` symlink the file names go
through; editors and config tools replace files by rename. Either way the path
stays the same while what it resolves to changes. So every poll stats the path
*through* its symlinks (device, inode, size, mtime of the real file, and the
resolved path itself); only when that changed is the file read, and only when
its content hash changed is it parsed.

A valid new policy replaces `holder.policy` in one assignment: decisions that
already started finish under the policy they read, the next one uses the new
one. Reservations already made are settled on the limits stored with them
(settle.lua never looks at the policy), so a reload drops none of them. An
invalid file is refused: the old policy stays in force, the error (file, field
path, value) is logged once per bad version, and the recorder counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Protocol

import structlog

from quotad_server.policy import Policy, PolicyError, parse_policy

_log = structlog.get_logger("quotad.policy")

FileState = tuple[str, int, int, int, int]
"""(resolved path, device, inode, size, mtime in ns) of the file a path leads to."""


class PolicyHolder(Protocol):
    """Anything whose `policy` attribute is the policy in force (QuotaCore is one)."""

    policy: Policy


class ReloadRecorder(Protocol):
    """Told about every attempt to apply a changed file (Metrics is one)."""

    def policy_reload(self, ok: bool, digest: str) -> None: ...


def _state(path: str) -> FileState | None:
    try:
        info = os.stat(path)  # follows symlinks: the real file's identity
    except OSError:
        return None
    return (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class PolicyFile:
    """The policy file at `path`: its first load, then `poll()` for new versions."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.digest = ""  # sha256 of the content in force
        self._state: FileState | None = None
        self._refused = ""  # digest (or read error) of the last version refused, to log it once

    def _read(self) -> tuple[bytes, str]:
        try:
            data = Path(self.path).read_bytes()
        except OSError as exc:
            raise PolicyError(f"{self.path}: cannot read: {exc.strerror}") from exc
        return data, hashlib.sha256(data).hexdigest()

    def _parse(self, data: bytes) -> Policy:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{self.path}: not UTF-8 text: {exc}") from exc
        return parse_policy(text, self.path)

    def load(self) -> Policy:
        """Read and validate the file; raise PolicyError naming file, field and value."""
        state = _state(self.path)
        data, digest = self._read()
        policy = self._parse(data)
        self._state, self.digest = state, digest
        return policy

    def poll(self) -> Policy | None:
        """A new valid policy if the file changed since the last poll, else None.

        Raises PolicyError when it changed into something unusable; the caller
        keeps the policy it has. A refused version is reported once, not at every poll.
        """
        state = _state(self.path)
        if state == self._state:
            return None
        self._state = state
        try:
            data, digest = self._read()
        except PolicyError as error:
            if self._refused == str(error):
                return None
            self._refused = str(error)
            raise
        if digest == self.digest:
            self._refused = ""  # touched, or put back as it was
            return None
        if digest == self._refused:
            return None  # the same bad content again: reported already
        try:
            policy = self._parse(data)
        except PolicyError:
            self._refused = digest
            raise
        self.digest, self._refused = digest, ""
        return policy


class PolicyWatcher:
    """Polls a PolicyFile every `interval_s` and swaps `holder.policy` when a valid new version appears."""

    def __init__(
        self,
        policy_file: PolicyFile,
        holder: PolicyHolder,
        *,
        interval_s: float,
        recorder: ReloadRecorder | None = None,
    ) -> None:
        self._file = policy_file
        self._holder = holder
        self._interval_s = interval_s
        self._recorder = recorder
        self._task: asyncio.Task[None] | None = None

    def check(self) -> bool | None:
        """One poll: True when a new policy was applied, False when one was refused, None if unchanged."""
        try:
            policy = self._file.poll()
        except PolicyError as error:
            _log.error(
                "policy reload refused; the previous policy stays in force",
                policy=self._file.path,
                error=str(error),
            )
            if self._recorder is not None:
                self._recorder.policy_reload(False, "")
            return False
        if policy is None:
            return None
        self._holder.policy = policy  # one assignment: atomic for every coroutine on this loop
        _log.info("policy reloaded", policy=self._file.path, sha256=self._file.digest)
        if self._recorder is not None:
            self._recorder.policy_reload(True, self._file.digest)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.check()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quotad-policy-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
