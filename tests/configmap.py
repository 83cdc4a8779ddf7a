"""A directory laid out and updated the way the kubelet does it for a mounted ConfigMap."""

from __future__ import annotations

from pathlib import Path


class ConfigMapVolume:
    """The layout the kubelet writes for a mounted ConfigMap, and its atomic update.

    <dir>/..<timestamp>/policy.yaml    the files of one version
    <dir>/..data -> ..<timestamp>      switched by rename of a new symlink: atomic
    <dir>/policy.yaml -> ..data/policy.yaml
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    def publish(self, text: str) -> None:
        self.version += 1
        version_dir = self.root / f"..2026_11_26_{self.version:02d}"
        version_dir.mkdir()
        (version_dir / "policy.yaml").write_text(text)
        new_link = self.root / "..data_tmp"
        new_link.symlink_to(version_dir.name)
        new_link.replace(self.root / "..data")
        if not (self.root / "policy.yaml").is_symlink():
            (self.root / "policy.yaml").symlink_to("..data/policy.yaml")
