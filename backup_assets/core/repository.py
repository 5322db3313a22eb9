"""The local backup repository: layout and lookup.

Layout (the Miyabi runbook's): `<root>/{postgres,sqlite}/{daily,weekly,monthly}/`
`<source>-<group>-<partition>-<timestamp>.<ext>.zst` with `<artifact>.meta` beside it.
The key of a file relative to the root is the same locally and in S3.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import BackupError
from .artifact import PARTIAL_MARK, ensure_dir
from .manifest import MANIFEST_SUFFIX, Manifest, manifest_path_for, read_manifest

EXTENSIONS = {"postgres": "dump", "sqlite": "db"}


def utc_stamp(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ")


@dataclass(frozen=True)
class StoredBackup:
    manifest: Manifest
    manifest_path: Path

    @property
    def artifact_path(self) -> Path:
        return self.manifest_path.with_name(self.manifest.artifact)


class LocalRepository:
    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, engine: str, tier: str) -> Path:
        return self.root / engine / tier

    def new_artifact_path(self, engine: str, tier: str, source: str, group: str, partition: str) -> Path:
        name = f"{source}-{group}-{partition}-{utc_stamp()}.{EXTENSIONS[engine]}.zst"
        return self.folder(engine, tier) / name

    def scratch_dir(self) -> Path:
        return ensure_dir(self.root / ".tmp")

    def key_of(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def manifests(self) -> Iterator[Path]:
        for engine in EXTENSIONS:
            for tier in ("daily", "weekly", "monthly"):
                folder = self.folder(engine, tier)
                if folder.is_dir():
                    for path in sorted(folder.iterdir()):
                        if path.name.endswith(MANIFEST_SUFFIX) and PARTIAL_MARK not in path.name:
                            yield path

    def backups(self, *, source: str | None = None, group: str | None = None, tier: str | None = None,
                partition: str | None = None, strict: bool = False) -> list[StoredBackup]:
        """Stored backups matching the filters, oldest first. Unreadable manifests are skipped
        (or raised with strict=True): a backup without a good manifest never counts."""
        found = []
        for path in self.manifests():
            try:
                manifest = read_manifest(path)
            except BackupError:
                if strict:
                    raise
                continue
            if source and manifest.source != source:
                continue
            if group and manifest.group != group:
                continue
            if tier and manifest.tier != tier:
                continue
            if partition and manifest.partition != partition:
                continue
            found.append(StoredBackup(manifest, path))
        found.sort(key=lambda b: (b.manifest.partition, b.manifest.timestamp))
        return found

    def latest(self, source: str, group: str, tier: str, partition: str | None = None) -> StoredBackup | None:
        matches = self.backups(source=source, group=group, tier=tier, partition=partition)
        return matches[-1] if matches else None

    def sweep_partials(self, older_than_s: float = 6 * 3600) -> list[Path]:
        """Remove leftovers of interrupted writes (never a committed file)."""
        removed = []
        cutoff = time.time() - older_than_s
        if not self.root.exists():
            return removed
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if PARTIAL_MARK in name:
                    path = Path(dirpath) / name
                    try:
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed.append(path)
                    except FileNotFoundError:
                        pass
        return removed


__all__ = ["LocalRepository", "StoredBackup", "manifest_path_for", "utc_stamp"]
