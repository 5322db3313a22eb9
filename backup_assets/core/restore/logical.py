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
import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psycopg
import zstandard
from psycopg import sql

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto, failpoints
from backup_assets.core.verify import archive_scan
from backup_assets.core.restore import restore_log as audit
from backup_assets.core.restore import hooks
from backup_assets.core.backup import roles
from backup_assets.core.verify.schema_compare import database_properties
from backup_assets.core.artifact import decompress_to, human_size, open_decompressed, partial_path
from backup_assets.core.backup.take import endpoint_for, repository_for
from backup_assets.core.engines import postgres, sqlite
from backup_assets.core.engines.pgarchive import ArchiveFormatError, CopyFingerprint, TocEntry, combine, read_archive
from backup_assets.core.names import NameError_, TableName
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.records import read_status
from backup_assets.core.verify.checks import (artifact_intact, compare_content, compare_with_manifest, pg_restore_archive,
                     prove_schema, version_problem)

RESTORE_MARK = "backup_assets restore in progress"
SWAP_MARK = "backup_assets restore swapping"


def real_path(path: str | Path) -> str:
    """A file's path with every symlink and `..` resolved, also for a file that does not exist yet (its
    folder's real path): how a target is matched against the catalog's files."""
    return os.path.realpath(os.path.expanduser(str(path)))


def _addresses(host: str | None) -> frozenset[str]:
    """The addresses a host name stands for (a socket path or an unresolvable name stands for itself)."""
    import socket

    if not host or host.startswith("/"):
        return frozenset({host or "/"})
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None)) | {host}
    except OSError:
        return frozenset({host})


@dataclass
class CatalogTargets:
    """What the catalog's sources hold: their databases (server and name) and files (real paths)."""
    databases: list[tuple[frozenset[str], int, str, str]]  # (addresses, port, dbname, source)
    files: dict[str, str]  # real path -> source

    def database_owner(self, host: str | None, port: int, dbname: str) -> str | None:
        addresses = _addresses(host)
        return next((source for addrs, p, name, source in self.databases
                     if p == port and name == dbname and addrs & addresses), None)

    def file_owner(self, path: str | Path) -> str | None:
        return self.files.get(real_path(path))


def catalog_targets(catalog: Catalog) -> CatalogTargets:
    databases, files = [], {}
    for name, src in catalog.sources.items():
        if src.engine == "postgres":
            databases.append((_addresses(src.connection.host), src.connection.port, src.connection.dbname, name))
        else:
            files[real_path(catalog.resolve_path(src.path))] = name
    return CatalogTargets(databases, files)


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
    hooks: list[dict] = field(default_factory=list)
    # a post_restore or verify hook failed after the data was restored (names the safety copy)
    hook_problem: str | None = None

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


class _Hooks:
    """The source's hooks around one restore (see core.restore.hooks for when each stage runs)."""

    def __init__(self, catalog: Catalog, backup: StoredBackup, *, target: str, in_place: bool, endpoint=None,
                 say=quiet):
        m = backup.manifest
        src = catalog.sources.get(m.source)
        self.cfg = src.hooks if src is not None else None
        self.in_place, self.say = in_place, say
        self.args = dict(source=m.source, group=m.group, engine=m.engine, artifact=m.artifact,
                         partition=m.partition, target=target, endpoint=endpoint)
        self.runs: list[hooks.HookRun] = []
        if self.cfg and not in_place and (self.cfg.pre_restore or self.cfg.post_restore):
            say("pre_restore/post_restore hooks skipped: they run when the source's own data is replaced")

    def _stage(self, stage: str, commands: list, **env) -> hooks.HookRun | None:
        if not commands:
            return None
        runs = hooks.run_stage(stage, commands, {**hooks.target_env(**self.args), **env},
                               timeout_s=self.cfg.timeout_s, say=self.say)
        self.runs += runs
        return runs[-1] if runs and not runs[-1].ok else None

    def before(self) -> None:
        if self.cfg and self.in_place:
            failed = self._stage("pre_restore", self.cfg.pre_restore)
            if failed:
                raise BackupError(f"pre_restore hook failed, nothing was changed: {failed.problem}")

    def after_failure(self, error: BackupError) -> BackupError:
        """The restore failed (the target kept its data): bring the application back on it."""
        if self.cfg and self.in_place:
            failed = self._stage("post_restore", self.cfg.post_restore, BACKUP_ASSETS_RESTORE_OK="0")
            if failed:
                return BackupError(f"{error}; then the post_restore hook failed too: {failed.problem}")
        return error

    def after(self, result: RestoreResult) -> RestoreResult:
        if self.cfg:
            env = {"BACKUP_ASSETS_RESTORE_OK": "1", "BACKUP_ASSETS_SAFETY_COPY": result.safety_copy or ""}
            failed = self._stage("post_restore", self.cfg.post_restore, **env) if self.in_place else None
            if failed is None and (self.in_place or self.cfg.verify_in_drill):
                failed = self._stage("verify", self.cfg.verify, **env)
            if failed is not None:
                back = (f"the previous data is kept as {result.safety_copy}: go back to it if the application cannot "
                        "run on the restored data" if result.safety_copy else "no safety copy was kept")
                result.hook_problem = (f"{result.target} was restored from {result.artifact}, but the {failed.stage} "
                                       f"hook failed: {failed.problem}; {back}")
                self.say(f"WARNING: {result.hook_problem}")
        result.hooks = [r.as_dict() for r in self.runs]
        return result


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
    tiers = [tier] if tier else ["daily", "weekly", "monthly", "hourly"]
    what = f"{source}/{group}" + (f" for partition {partition}" if partition else "")
    if partition:  # the partition's backups, in the first tier that has any (a newer one may be torn)
        candidates = next((found for t in tiers if (found := repo.backups(source=source, group=group, tier=t,
                                                                          partition=partition))), [])
        if not candidates:
            raise BackupError(f"no backup of {what} ({'/'.join(tiers)})")
    else:
        candidates = [b for t in tiers for b in repo.backups(source=source, group=group, tier=t)]
    candidates.sort(key=lambda b: (b.manifest.snapshot_at or b.manifest.timestamp, b.manifest.timestamp), reverse=True)
    if not candidates:
        raise BackupError(f"no backup of {what} matches ({'/'.join(tiers)})")
    skipped = []
    for b in candidates:
        failed = sorted(n for n, st in read_status(b).items() if not st.get("passed") and n != "size_anomaly")
        if failed:
            skipped.append(f"{b.artifact_path.name}: its last checks failed ({', '.join(failed)})")
            say(f"skipping {skipped[-1]}")
            continue
        outcome = _intact(b)
        if outcome.passed:
            say(f"chose {b.artifact_path.name}: the newest backup of {what} that verifies"
                + (f" ({len(skipped)} newer skipped)" if skipped else ""))
            return b
        skipped.append(f"{b.artifact_path.name}: {outcome.message}")
        say(f"skipping {skipped[-1]}")
    if len(candidates) == 1:
        raise BackupError(f"refusing to restore: {skipped[0]}")
    raise BackupError(f"no backup of {what} verifies ({len(candidates)} tried: {'; '.join(skipped[:3])})")


def backup_from_file(catalog: Catalog, file: str) -> StoredBackup:
    """A backup named by path: it must lie inside the repository, with its manifest beside it."""
    from backup_assets.core.manifest import manifest_path_for, read_manifest

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

def other_sessions(conn, dbname: str, *, settle_s: float = 1.0) -> list[tuple[int, str]]:
    """Client sessions on `dbname` other than ours. Background workers are not sessions:
    autovacuum workers are cancelled by PostgreSQL itself when a database is renamed. A session
    that is just ending (its client has closed) stays in pg_stat_activity for a moment, so a
    non-empty answer is asked again for up to `settle_s` before it counts."""
    deadline = time.monotonic() + settle_s
    while True:
        rows = conn.execute(
            "SELECT pid, coalesce(application_name, '') || '@' || coalesce(client_addr::text, 'local') "
            "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'",
            (dbname,),
        ).fetchall()
        if not rows or time.monotonic() >= deadline:
            return rows
        time.sleep(0.1)


def restore_plan(catalog: Catalog, backup: StoredBackup, *, target_db: str | None = None,
                 tables: list[str] | None = None, target_file: str | None = None, safety_copy: bool = True) -> str:
    """A sentence saying exactly what will be replaced."""
    m = backup.manifest
    src = catalog.sources.get(m.source)
    if m.engine == "sqlite":
        target = target_file or (str(catalog.resolve_path(src.path)) if src else "?")
        keep = (f"; the current file is kept as {target}.before-restore-YYYYMMDDHHMMSS (the time of the restore, "
                "UTC)") if safety_copy else ""
        return f"replace SQLite file {target} with {backup.artifact_path.name} (partition {m.partition}){keep}"
    db = target_db or (src.connection.dbname if src else m.database)
    where = f"{src.connection.host}:{src.connection.port}" if src else "?"
    if m.format == roles.FORMAT:
        return (f"create the roles of {backup.artifact_path.name} that the server {where} lacks, with their "
                "memberships (existing roles are left as they are)")
    if tables:
        keep = ("; the current rows are kept in a schema named before_restore_YYYYMMDDHHMMSS (the time of the "
                "restore, UTC)") if safety_copy else ""
        return (f"replace the rows of {', '.join(tables)} in database {db} on {where} with those of "
                f"{backup.artifact_path.name} (partition {m.partition}); other tables are left untouched{keep}")
    keep = (f"; the current database is kept as the database {db[:40]}_before_restore_YYYYMMDDHHMMSS (the time "
            "of the restore, UTC)") if safety_copy else ""
    return (f"replace database {db} on {where} with {backup.artifact_path.name} "
            f"(partition {m.partition}, {m.total_rows} rows){keep}")


def restore_postgres(catalog: Catalog, backup: StoredBackup, *, target_db: str | None = None,
                     tables: list[str] | None = None, jobs: int | None = None, safety_copy: bool = True,
                     terminate_connections: bool = False, create_roles: bool = True, say=quiet,
                     origin: dict | None = None) -> RestoreResult:
    """`origin`: who restores, for the restore log (default: this process's user and host, as the CLI)."""
    m = backup.manifest
    if m.engine != "postgres":
        raise BackupError(f"{backup.artifact_path.name} is a {m.engine} backup, not a PostgreSQL one")
    src = catalog.sources.get(m.source)
    if src is None or src.engine != "postgres":
        raise BackupError(f"{backup.artifact_path.name}: source {m.source!r} is not a postgres source in the catalog")
    target = target_db or src.connection.dbname
    if not postgres.valid_db_name(target):
        raise BackupError(f"target database name {target!r} is not a valid identifier (letters, digits, _; 63 at most)")
    wanted: list[TableName] = []
    if tables:
        for text in tables:
            try:
                wanted.append(TableName.parse(text))
            except NameError_ as exc:
                raise BackupError(f"--tables {text!r}: {exc}") from None
        bad = [str(t) for t in wanted if str(t) not in m.row_counts]
        if bad:
            raise BackupError(f"{backup.artifact_path.name} does not hold table(s) {', '.join(bad)} "
                              f"(it holds {', '.join(sorted(m.row_counts)[:10])}{', ...' if len(m.row_counts) > 10 else ''})")
        wanted = list(dict.fromkeys(wanted))
    repository_for(catalog).sweep()
    verify_before_restore(backup)
    ep = endpoint_for(catalog, m.source, target)
    return _audited(catalog, backup, origin, say=say, target=f"database {target} on {ep.host}:{ep.port}",
                    tables=[str(t) for t in wanted], safety_copy=safety_copy,
                    action=lambda: _restore_postgres(catalog, backup, ep, src, target, wanted, jobs=jobs,
                                                     safety_copy=safety_copy, terminate=terminate_connections,
                                                     create_roles=create_roles, say=say))


def _audited(catalog: Catalog, backup: StoredBackup, origin: dict | None, *, say, target: str, tables: list[str],
             safety_copy: bool, action) -> RestoreResult:
    """Run a restore between its two lines in the restore log: nothing is touched unless its start is recorded."""
    m = backup.manifest
    log = audit.RestoreAudit(repository_for(catalog).root, origin, source=m.source, group=m.group, tier=m.tier,
                             partition=m.partition, artifact=m.artifact, target=target, tables=tables,
                             safety_copy=safety_copy)
    log.start()
    try:
        result = action()
    except BaseException as exc:
        warning = log.end(outcome="failed", error=str(exc) or type(exc).__name__)
        if warning:
            say(warning)
        raise
    problem = "; ".join(result.problems) or result.hook_problem
    warning = log.end(outcome="failed" if problem else "ok", error=problem or None,
                      safety_copy_kept=result.safety_copy, duration_s=result.duration_s)
    if warning:
        say(warning)
    return result


def _restore_postgres(catalog: Catalog, backup: StoredBackup, ep: postgres.Endpoint, src, target: str,
                      wanted: list[TableName], *, jobs: int | None, safety_copy: bool, terminate: bool,
                      create_roles: bool, say) -> RestoreResult:
    m = backup.manifest
    started = time.monotonic()
    if m.format == roles.FORMAT:
        return _restore_roles(catalog, backup, ep, say=say, started=started)
    around = _Hooks(catalog, backup, target=target, in_place=target == src.connection.dbname, endpoint=ep, say=say)
    with postgres.connect(ep.with_db("postgres"), what=f"restore of {m.source}: ") as admin:
        problem = version_problem(m, postgres.server_major(admin))
        if problem:
            raise BackupError(f"refusing to restore {backup.artifact_path.name}: {problem}; nothing was changed")
        if wanted and not postgres.database_exists(admin, target):
            raise BackupError(f"database {target} does not exist: restore whole backups into new databases")
        around.before()
        try:
            try:
                if wanted:
                    result = _restore_tables(catalog, backup, ep, wanted, safety_copy=safety_copy, say=say)
                else:
                    result = _restore_whole(catalog, backup, admin, ep, target, jobs=jobs, safety_copy=safety_copy,
                                            terminate=terminate, create_roles=create_roles, say=say)
            except psycopg.Error as exc:
                detail = ep.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                raise BackupError(f"restore of {backup.artifact_path.name} into {target} failed: {detail}") from None
        except BackupError as exc:
            raise around.after_failure(exc) from None
    result.duration_s = round(time.monotonic() - started, 3)
    return around.after(result)


def _progress(backup: StoredBackup, say):
    total = backup.manifest.raw_size_bytes or 1
    return lambda done: say(f"decompressing {100 * done / total:5.1f}%", progress=True)


def saved_globals(catalog: Catalog, source: str, say=quiet) -> roles.Globals | None:
    """The newest roles backup of the source that verifies, if any."""
    repo = repository_for(catalog)
    for b in reversed(repo.backups(source=source, group=roles.GROUP)):
        if artifact_intact(b).passed:
            try:
                return roles.load(b.artifact_path, b.manifest,
                                  crypto.identities_for(catalog, b.manifest, artifact=str(b.artifact_path)))
            except (BackupError, zstandard.ZstdError) as exc:
                say(f"skipping roles backup {b.artifact_path.name}: {exc}")
    return None


def ensure_roles(admin, owners: set[str], saved: roles.Globals | None, *, create: bool, say) -> list[str]:
    """Before a restore: create the roles the target server lacks. With a roles backup of the
    source, every missing role in it is created as it was (attributes, password, memberships), so
    owners and grants survive; owners it does not know are created NOLOGIN."""
    missing_owners = postgres.missing_roles(admin, owners)
    missing_saved = postgres.missing_roles(admin, saved.role_names()) if saved else []
    if (missing_owners or missing_saved) and not create:
        names = sorted(set(missing_owners) | set(missing_saved))
        raise BackupError(f"the target server lacks role(s) {', '.join(names)} of the backup; create them first "
                          "or restore without --no-create-roles; nothing was changed")
    created = roles.create_missing(admin, saved) if saved else []
    for role in postgres.missing_roles(admin, owners):
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        created.append(role)
    if created:
        say(f"created missing role(s) {', '.join(created)}" + ("" if saved else " (NOLOGIN: no roles backup found)"))
    return created


def _restore_roles(catalog: Catalog, backup: StoredBackup, ep: postgres.Endpoint, *, say, started: float) -> RestoreResult:
    """Restore a roles backup: create the roles the server lacks, with their memberships.
    Existing roles are never altered (an operator decides about those)."""
    saved = roles.load(backup.artifact_path, backup.manifest,
                       crypto.identities_for(catalog, backup.manifest, artifact=str(backup.artifact_path)))
    with postgres.connect(ep.with_db("postgres"), what=f"restore of {backup.manifest.source} roles: ") as admin:
        with admin.transaction():
            created = roles.create_missing(admin, saved)
        for problem in roles.apply_settings(admin, saved, source_db=backup.manifest.database, target_db=None,
                                            roles=set(created)):
            say(f"setting not restored: {problem}")
    say(f"created role(s): {', '.join(created) if created else 'none (all exist)'}")
    return RestoreResult(f"{ep.host}:{ep.port}", {}, {}, [], None, round(time.monotonic() - started, 3),
                         backup.manifest.artifact, extra={"created_roles": created})


def _restore_whole(catalog: Catalog, backup: StoredBackup, admin, ep: postgres.Endpoint, target: str, *,
                   jobs: int | None, safety_copy: bool, terminate: bool, create_roles: bool, say) -> RestoreResult:
    m = backup.manifest
    stamp = _stamp()
    exists = postgres.database_exists(admin, target)
    if exists:
        sessions = other_sessions(admin, target)
        if sessions and not terminate:
            raise BackupError(
                f"database {target} has {len(sessions)} other session(s) connected "
                f"({', '.join(s for _, s in sessions[:5])}); stop them or pass --terminate-connections"
            )
    for line in repair_interrupted_swaps(admin):
        say(line)
    temp = postgres.owned_name_with(target, f"_restoring_{stamp}")  # the time stamp whole, the name as long as fits
    target_major = postgres.server_major(admin)
    postgres.create_database(admin, temp, comment=postgres.marker(RESTORE_MARK, target=target))
    swapped = False
    created_roles: list[str] = []
    saved = None
    try:
        with repository_for(catalog).scratch("restore", need_bytes=m.raw_size_bytes) as tmp:
            raw = tmp / "archive.dump"
            scanned = archive_scan.scan(backup.artifact_path, m, copy_to=raw, on_progress=_progress(backup, say),
                                        identities=crypto.identities_for(catalog, m, artifact=str(backup.artifact_path)))
            say(f"decompressed {human_size(scanned.decoded_bytes)}")
            problems = archive_scan.archive_problems(scanned, m)
            if problems:
                raise BackupError(f"{backup.artifact_path.name} does not hold what its manifest says, target left "
                                  f"unchanged: {'; '.join(problems[:5])}")
            entries = None if m.whole_database else archive_scan.group_entries(
                scanned.archive, [TableName.parse(t) for t in m.tables], m.partitions)
            saved = saved_globals(catalog, m.source, say)
            created_roles = ensure_roles(admin, archive_scan.roles_needed(scanned.archive, entries), saved,
                                         create=create_roles, say=say)
            jobs = catalog.restore.jobs if jobs is None else jobs
            say(f"pg_restore --jobs={jobs} into {temp}")
            failpoints.point("restore.temp")
            temp_comment = postgres.marker(RESTORE_MARK, target=target)
            retried = pg_restore_archive(catalog, backup, ep.with_db(temp), raw, entries=entries, jobs=jobs,
                                         target_major=target_major, what=f"restore of {backup.artifact_path.name}: ",
                                         reset=lambda: postgres.recreate_database(admin, temp, comment=temp_comment))
            if retried:
                say(retried)
            # every definition, privilege and large object, as the drill compares them, before anything is swapped
            schema = prove_schema(catalog, backup, scanned, raw, entries, ep.with_db(temp), target_major=target_major,
                                  no_owner=False)
        wanted_tables = [TableName.parse(t) for t in m.row_counts]
        with postgres.connect(ep.with_db(temp)) as conn:
            facts = postgres.table_facts(conn, wanted_tables)
        restored = postgres.fingerprints(ep.with_db(temp), [t for t in wanted_tables if str(t) in facts.row_counts])
        problems = compare_with_manifest(m, facts.row_counts, facts.vectors, facts.indexes)
        problems += compare_content(scanned.tables, restored)
        problems += schema.problems
        if problems:
            raise BackupError(f"restored copy differs from the backup, target left unchanged: {'; '.join(problems[:5])}"
                              f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}")
        safety = _free_safety_name(admin, target) if exists else None
        props = database_properties(scanned.archive, m.database) if m.whole_database else None
        if props is not None:
            for problem in props.apply(admin, temp):
                say(f"database property not restored: {problem}")
        # the database's own comment as the backup holds it (none: none); what restored it is in the result
        restored_comment = sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(target), sql.Literal(props.comment if props is not None else
                                                f"restored by backup_assets from {m.artifact} at {stamp}"))
        if exists:
            _swap(admin, target, temp, safety, restored_comment, terminate=terminate)
            swapped = True
        else:
            with admin.transaction():
                admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(temp), sql.Identifier(target)))
                admin.execute(restored_comment)
            swapped = True
        if saved is not None and m.whole_database:
            # the archive holds the database's own privileges and settings exactly (REVOKEs too); the roles
            # backup adds the settings of the roles this restore created
            for problem in roles.apply_settings(admin, saved, source_db=m.database, target_db=None,
                                                roles=set(created_roles)):
                say(f"setting not restored: {problem}")
        if safety and not safety_copy:
            postgres.drop_database(admin, safety)
            safety = None
    finally:
        if not swapped:
            postgres.drop_database(admin, temp)
    return RestoreResult(target, facts.row_counts, m.row_counts, [], safety, 0.0, m.artifact,
                         extra={"created_roles": created_roles, "fingerprints": {k: v[1] for k, v in restored.items()},
                                "objects": schema.kinds,
                                **({"pg_restore_retried_serially": retried} if retried else {})})


def _free_safety_name(admin, target: str) -> str:
    """`<db>_before_restore_<UTC time>`, a second later when that name is taken (two restores in
    one second)."""
    at = dt.datetime.now(dt.timezone.utc)
    while True:
        name = f"{target[:40]}_before_restore_{at.strftime('%Y%m%d%H%M%S')}"
        if not postgres.database_exists(admin, name):
            return name
        at += dt.timedelta(seconds=1)


SWAP_ATTEMPTS = 5


def _swap(admin, target: str, temp: str, safety: str, restored_comment, *, terminate: bool) -> None:
    """Put the restored copy in the target's place: both renames and the comment in one transaction.

    Nothing about the target is switched off first: the rename itself keeps sessions out. It takes
    the database's exclusive lock, so a client connecting meanwhile waits for the commit and then
    finds the name on the restored copy (or, for that one moment, is told the database was
    renamed); and PostgreSQL refuses the rename while any other session is on the target. A kill
    at any moment leaves either the old database or the restored one under the name, accepting
    connections as before: an uncommitted rename dies with the connection. A session that
    connected while the restore ran makes it refuse and change nothing, unless `terminate`; with it
    the sessions are ended and the rename is tried again, at most SWAP_ATTEMPTS times."""
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        sessions = other_sessions(admin, target)
        if sessions and not terminate:
            raise BackupError(f"{len(sessions)} session(s) connected to {target} while the restore ran "
                              f"({', '.join(s for _, s in sessions[:5])}); nothing was changed "
                              "(stop them or pass --terminate-connections)")
        for pid, _ in sessions:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        try:
            with admin.transaction():
                # the rename waits up to 5 s for ending sessions; a lock held elsewhere must not hang it
                admin.execute("SET LOCAL lock_timeout = '30s'")
                admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(target), sql.Identifier(safety)))
                failpoints.point("restore.swap.renaming")
                admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(temp), sql.Identifier(target)))
                admin.execute(restored_comment)
        except (psycopg.errors.ObjectInUse, psycopg.errors.LockNotAvailable) as e:
            if attempt == SWAP_ATTEMPTS:
                raise BackupError(f"{target} is still in use after {attempt} attempt(s) to swap it "
                                  f"({str(e).splitlines()[0]}); nothing was changed") from None
            continue
        failpoints.point("restore.swap.renamed")
        return


def _release(admin, name: str, comment: str | None, allow: bool = True) -> None:
    """A database out of the swap: connections as they were before it, its own comment back."""
    admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
        sql.Identifier(name), sql.SQL("true" if allow else "false")))
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def repair_interrupted_swaps(admin) -> list[str]:
    """Databases left in a swap by a restore of an earlier version that died (it switched
    connections off for the swap and marked the database): connections back on, their own comment
    back. Also drops the temporary databases of dead restores. Says what it did."""
    done = []
    for name, comment, allow in admin.execute(
            "SELECT datname, shobj_description(oid, 'pg_database'), datallowconn FROM pg_database").fetchall():
        data = postgres.read_marker(comment, SWAP_MARK)
        if data is None or postgres.marker_owner_alive(data):
            continue
        _release(admin, name, data.get("comment"), data.get("allow", True) is not False)
        done.append(f"database {name}: {'connections allowed again, ' if not allow else ''}"
                    "left as it was by an interrupted restore")
    for name in postgres.drop_marked_databases(admin, like="%\\_restoring\\_%", mark=RESTORE_MARK):
        done.append(f"dropped {name}, the temporary database of an interrupted restore")
    return done


def safety_table_name(table: TableName) -> str:
    """The name of a table's copy in the safety schema: its text form, shortened with a hash
    when it would pass PostgreSQL's 63 bytes."""
    text = str(table)
    if len(text.encode()) <= 63:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return text.encode()[:50].decode(errors="ignore") + "_" + digest


def _free_schema_name(conn) -> str:
    """`before_restore_<UTC time>`, a second later when that name is taken."""
    at = dt.datetime.now(dt.timezone.utc)
    while True:
        name = f"before_restore_{at.strftime('%Y%m%d%H%M%S')}"
        if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone():
            return name
        at += dt.timedelta(seconds=1)


def _owned_sequences(conn, table: TableName) -> list[tuple[TableName, str]]:
    """Sequences owned by a column of the table (serial and identity columns), with the column."""
    return [(TableName(s, n), col) for s, n, col in conn.execute(
        """
        SELECT sn.nspname, s.relname, a.attname
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_namespace sn ON sn.oid = s.relnamespace
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
          AND d.refobjid = %s::regclass AND d.deptype IN ('a', 'i')
        """, (postgres._regclass(table),)).fetchall()]


def _not_valid_constraints(conn, tables: list[TableName]) -> list[tuple[TableName, str, str]]:
    """(table, name, definition) of the CHECK and NOT NULL constraints defined on the tables themselves
    (not inherited: those go with their parent's) that are NOT VALID: old rows may violate them."""
    found = []
    for table in tables:
        for name, definition in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
                "AND contype IN ('c', 'n') AND NOT convalidated AND coninhcount = 0 ORDER BY conname",
                (postgres._regclass(table),)).fetchall():
            found.append((table, name, definition))
    return found


class _TableLoader:
    """Streams the archive's data blocks of the chosen tables into COPY, in the caller's
    transaction, fingerprinting exactly what it loads."""

    def __init__(self, conn, members: dict[tuple[str, str], TableName]):
        self.conn = conn
        self.members = members
        self.loaded: dict[TableName, CopyFingerprint] = {}
        self._copy_cm = None
        self._copy = None
        self._fp: CopyFingerprint | None = None

    def on_data(self, entry: TocEntry):
        table = self.members.get((entry.namespace or "", entry.tag))
        if table is None:
            return None
        columns = postgres.copy_columns(self.conn, table)
        # a table without columns has rows all the same (empty lines); COPY takes no empty column list
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table.ident(), sql.SQL(", ").join(sql.Identifier(c) for c in columns)) if columns else \
            sql.SQL("COPY {} FROM STDIN").format(table.ident())
        self._copy_cm = self.conn.cursor().copy(statement)
        self._copy = self._copy_cm.__enter__()
        self._fp = self.loaded[table] = CopyFingerprint()
        return self._feed

    def _feed(self, data: bytes) -> None:
        rows = self._fp.feed(data)
        if rows:
            self._copy.write(rows)

    def on_end(self, entry: TocEntry) -> None:
        if self._copy_cm is not None:
            self._fp.finish()
            cm, self._copy_cm, self._copy = self._copy_cm, None, None
            cm.__exit__(None, None, None)

    def abort(self) -> None:
        if self._copy_cm is not None:
            cm, self._copy_cm, self._copy = self._copy_cm, None, None
            try:
                cm.__exit__(BackupError, BackupError("aborted"), None)
            except Exception:
                pass


def _restore_tables(catalog: Catalog, backup: StoredBackup, ep: postgres.Endpoint, tables: list[TableName], *,
                    safety_copy: bool, say) -> RestoreResult:
    """Replace the rows of exactly `tables` (a partitioned table with its partitions) in one
    transaction, and commit only when every table's row count equals the manifest's and its
    content fingerprint equals the archive's; otherwise roll back: nothing changes."""
    m = backup.manifest
    members: dict[tuple[str, str], TableName] = {}
    for table in tables:
        # a partitioned table's rows are in its leaf partitions' data blocks (it has none itself)
        parts = m.partitions.get(str(table))
        for member in [TableName.parse(p) for p in parts] if parts is not None else [table]:
            members[(member.schema, member.name)] = member
    conn = postgres.connect(ep, autocommit=False, what=f"restore of {m.source}: ")
    loader = _TableLoader(conn, members)
    try:
        missing = postgres.missing_tables(conn, members.values())
        if missing:
            raise BackupError(f"table(s) {', '.join(map(str, missing))} do not exist in {ep.dbname}: restore the "
                              "whole backup into another database (--target-db) instead; nothing was changed")
        postgres.use_output_settings(conn)  # the archive's text is UTF-8, printed with these settings
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("SET LOCAL lock_timeout = '30s'")
        safety_schema = _free_schema_name(conn) if safety_copy else None
        if safety_schema:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(safety_schema)))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(safety_schema),
                sql.Literal(postgres.marker(postgres.SAFETY_MARK, tables=[str(t) for t in tables], artifact=m.artifact))))
        for table in tables:
            # an inheritance parent's rows are its own (ONLY): its children keep theirs, with their own columns;
            # a partitioned table has no rows of its own and is replaced with all its partitions
            only = sql.SQL("") if postgres.relkind(conn, table) == "p" else sql.SQL("ONLY ")
            conn.execute(sql.SQL("LOCK TABLE {}{} IN ACCESS EXCLUSIVE MODE").format(only, table.ident()))
            if safety_schema:
                conn.execute(sql.SQL("CREATE TABLE {} AS SELECT * FROM {}{}").format(
                    sql.Identifier(safety_schema, safety_table_name(table)), only, table.ident()))
            conn.execute(sql.SQL("DELETE FROM {}{}").format(only, table.ident()))
        # rows kept under a NOT VALID constraint may violate it: load without it, then add it back NOT VALID
        not_valid = _not_valid_constraints(conn, list(dict.fromkeys([*tables, *members.values()])))
        for table, name, _definition in not_valid:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table.ident(), sql.Identifier(name)))
        say(f"loading {', '.join(map(str, tables))} in one transaction")
        with open_decompressed(backup.artifact_path, m.raw_size_bytes,
                               crypto.identities_for(catalog, m, artifact=str(backup.artifact_path))) as reader:
            read_archive(reader, loader.on_data, loader.on_end)
        not_loaded = [str(t) for t in members.values() if t not in loader.loaded]
        if not_loaded:
            raise BackupError(f"the archive has no data block for {', '.join(not_loaded)}; nothing was changed")
        for table, name, definition in not_valid:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table.ident(), sql.Identifier(name), sql.SQL(definition)))
        for table in tables:
            for sequence, column in _owned_sequences(conn, table):
                # never move a sequence backwards: ids handed out since the backup stay unused
                last, called = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sequence.ident())).fetchone()
                top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), table.ident())).fetchone()[0]
                value = max(last if called else last - 1, top or 0)
                if value >= 1:
                    conn.execute("SELECT setval(%s::regclass, %s, true)", (postgres._regclass(sequence), value))
        facts = postgres.table_facts(conn, tables)
        restored = {str(t): postgres.fingerprint(conn, t) for t in tables}
        expected = {str(t): m.row_counts[str(t)] for t in tables}
        archive_content = {}
        for table in tables:
            parts = [TableName.parse(p) for p in m.partitions.get(str(table), [])] or [table]
            fps = [loader.loaded[p] for p in parts]
            archive_content[str(table)] = archive_scan.TableContent(sum(f.rows for f in fps), combine([f.hex for f in fps]))
        sub = replace(m, row_counts=expected, vectors={k: v for k, v in m.vectors.items() if k in expected}, indexes=[])
        problems = compare_with_manifest(sub, facts.row_counts, facts.vectors, [])
        problems += compare_content(archive_content, restored)
        if problems:
            raise BackupError(f"the loaded rows differ from the backup, rolled back, nothing changed: "
                              f"{'; '.join(problems[:5])}")
        conn.commit()
    except BaseException as exc:
        loader.abort()
        try:
            conn.rollback()
        except Exception:
            pass
        if isinstance(exc, psycopg.Error):
            detail = ep.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise BackupError(f"loading {', '.join(map(str, tables))} failed, rolled back, nothing changed: {detail}") from None
        if isinstance(exc, (zstandard.ZstdError, ArchiveFormatError)):
            raise BackupError(f"{backup.artifact_path}: {exc}; rolled back, nothing changed") from None
        raise
    finally:
        conn.close()
    return RestoreResult(ep.dbname, facts.row_counts, expected, [],
                         f"{ep.dbname}.{safety_schema}" if safety_schema else None, 0.0, m.artifact,
                         extra={"fingerprints": {k: v[1] for k, v in restored.items()}})


# -- SQLite -------------------------------------------------------------------------------------

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
