"""archive_readable: the archive read back by its own tool (pg_restore --list, SQLite's integrity check, the roles
file), every object it holds counted by kind."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import zstandard

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto
from backup_assets.core.verify import archive_scan
from backup_assets.core.backup import roles
from backup_assets.core.verify import schema_compare
from backup_assets.core.artifact import decompress_to
from backup_assets.core.backup.take import repository_for
from backup_assets.core.engines import postgres, sqlite
from backup_assets.core.manifest import Manifest
from backup_assets.core.outcome import Outcome
from backup_assets.core.repository import StoredBackup


def archive_readable(catalog: Catalog, backup: StoredBackup) -> Outcome:
    m, path = backup.manifest, backup.artifact_path
    if m.format == roles.FORMAT:
        try:
            saved = roles.load(path, m, crypto.identities_for(catalog, m, artifact=str(path)))
        except (BackupError, zstandard.ZstdError) as exc:
            return Outcome.failure(exc, f"{path}: {exc}")
        return _roles_readable(backup, saved)
    if m.engine == "postgres":
        return _postgres_readable(catalog, backup)
    with repository_for(catalog).scratch("check", need_bytes=m.raw_size_bytes) as tmp:
        copy = tmp / "check.db"
        try:
            decompress_to(path, copy, expected_size=m.raw_size_bytes,
                          identities=crypto.identities_for(catalog, m, artifact=str(path)))
        except (BackupError, zstandard.ZstdError) as exc:
            return Outcome.failure(exc, f"{path}: {exc}")
        return _sqlite_readable(backup, copy)


def _roles_readable(backup: StoredBackup, saved: roles.Globals) -> Outcome:
    m, path = backup.manifest, backup.artifact_path
    if saved.role_names() != sorted(m.roles):
        return Outcome(False, f"{path}: holds roles {', '.join(saved.role_names())}, the manifest lists "
                              f"{', '.join(sorted(m.roles))}")
    return Outcome(True, f"{path.name}: {len(saved.roles)} role(s), {len(saved.memberships)} membership(s), "
                         f"{len(saved.database_grants)} database grant(s)",
                   {"roles": len(saved.roles), "passwords_included": saved.passwords_included})


def _sqlite_readable(backup: StoredBackup, copy: Path) -> Outcome:
    """integrity_check and every table of the manifest, on a decoded copy of the artifact."""
    m, path = backup.manifest, backup.artifact_path
    try:
        counts = sqlite.check_copy(copy, m.tables)
    except BackupError as exc:
        return Outcome.failure(exc, f"{path}: {exc}")
    return Outcome(True, f"{path.name}: integrity_check ok, {len(counts)} table(s)", {"tables": len(counts)})


def _postgres_readable(catalog: Catalog, backup: StoredBackup) -> Outcome:
    """The archive read by structure in one pass: header, TOC, every data block; every table of
    the manifest has its definition and data, with exactly the snapshot's row count; the content
    fingerprint of each table is recorded for the drill. pg_restore --list of the version that
    will restore it reads the same stream's TOC."""
    return _readable_pass(catalog, backup)[0]


def _readable_pass(catalog: Catalog, backup: StoredBackup, *, copy_to: Path | None = None, sha256=None,
                   identities=None) -> tuple[Outcome, archive_scan.ArchiveScan | None]:
    """`_postgres_readable`, also handing back the scan (None when the archive could not be read)
    and, when asked, a plain copy of the archive and the artifact's SHA-256 from the same pass."""
    m, path = backup.manifest, backup.artifact_path
    try:
        tool = _pg_restore_for(catalog, m)
        if identities is None:
            identities = crypto.identities_for(catalog, m, artifact=str(path))
    except BackupError as exc:
        return Outcome.failure(exc, _naming(path, exc)), None
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(tool), "--list"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            result = archive_scan.scan(path, m, pipe=proc.stdin, copy_to=copy_to, identities=identities, sha256=sha256)
        except BackupError as exc:
            proc.kill()
            proc.wait()
            return Outcome.failure(exc, str(exc)), None
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        rc = proc.wait()
        err.seek(0)
        if rc != 0:
            return _unlisted(path, tool, err.read()), result
    return _readable_outcome(backup, result), result


def _pg_restore_for(catalog: Catalog, m: Manifest, *, at_most: int | None = None) -> Path:
    """The pg_restore that reads what the manifest's pg_dump wrote (the source's bin dir first),
    at most of the target server's major version when one is given."""
    src = catalog.sources.get(m.source)
    return postgres.find_tool("pg_restore", dump_major(m), src.pg_bin_dir if src else None, at_most=at_most)[0]


def _naming(path: Path, exc: Exception) -> str:
    """An error's text, naming the artifact once."""
    return str(exc) if str(path) in str(exc) else f"{path}: {exc}"


def _unlisted(path: Path, tool: Path, stderr: bytes) -> Outcome:
    return Outcome(False, f"{path}: {tool.name} --list cannot read the archive: "
                          f"{stderr.decode(errors='replace').strip()[-500:]}")


def _readable_outcome(backup: StoredBackup, result: archive_scan.ArchiveScan) -> Outcome:
    m, path = backup.manifest, backup.artifact_path
    problems = archive_scan.archive_problems(result, m)
    meta = {"toc_entries": len(result.archive.entries), "tables": len(m.row_counts),
            "rows": sum(t.rows for t in result.tables.values()), "scan_s": result.seconds,
            "fingerprints": result.fingerprints(), "objects": schema_compare.kinds_of(result.archive.entries),
            "large_objects": {"count": result.large_objects[0], "bytes": result.large_objects[1]}}
    if problems:
        return Outcome(False, f"{path}: {'; '.join(problems[:8])}", meta)
    return Outcome(True, f"{path.name}: all {len(m.row_counts)} table(s) of the manifest are in the archive with "
                         f"their data and exact row counts; every data block read", meta)


def dump_major(m: Manifest) -> int:
    """The major version of the pg_dump that wrote the archive: pg_restore must be at least that."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", m.tool_version or "") or re.search(r"(\d+)", m.server_version or "0")
    return int(match.group(1))
