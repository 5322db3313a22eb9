"""Restoring a SQLite store: the copy decoded beside the target, checked, and renamed over it with the old file
kept as a safety copy."""

from __future__ import annotations

import os
import time
from pathlib import Path


from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto
from backup_assets.core.artifact import decompress_to, human_size, partial_path
from backup_assets.core.backup.take import repository_for
from backup_assets.core.engines import sqlite
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.restore_drill import compare_with_manifest
from backup_assets.core.restore.choose import (RestoreResult, _Hooks, _audited, _progress, _stamp, quiet, real_path,
                                               verify_before_restore)


def _decompress(catalog: Catalog, backup: StoredBackup, dest: Path, say) -> None:
    decompress_to(backup.artifact_path, dest, expected_size=backup.manifest.raw_size_bytes,
                  on_progress=_progress(backup, say),
                  identities=crypto.identities_for(catalog, backup.manifest, artifact=str(backup.artifact_path)))
    say(f"decompressed {human_size(backup.manifest.raw_size_bytes)}")


def restore_sqlite(catalog: Catalog, backup: StoredBackup, *, target_file: str | None = None,
                   safety_copy: bool = True, say=quiet, origin: dict | None = None) -> RestoreResult:
    m = backup.manifest
    if m.engine != "sqlite":
        raise BackupError(f"{backup.artifact_path.name} is a {m.engine} backup and cannot be restored onto a SQLite file")
    src = catalog.sources.get(m.source)
    if target_file is None:
        if src is None or src.engine != "sqlite":
            raise BackupError(f"source {m.source!r} is not a sqlite source in the catalog: name the target file")
        target = Path(real_path(catalog.resolve_path(src.path)))
    else:
        target = Path(real_path(target_file))
    if not target.parent.is_dir():
        raise BackupError(f"target folder {target.parent} does not exist")
    repository_for(catalog).sweep()
    verify_before_restore(backup)
    own = src is not None and src.engine == "sqlite" and real_path(catalog.resolve_path(src.path)) == real_path(target)

    def run() -> RestoreResult:
        around = _Hooks(catalog, backup, target=str(target), in_place=own, say=say)
        around.before()
        started = time.monotonic()
        try:
            result = _restore_sqlite_file(catalog, backup, target, safety_copy=safety_copy, say=say)
        except BackupError as exc:
            raise around.after_failure(exc) from None
        result.duration_s = round(time.monotonic() - started, 3)
        return around.after(result)

    return _audited(catalog, backup, origin, say=say, target=f"file {target}", tables=[], safety_copy=safety_copy,
                    action=run)


def _restore_sqlite_file(catalog: Catalog, backup: StoredBackup, target: Path, *, safety_copy: bool,
                         say) -> RestoreResult:
    m = backup.manifest
    started = time.monotonic()
    tmp = partial_path(target)
    try:
        _decompress(catalog, backup, tmp, say)
        problems_found = sqlite.integrity_problems(tmp)
        if problems_found:
            raise BackupError(f"restored copy fails integrity_check, {target} left unchanged: {'; '.join(problems_found[:3])}")
        counts = sqlite.row_counts(tmp)
        problems = compare_with_manifest(m, counts, {}, sqlite.indexes(tmp))
        problems += sqlite.apply_file_settings(tmp, m.file_settings)
        if problems:
            raise BackupError(f"restored copy differs from the manifest, {target} left unchanged: {'; '.join(problems[:5])}")
        os.chmod(tmp, 0o600)
        safety = None
        if target.exists():
            safety = Path(f"{target}.before-restore-{_stamp()}")
            sqlite.online_copy(target, safety, what=f"safety copy of {target}: ")
            if not safety_copy:
                safety.unlink()
                safety = None
        os.replace(tmp, target)
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
    finally:
        sqlite.remove_with_sidecars(tmp)
    return RestoreResult(str(target), counts, m.row_counts, problems, str(safety) if safety else None,
                         round(time.monotonic() - started, 3), m.artifact)
