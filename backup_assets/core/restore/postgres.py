"""Restoring a PostgreSQL backup: whole databases into a new database that is proven and then swapped in with
a safety copy of what it replaces (one transaction), the server's roles first where the backup has them."""

from __future__ import annotations

import datetime as dt
import time

import psycopg
import zstandard
from psycopg import sql

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto, failpoints
from backup_assets.core.verify import archive_scan, toc_selection
from backup_assets.core.backup import roles
from backup_assets.core.verify.schema_compare import database_properties
from backup_assets.core.artifact import human_size
from backup_assets.core.backup.take import primary_endpoint_for, repository_for
from backup_assets.core.engines import postgres
from backup_assets.core.engines import pg_content
from backup_assets.core.engines import pg_databases
from backup_assets.core.names import NameError_, TableName
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.restore_drill import (compare_content, compare_with_manifest, pg_restore_archive,
                                                     prove_schema, restore_jobs, version_problem)
from backup_assets.core.restore.choose import (RESTORE_MARK, RestoreResult, SWAP_MARK, _Hooks, _audited, _progress,
                                               _stamp, quiet, verify_before_restore)
from backup_assets.core.restore.tables import _restore_tables


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
    where = f"{src.written().host}:{src.written().port}" if src else "?"
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
    if not pg_databases.valid_db_name(target):
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
    ep = primary_endpoint_for(catalog, m.source, target)
    return _audited(catalog, backup, origin, say=say, target=f"database {target} on {ep.host}:{ep.port}",
                    tables=[str(t) for t in wanted], safety_copy=safety_copy,
                    action=lambda: _restore_postgres(catalog, backup, ep, src, target, wanted, jobs=jobs,
                                                     safety_copy=safety_copy, terminate=terminate_connections,
                                                     create_roles=create_roles, say=say))


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
        if wanted and not pg_databases.database_exists(admin, target):
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
    exists = pg_databases.database_exists(admin, target)
    if exists:
        sessions = other_sessions(admin, target)
        if sessions and not terminate:
            raise BackupError(
                f"database {target} has {len(sessions)} other session(s) connected "
                f"({', '.join(s for _, s in sessions[:5])}); stop them or pass --terminate-connections"
            )
    for line in repair_interrupted_swaps(admin):
        say(line)
    temp = pg_databases.owned_name_with(target, f"_restoring_{stamp}")  # the time stamp whole, the name as long as fits
    target_major = postgres.server_major(admin)
    pg_databases.create_database(admin, temp, comment=pg_databases.marker(RESTORE_MARK, target=target))
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
            entries = None if m.whole_database else toc_selection.group_entries(
                scanned.archive, [TableName.parse(t) for t in m.tables], m.partitions)
            saved = saved_globals(catalog, m.source, say)
            created_roles = ensure_roles(admin, toc_selection.roles_needed(scanned.archive, entries), saved,
                                         create=create_roles, say=say)
            jobs = restore_jobs(catalog, raw, jobs)
            say(f"pg_restore --jobs={jobs} into {temp}")
            failpoints.point("restore.temp")
            temp_comment = pg_databases.marker(RESTORE_MARK, target=target)
            retried = pg_restore_archive(catalog, backup, ep.with_db(temp), raw, entries=entries, jobs=jobs,
                                         target_major=target_major, what=f"restore of {backup.artifact_path.name}: ",
                                         reset=lambda: pg_databases.recreate_database(admin, temp, comment=temp_comment))
            if retried:
                say(retried)
            # every definition, privilege and large object, as the drill compares them, before anything is swapped
            schema = prove_schema(catalog, backup, scanned, raw, entries, ep.with_db(temp), target_major=target_major,
                                  no_owner=False)
        wanted_tables = [TableName.parse(t) for t in m.row_counts]
        with postgres.connect(ep.with_db(temp)) as conn:
            facts = postgres.table_facts(conn, wanted_tables)
        restored = pg_content.fingerprints(ep.with_db(temp), [t for t in wanted_tables if str(t) in facts.row_counts])
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
            pg_databases.drop_database(admin, safety)
            safety = None
    finally:
        if not swapped:
            pg_databases.drop_database(admin, temp)
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
        if not pg_databases.database_exists(admin, name):
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
        data = pg_databases.read_marker(comment, SWAP_MARK)
        if data is None or pg_databases.marker_owner_alive(data):
            continue
        _release(admin, name, data.get("comment"), data.get("allow", True) is not False)
        done.append(f"database {name}: {'connections allowed again, ' if not allow else ''}"
                    "left as it was by an interrupted restore")
    for name in pg_databases.drop_marked_databases(admin, like="%\\_restoring\\_%", mark=RESTORE_MARK):
        done.append(f"dropped {name}, the temporary database of an interrupted restore")
    return done
