"""Taking a backup: dump (or promote) one source × group × tier × partition into the repository.

Weekly and monthly partitions do not dump again when the source has a daily tier: they promote
the daily artifact of their boundary day (the last day of their window) with a hard link, and
write a manifest of their own. Without such a daily artifact they dump on their own.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto
from backup_assets.core.backup import roles
from backup_assets.core.artifact import (ArtifactWriter, create_private, ensure_dir, fsync_dir, human_size, partial_path,
                       write_json_atomic)
from backup_assets.core.engines import postgres, sqlite
from backup_assets.core.manifest import Manifest, manifest_path_for
from backup_assets.core.repository import LocalRepository, StoredBackup


def endpoint_for(catalog: Catalog, source: str, dbname: str | None = None) -> postgres.Endpoint:
    """Where the source's backups are read: its `connection` (a hot standby, when it names one)."""
    return _endpoint(catalog, catalog.sources[source].connection, dbname)


def primary_endpoint_for(catalog: Catalog, source: str, dbname: str | None = None) -> postgres.Endpoint:
    """Where the source is written: its `primary` when its backups are read from a standby, else `connection`."""
    src = catalog.sources[source]
    return _endpoint(catalog, src.primary or src.connection, dbname)


def _endpoint(catalog: Catalog, conn, dbname: str | None) -> postgres.Endpoint:
    return postgres.Endpoint(conn.host, conn.port, conn.user, dbname or conn.dbname, conn.password(), conn.sslmode,
                             str(catalog.resolve_path(conn.sslrootcert)) if conn.sslrootcert else None)


def repository_for(catalog: Catalog) -> LocalRepository:
    return LocalRepository(catalog.repository_root)


def asset_key_path(source: str, group: str, tier: str) -> str:
    """The Dagster asset key (defs.keys.backup_key) as text, for manifests and object metadata."""
    return f"{source}/{group}_{tier}"


def window(tier: str, partition: str) -> tuple[dt.date, dt.date]:
    """[first, last] day covered by a partition of a tier."""
    start = dt.date.fromisoformat(partition[:10])
    if tier in ("hourly", "daily"):
        return start, start
    if tier == "weekly":
        return start, start + dt.timedelta(days=6)
    if tier == "monthly":
        nxt = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return start, nxt - dt.timedelta(days=1)
    raise BackupError(f"unknown tier {tier!r}")


def boundary_day(tier: str, partition: str) -> str:
    return window(tier, partition)[1].isoformat()


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_backup(catalog: Catalog, source: str, group: str, tier: str, partition: str, *, log=None,
               stream=None) -> Manifest:
    """Back up one partition; returns its manifest once artifact and manifest are on disk. A
    `stream` (verify.stream_check) reads a dump as it is written, for its checks."""
    say = log or (lambda _msg: None)
    if (source, group, tier) not in catalog.backup_targets():
        raise BackupError(f"{source}/{group}/{tier} is not in the catalog")
    repo = repository_for(catalog)
    repo.sweep()
    if tier in ("weekly", "monthly") and "daily" in catalog.source_tiers(source):
        day = boundary_day(tier, partition)
        daily = repo.latest(source, group, "daily", day)
        if daily is not None and _artifact_looks_complete(daily):
            say(f"promoting daily backup {daily.manifest.artifact} of {day} to {tier} {partition}")
            return promote(repo, daily, tier, partition)
        say(f"no daily backup of {day} to promote: dumping {source}/{group} for {tier} {partition}")
    return dump(catalog, source, group, tier, partition, say=say, stream=stream)


def _artifact_looks_complete(backup: StoredBackup) -> bool:
    try:
        return backup.artifact_path.stat().st_size == backup.manifest.size_bytes
    except FileNotFoundError:
        return False


def dump(catalog: Catalog, source: str, group: str, tier: str, partition: str, *, say=lambda _msg: None,
         stream=None) -> Manifest:
    src = catalog.sources[source]
    repo = repository_for(catalog)
    what = f"source '{source}' group '{group}': "
    encryption = catalog.encryption_for(source)
    final = repo.new_artifact_path(src.engine, tier, source, group, partition, encrypted=encryption is not None)
    level = 3
    started = time.monotonic()
    try:
        # the checks read the zstd stream as it is written, before it is encrypted (verify.stream_check)
        with ArtifactWriter(final, level=level, recipients=encryption.recipients if encryption else None,
                            tap=stream) as writer:
            if src.engine == "postgres" and group == roles.GROUP:
                ep = endpoint_for(catalog, source)
                with postgres.connect(ep, what=what) as conn:
                    snapshot_at = _now_iso()
                    saved = roles.read(conn, ep.dbname)
                    version = postgres.server_version(conn)
                writer.write(saved.to_bytes())
                details = dict(
                    database=ep.dbname, host=ep.host, port=ep.port, format=roles.FORMAT, roles=saved.role_names(),
                    snapshot_at=snapshot_at, server_version=version,
                    tool_version="backup_assets roles (pg_authid, pg_auth_members, pg_db_role_setting, datacl)",
                )
            elif src.engine == "postgres":
                ep = endpoint_for(catalog, source)
                with postgres.connect(ep, what=what) as conn:
                    # the safety copies of earlier --tables restores are not part of the database's backups
                    safety = postgres.safety_schemas(conn)
                result = postgres.dump(ep, src.group_tables(group), writer.copy_from, pg_bin_dir=src.pg_bin_dir,
                                       what=what, exclude_schemas=safety)
                facts = result.facts
                details = dict(
                    database=ep.dbname, host=ep.host, port=ep.port, format="pg_dump-custom",
                    whole_database=src.group_tables(group) is None, tables=result.tables, row_counts=facts.row_counts, vectors=facts.vectors,
                    indexes=facts.indexes, extensions=facts.extensions, snapshot_at=result.snapshot_at,
                    server_version=result.server_version, tool_version=result.tool_version,
                    partitions=facts.partitions, owners=facts.owners,
                )
            else:
                db_path = catalog.resolve_path(src.path)
                with repo.scratch("backup") as tmp:
                    scratch = tmp / "copy.db"
                    create_private(scratch)
                    snapshot_at = _now_iso()
                    settings = sqlite.file_settings_or_none(db_path) or {}
                    sqlite.online_copy(db_path, scratch, what=what)
                    # check the copy while it is being compressed; nothing is committed unless it passes
                    with ThreadPoolExecutor(max_workers=1) as pool:
                        checked = pool.submit(sqlite.check_copy, scratch, src.tables, what=what)
                        with open(scratch, "rb") as fh:
                            writer.copy_from(fh)
                        counts = checked.result()
                    idx = sqlite.indexes(scratch)
                details = dict(
                    database=str(db_path), host=None, port=None, format="sqlite",
                    tables=sorted(counts), row_counts=counts, indexes=idx, snapshot_at=snapshot_at, file_settings=settings,
                    server_version=f"SQLite {sqlite.sqlite_version()}", tool_version="sqlite3 online backup API",
                )
            written = writer.commit()
    except OSError as exc:
        raise BackupError(f"{what}writing the backup to {final.parent} failed: {exc.strerror or exc}") from None
    duration = time.monotonic() - started
    manifest = Manifest(
        timestamp=_now_iso(), backup_type=tier, size_bytes=written.size_bytes,
        size_human=human_size(written.size_bytes), compression=f"zstd -{level}",
        engine=src.engine, source=source, group=group, tier=tier, partition=partition,
        asset_key=asset_key_path(source, group, tier), artifact=final.name, sha256=written.sha256,
        raw_size_bytes=written.raw_size_bytes, duration_s=round(duration, 3), **details,
        encryption={"format": "age", "recipients": crypto.describe(encryption.recipients),
                    "identity_file_env": encryption.identity_file_env} if encryption else None,
    )
    try:
        write_json_atomic(manifest_path_for(final), manifest.to_json())
    except OSError as exc:
        final.unlink(missing_ok=True)
        raise BackupError(f"{what}writing the manifest beside {final} failed: {exc.strerror or exc}") from None
    say(f"wrote {final} ({manifest.size_human}, {manifest.total_rows} rows, {duration:.1f}s)")
    return manifest


def promote(repo: LocalRepository, daily: StoredBackup, tier: str, partition: str) -> Manifest:
    """Give a daily artifact a weekly/monthly name by hard link (a copy across filesystems)."""
    m = daily.manifest
    final = repo.new_artifact_path(m.engine, tier, m.source, m.group, partition, encrypted=m.encryption is not None)
    ensure_dir(final.parent)
    tmp = partial_path(final)
    try:
        try:
            os.link(daily.artifact_path, tmp)
        except OSError:
            shutil.copyfile(daily.artifact_path, tmp)
            os.chmod(tmp, 0o600)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"promoting {daily.artifact_path} to {tier} failed: {exc.strerror or exc}") from None
    started = time.monotonic()
    promoted = replace(
        m, timestamp=_now_iso(), backup_type=tier, tier=tier, partition=partition,
        asset_key=asset_key_path(m.source, m.group, tier), artifact=final.name,
        promoted_from=repo.key_of(daily.artifact_path), duration_s=round(time.monotonic() - started, 3),
    )
    try:
        write_json_atomic(manifest_path_for(final), promoted.to_json())
    except OSError:
        final.unlink(missing_ok=True)
        raise
    return promoted

