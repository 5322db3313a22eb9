"""Restoring a backup without ever destroying the old data first.

PostgreSQL, whole archive: restore into a fresh temporary database, compare it with the manifest,
then swap it in by renaming (one transaction), keeping the old database as
`<db>_before_restore_<timestamp>`. A failed or killed restore leaves the target as it was; the
temporary database carries a marker and the next restore removes it.

PostgreSQL, `tables`: in one transaction, copy the current rows to a safety schema, empty the
tables and load them from the archive (foreign-key triggers off for the transaction, so tables
outside the subset are left untouched), then move owned sequences past the restored ids.

SQLite: keep the existing file as `<file>.before-restore-<timestamp>` (an online copy), check the
restored copy with `PRAGMA integrity_check`, then replace the original atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from psycopg import sql

from ..catalog import Catalog
from . import BackupError
from .artifact import CHUNK, decompress_to, human_size, partial_path
from .backup import endpoint_for, repository_for
from .engines import postgres, sqlite
from .repository import StoredBackup
from .verification import is_verified, read_status
from .verify import artifact_intact, compare_with_manifest, dump_major, find_backup

RESTORE_MARK = "backup_assets restore in progress"


def quiet(message: str, progress: bool = False) -> None:
    """The default reporter: says nothing. The CLI passes one that prints."""


@dataclass
class RestoreResult:
    target: str
    counts: dict[str, int]
    expected: dict[str, int]
    problems: list[str]
    safety_copy: str | None
    duration_s: float
    artifact: str
    extra: dict = field(default_factory=dict)

    @property
    def matches(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = [f"{'table':40} {'restored':>12} {'manifest':>12}"]
        for t in sorted(self.expected):
            got = self.counts.get(t)
            mark = "" if got == self.expected[t] else "  <-- differs"
            lines.append(f"{t:40} {str(got if got is not None else '-'):>12} {self.expected[t]:>12}{mark}")
        return "\n".join(lines)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S")


# -- choosing what to restore ------------------------------------------------------------------

def choose_backup(catalog: Catalog, *, source: str, group: str, tier: str | None = None,
                  partition: str | None = None, say=quiet) -> StoredBackup:
    """The requested partition, or the newest backup that verifies (checksum checked now)."""
    if source not in catalog.sources:
        raise BackupError(f"unknown source {source!r} (the catalog has {', '.join(catalog.sources)})")
    if group not in catalog.sources[source].group_names():
        raise BackupError(f"source {source!r} has no group {group!r}")
    repo = repository_for(catalog)
    tiers = [tier] if tier else ["daily", "weekly", "monthly"]
    if partition:
        for t in tiers:
            try:
                return find_backup(catalog, source, group, t, partition)
            except BackupError:
                continue
        raise BackupError(f"no backup of {source}/{group} for partition {partition} ({'/'.join(tiers)})")
    candidates = [b for t in tiers for b in repo.backups(source=source, group=group, tier=t)]
    candidates.sort(key=lambda b: b.manifest.snapshot_at or b.manifest.timestamp, reverse=True)
    if not candidates:
        raise BackupError(f"no backup of {source}/{group} matches ({'/'.join(tiers)})")
    for b in candidates:
        if read_status(b) and not is_verified(b):
            say(f"skipping {b.artifact_path.name}: its last checks failed")
            continue
        outcome = _intact(b)
        if outcome.passed:
            return b
        say(f"skipping {b.artifact_path.name}: {outcome.message}")
    raise BackupError(f"no backup of {source}/{group} verifies ({len(candidates)} tried)")


def backup_from_file(catalog: Catalog, file: str) -> StoredBackup:
    """A backup named by path: it must lie inside the repository, with its manifest beside it."""
    from .manifest import manifest_path_for, read_manifest

    root = repository_for(catalog).root.resolve()
    raw = Path(file)
    if any(part == ".." for part in raw.parts):
        raise BackupError(f"{file}: path must not contain '..'")
    path = (raw if raw.is_absolute() else Path.cwd() / raw)
    if path.is_symlink():
        raise BackupError(f"{file}: is a symbolic link; name the artifact itself")
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise BackupError(f"{file}: is outside the backup repository {root}")
    if resolved.name.endswith(".meta"):
        resolved = resolved.with_name(resolved.name[: -len(".meta")])
    if not resolved.is_file():
        raise BackupError(f"{file}: artifact is missing")
    manifest = read_manifest(manifest_path_for(resolved))
    if manifest.artifact != resolved.name:
        raise BackupError(f"{file}: its manifest describes {manifest.artifact}")
    return StoredBackup(manifest, manifest_path_for(resolved))


# artifacts whose checksum this process has verified, by path, size, mtime and manifest sha256:
# choosing "the newest backup that verifies" reads the file once, and the restore does not again
_verified_here: set[tuple] = set()


def _fingerprint(backup: StoredBackup) -> tuple | None:
    try:
        st = backup.artifact_path.stat()
    except FileNotFoundError:
        return None
    return (str(backup.artifact_path), st.st_size, st.st_mtime_ns, backup.manifest.sha256)


def _intact(backup: StoredBackup):
    outcome = artifact_intact(backup)
    if outcome.passed and (key := _fingerprint(backup)):
        _verified_here.add(key)
    return outcome


def verify_before_restore(backup: StoredBackup) -> None:
    key = _fingerprint(backup)
    if key is not None and key in _verified_here:
        return
    outcome = _intact(backup)
    if not outcome.passed:
        raise BackupError(f"refusing to restore: {outcome.message}")


# -- PostgreSQL ---------------------------------------------------------------------------------

def cleanup_restore_leftovers(conn, target: str) -> list[str]:
    return postgres.drop_marked_databases(conn, like=f"{target[:30]}\\_restoring\\_%", mark=RESTORE_MARK)


def other_sessions(conn, dbname: str) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT pid, coalesce(application_name, '') || '@' || coalesce(client_addr::text, 'local') "
        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    ).fetchall()


def restore_plan(catalog: Catalog, backup: StoredBackup, *, target_db: str | None = None,
                 tables: list[str] | None = None, target_file: str | None = None, safety_copy: bool = True) -> str:
    """A sentence saying exactly what will be replaced."""
    m = backup.manifest
    src = catalog.sources.get(m.source)
    if m.engine == "sqlite":
        target = target_file or (str(catalog.resolve_path(src.path)) if src else "?")
        keep = f"; the current file is kept as {target}.before-restore-<timestamp>" if safety_copy else ""
        return f"replace SQLite file {target} with {backup.artifact_path.name} (partition {m.partition}){keep}"
    db = target_db or (src.connection.dbname if src else m.database)
    where = f"{src.connection.host}:{src.connection.port}" if src else "?"
    if tables:
        keep = "; the current rows are kept in schema before_restore_<timestamp>" if safety_copy else ""
        return (f"replace the rows of {', '.join(tables)} in database {db} on {where} with those of "
                f"{backup.artifact_path.name} (partition {m.partition}); other tables are left untouched{keep}")
    keep = f"; the current database is kept as {db}_before_restore_<timestamp>" if safety_copy else ""
    return (f"replace database {db} on {where} with {backup.artifact_path.name} "
            f"(partition {m.partition}, {m.total_rows} rows){keep}")


def restore_postgres(catalog: Catalog, backup: StoredBackup, *, target_db: str | None = None,
                     tables: list[str] | None = None, jobs: int = 2, safety_copy: bool = True,
                     terminate_connections: bool = False, say=quiet) -> RestoreResult:
    m = backup.manifest
    if m.engine != "postgres":
        raise BackupError(f"{backup.artifact_path.name} is a {m.engine} backup, not a PostgreSQL one")
    src = catalog.sources.get(m.source)
    if src is None or src.engine != "postgres":
        raise BackupError(f"{backup.artifact_path.name}: source {m.source!r} is not a postgres source in the catalog")
    target = target_db or src.connection.dbname
    if not postgres.valid_db_name(target):
        raise BackupError(f"target database name {target!r} is not a valid identifier (letters, digits, _; 63 at most)")
    if tables:
        bad = [t for t in tables if postgres.qname(t) not in m.row_counts]
        if bad:
            raise BackupError(f"{backup.artifact_path.name} does not hold table(s) {', '.join(bad)}")
    verify_before_restore(backup)
    ep = endpoint_for(catalog, m.source, target)
    postgres.find_tool("pg_restore", dump_major(m), src.pg_bin_dir)
    started = time.monotonic()
    with postgres.connect(ep.with_db("postgres"), what=f"restore of {m.source}: ") as admin:
        if tables:
            if not postgres.database_exists(admin, target):
                raise BackupError(f"database {target} does not exist: restore whole backups into new databases")
            result = _restore_tables(catalog, backup, ep, tables, safety_copy=safety_copy, say=say)
        else:
            result = _restore_whole(catalog, backup, admin, ep, target, jobs=jobs, safety_copy=safety_copy,
                                    terminate=terminate_connections, say=say)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _decompress(backup: StoredBackup, dest: Path, say) -> None:
    total = backup.manifest.raw_size_bytes or 1
    decompress_to(backup.artifact_path, dest, expected_size=backup.manifest.raw_size_bytes,
                  on_progress=lambda done: say(f"decompressing {100 * done / total:5.1f}%", progress=True))
    say(f"decompressed {human_size(total)}")


def _restore_whole(catalog: Catalog, backup: StoredBackup, admin, ep: postgres.Endpoint, target: str, *,
                   jobs: int, safety_copy: bool, terminate: bool, say) -> RestoreResult:
    m = backup.manifest
    src = catalog.sources[m.source]
    stamp = _stamp()
    exists = postgres.database_exists(admin, target)
    if exists:
        sessions = other_sessions(admin, target)
        if sessions and not terminate:
            raise BackupError(
                f"database {target} has {len(sessions)} other session(s) connected "
                f"({', '.join(s for _, s in sessions[:5])}); stop them or pass --terminate-connections"
            )
    dropped = cleanup_restore_leftovers(admin, target)
    if dropped:
        say(f"removed leftovers of interrupted restores: {', '.join(dropped)}")
    temp = f"{target[:30]}_restoring_{stamp}"
    postgres.create_database(admin, temp, comment=postgres.marker(RESTORE_MARK, target=target))
    swapped = False
    try:
        with tempfile.TemporaryDirectory(dir=repository_for(catalog).scratch_dir()) as tmp:
            raw = Path(tmp) / "archive.dump"
            _decompress(backup, raw, say)
            with postgres.connect(ep.with_db(temp)) as conn:
                for ext in m.extensions:
                    conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
            say(f"pg_restore --jobs={jobs} into {temp}")
            postgres.pg_restore(ep.with_db(temp), raw, jobs=jobs, pg_bin_dir=src.pg_bin_dir, dump_major=dump_major(m),
                                what=f"restore of {backup.artifact_path.name}: ")
        with postgres.connect(ep.with_db(temp)) as conn:
            facts = postgres.table_facts(conn, sorted(set(postgres.user_tables(conn)) & set(m.row_counts)))
        problems = compare_with_manifest(m, facts.row_counts, facts.vectors, facts.indexes)
        if problems:
            raise BackupError(f"restored copy differs from the manifest, target left unchanged: {'; '.join(problems[:5])}")
        safety = f"{target[:40]}_before_restore_{stamp}" if exists else None
        if exists:
            admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(target)))
            try:
                for pid, _ in other_sessions(admin, target):
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                _wait_for_no_sessions(admin, target)
                with admin.transaction():
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(target), sql.Identifier(safety)))
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(temp), sql.Identifier(target)))
                swapped = True
            finally:
                name = safety if swapped else target
                admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
        else:
            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(temp), sql.Identifier(target)))
            swapped = True
        admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(target), sql.Literal(f"restored by backup_assets from {m.artifact} at {stamp}")))
        if safety and not safety_copy:
            postgres.drop_database(admin, safety)
            safety = None
    finally:
        if not swapped:
            postgres.drop_database(admin, temp)
    return RestoreResult(target, facts.row_counts, m.row_counts, [], safety, 0.0, m.artifact)


def _wait_for_no_sessions(admin, dbname: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while other_sessions(admin, dbname):
        if time.monotonic() > deadline:
            raise BackupError(f"sessions on {dbname} did not end within {timeout_s:.0f}s; nothing was changed")
        time.sleep(0.1)


def _restore_tables(catalog: Catalog, backup: StoredBackup, ep: postgres.Endpoint, tables: list[str], *,
                    safety_copy: bool, say) -> RestoreResult:
    m = backup.manifest
    src = catalog.sources[m.source]
    names = [postgres.qname(t) for t in tables]
    stamp = _stamp()
    safety_schema = f"before_restore_{stamp}" if safety_copy else None
    with postgres.connect(ep) as conn:
        missing = postgres.missing_tables(conn, names)
        if missing:
            raise BackupError(f"table(s) {', '.join(missing)} do not exist in {ep.dbname}: restore the whole backup instead")
        sequences = conn.execute(
            """
            SELECT n.nspname, c.relname, a.attname, pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname)
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE (n.nspname || '.' || c.relname) = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
              AND pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname) IS NOT NULL
            """,
            (names,),
        ).fetchall()
    pre = ["SET session_replication_role = replica;", "SET lock_timeout = '30s';"]
    if safety_schema:
        pre.append(f'CREATE SCHEMA "{safety_schema}";')
    for t in names:
        schema, name = postgres.qualified(t)
        ident = f'"{schema}"."{name}"'
        pre.append(f"LOCK TABLE {ident} IN ACCESS EXCLUSIVE MODE;")
        if safety_schema:
            pre.append(f'CREATE TABLE "{safety_schema}"."{schema}_{name}" AS TABLE {ident};')
        pre.append(f"DELETE FROM {ident};")
    post = [
        f"SELECT setval('{seq}', coalesce((SELECT max(\"{col}\") FROM \"{s}\".\"{t}\"), 1), "
        f"(SELECT max(\"{col}\") FROM \"{s}\".\"{t}\") IS NOT NULL);"
        for s, t, col, seq in sequences
    ]
    tool, _ = postgres.find_tool("pg_restore", dump_major(m), src.pg_bin_dir)
    psql, _ = postgres.find_tool("psql", 0, src.pg_bin_dir)
    with tempfile.TemporaryDirectory(dir=repository_for(catalog).scratch_dir()) as tmp:
        raw = Path(tmp) / "archive.dump"
        _decompress(backup, raw, say)
        args = [str(tool), "--data-only", "--no-owner", "--file=-"]
        args += [f"--schema={s}" for s in sorted({postgres.qualified(t)[0] for t in names})]
        args += [f"--table={postgres.qualified(t)[1]}" for t in names]
        args.append(str(raw))
        say(f"loading {', '.join(names)} in one transaction")
        with tempfile.TemporaryFile() as err:
            psql_proc = subprocess.Popen(
                [str(psql), "--no-psqlrc", "--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1",
                 f"--dbname={ep.dbname}", "--file=-"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=ep.child_env())
            try:
                psql_proc.stdin.write("\n".join(pre).encode() + b"\n")
                dump_proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=ep.child_env())
                while chunk := dump_proc.stdout.read(CHUNK):
                    psql_proc.stdin.write(chunk)
                if dump_proc.wait() != 0:
                    psql_proc.kill()
                    psql_proc.wait()
                    err.seek(0)
                    raise BackupError(f"pg_restore of {backup.artifact_path.name} failed, nothing changed: "
                                      f"{ep.scrub(err.read().decode(errors='replace').strip()[-2000:])}")
                psql_proc.stdin.write(("\n" + "\n".join(post) + "\n").encode())
                psql_proc.stdin.close()
            except BrokenPipeError:
                pass
            rc = psql_proc.wait()
            if rc != 0:
                err.seek(0)
                raise BackupError(f"loading {', '.join(names)} failed, the transaction was rolled back and nothing "
                                  f"changed: {ep.scrub(err.read().decode(errors='replace').strip()[-2000:])}")
    with postgres.connect(ep) as conn:
        facts = postgres.table_facts(conn, names)
    expected = {t: m.row_counts[t] for t in names}
    sub = replace(m, row_counts=expected, vectors={t: v for t, v in m.vectors.items() if t in names},
                  indexes=[i for i in m.indexes if i["table"] in names])
    problems = compare_with_manifest(sub, facts.row_counts, facts.vectors, facts.indexes)
    return RestoreResult(ep.dbname, facts.row_counts, expected, problems,
                         f"{ep.dbname}.{safety_schema}" if safety_schema else None, 0.0, m.artifact)


# -- SQLite -------------------------------------------------------------------------------------

def restore_sqlite(catalog: Catalog, backup: StoredBackup, *, target_file: str | None = None,
                   safety_copy: bool = True, say=quiet) -> RestoreResult:
    m = backup.manifest
    if m.engine != "sqlite":
        raise BackupError(f"{backup.artifact_path.name} is a {m.engine} backup and cannot be restored onto a SQLite file")
    src = catalog.sources.get(m.source)
    if target_file is None:
        if src is None or src.engine != "sqlite":
            raise BackupError(f"source {m.source!r} is not a sqlite source in the catalog: name the target file")
        target = catalog.resolve_path(src.path)
    else:
        target = Path(target_file).resolve()
    if not target.parent.is_dir():
        raise BackupError(f"target folder {target.parent} does not exist")
    verify_before_restore(backup)
    started = time.monotonic()
    tmp = partial_path(target)
    try:
        _decompress(backup, tmp, say)
        problems_found = sqlite.integrity_problems(tmp)
        if problems_found:
            raise BackupError(f"restored copy fails integrity_check, {target} left unchanged: {'; '.join(problems_found[:3])}")
        counts = sqlite.row_counts(tmp)
        problems = compare_with_manifest(m, counts, {}, sqlite.indexes(tmp))
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
