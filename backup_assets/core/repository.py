"""The local backup repository: layout and lookup.

Layout (the Miyabi runbook's): `<root>/{postgres,sqlite}/{daily,weekly,monthly}/`
`<source>-<group>-<partition>-<timestamp>.<ext>.zst` with `<artifact>.meta` beside it.
The key of a file relative to the root is the same locally and in S3.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..catalog import GLOBALS_GROUP
from . import BackupError
from .artifact import PARTIAL_MARK, ensure_dir, partial_owner
from .manifest import MANIFEST_SUFFIX, Manifest, manifest_path_for, read_manifest
from .owner import Owner, age_of

SCRATCH = ".tmp"

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

    def new_artifact_path(self, engine: str, tier: str, source: str, group: str, partition: str, *,
                          encrypted: bool = False) -> Path:
        ext = "json" if (engine, group) == ("postgres", GLOBALS_GROUP) else EXTENSIONS[engine]  # the roles backup
        name = f"{source}-{group}-{partition}-{utc_stamp()}.{ext}.zst" + (".age" if encrypted else "")
        return self.folder(engine, tier) / name

    def scratch_root(self) -> Path:
        return ensure_dir(self.root / SCRATCH)

    @contextmanager
    def scratch(self, what: str) -> Iterator[Path]:
        """A 0700 folder for one operation's temporary files (decoded archives are plaintext
        copies of a database), named after its owner and removed on every way out; a kill -9
        leaves it to the next operation's sweep."""
        folder = self.scratch_root() / f"{what}-{Owner.me().token}-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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

    def sweep(self, *, legacy_age_s: float = 6 * 3600) -> list[Path]:
        """Remove what dead operations left: partial files and scratch folders whose owner process
        is gone (at once), never one of a live process. Leftovers named without an owner (older
        versions) go once older than `legacy_age_s`."""
        removed: list[Path] = []
        if not self.root.exists():
            return removed
        scratch = self.root / SCRATCH
        if scratch.is_dir():
            for folder in scratch.iterdir():
                token = folder.name.split("-", 1)[1].rsplit("-", 1)[0] if "-" in folder.name else ""
                owner = Owner.from_token(token)
                age = age_of(folder)
                dead = (not owner.is_alive(age_s=age)) if owner else (age is not None and age > legacy_age_s)
                if dead:
                    shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
                    removed.append(folder)
        for dirpath, _dirs, files in os.walk(self.root):
            if Path(dirpath) == scratch or scratch in Path(dirpath).parents:
                continue
            for name in files:
                if PARTIAL_MARK not in name:
                    continue
                path = Path(dirpath) / name
                owner = partial_owner(name)
                age = age_of(path)
                dead = (not owner.is_alive(age_s=age)) if owner else (age is not None and age > legacy_age_s)
                if dead:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def unreadable(self) -> list[tuple[Path, str]]:
        """Manifests that cannot be trusted (damaged, edited, or written before format 2): their
        backups never count, so they are reported for an operator to look at, never deleted."""
        found = []
        for path in self.manifests():
            try:
                read_manifest(path)
            except BackupError as exc:
                found.append((path, str(exc)))
        return found

    def orphans(self, *, min_age_s: float = 0) -> list[Path]:
        """Artifacts without a manifest (a crash between the artifact's rename and the manifest's
        write): never a backup, reported and swept."""
        found = []
        for engine in EXTENSIONS:
            for tier in ("daily", "weekly", "monthly"):
                folder = self.folder(engine, tier)
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    if path.name.endswith((".zst", ".zst.age")) and not path.name.startswith(".") \
                            and not manifest_path_for(path).exists() and (age_of(path) or 0) >= min_age_s:
                        found.append(path)
        return sorted(found)


__all__ = ["LocalRepository", "StoredBackup", "manifest_path_for", "utc_stamp"]
