"""restore_drill: the backup restored into a scratch database (or a copy of the SQLite file) and compared with what
was dumped, by rows, schema, privileges and the database's own properties, pg_upgrade's test per object."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import zstandard

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto, failpoints
from backup_assets.core.verify import archive_scan, toc_selection
from backup_assets.core.restore import hooks
from backup_assets.core.backup import roles
from backup_assets.core.verify import schema_compare
from backup_assets.core.artifact import decompress_to
from backup_assets.core.backup.take import repository_for
from backup_assets.core.engines import postgres, sqlite
from backup_assets.core.engines import pg_content
from backup_assets.core.engines import pg_databases
from backup_assets.core.manifest import Manifest
from backup_assets.core.names import TableName
from backup_assets.core.outcome import Outcome
from backup_assets.core.repository import StoredBackup
from backup_assets.core.secrets import scrub
from backup_assets.core.verify.readable import _pg_restore_for


DRILL_MARK = "backup_assets restore drill"


def compare_with_manifest(m: Manifest, counts: dict[str, int], vectors: dict, indexes: list[dict],
                          extensions: dict[str, str] | None = None) -> list[str]:
    """Every difference between what was restored and what the manifest says was dumped."""
    problems = []
    for table, expected in sorted(m.row_counts.items()):
        got = counts.get(table)
        if got is None:
            problems.append(f"table {table} is missing")
        elif got != expected:
            problems.append(f"{table} has {got} rows, the manifest says {expected}")
    for table, cols in sorted(m.vectors.items()):
        for col, facts in sorted(cols.items()):
            got = vectors.get(table, {}).get(col)
            if got is None:
                problems.append(f"vector column {table}.{col} is missing")
                continue
            for key in ("type", "dims", "non_null"):
                if got.get(key) != facts.get(key):
                    problems.append(f"{table}.{col} {key} is {got.get(key)}, the manifest says {facts.get(key)}")
    have = {(i["table"], i["name"]): i["method"] for i in indexes}
    for idx in m.indexes:
        method = have.get((idx["table"], idx["name"]))
        if method is None:
            problems.append(f"index {idx['name']} ({idx['method']}) on {idx['table']} is missing")
        elif method != idx["method"]:
            problems.append(f"index {idx['name']} is {method}, the manifest says {idx['method']}")
    if extensions is not None:
        for ext in m.extensions:
            if ext not in extensions:
                problems.append(f"extension {ext} is missing")
    return problems


def drill_endpoint(catalog: Catalog, source: str) -> postgres.Endpoint:
    src = catalog.sources[source]
    server = src.drill_server or src.written()  # a standby cannot hold a scratch database
    return postgres.Endpoint(server.host, server.port, server.user, server.dbname, server.password(), server.sslmode,
                             str(catalog.resolve_path(server.sslrootcert)) if server.sslrootcert else None)


def cleanup_drill_leftovers(conn, *, protect: set[str]) -> list[str]:
    """Drop databases left by interrupted drills (marked by us, named drill_*), never another."""
    return pg_databases.drop_marked_databases(conn, like="drill\\_%", mark=DRILL_MARK, protect=protect)


def drill_name(source: str, group: str, partition: str, n: int = 1) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", f"drill_{source}_{group}_{partition.replace('-', '')}".lower())
    return pg_databases.owned_name(f"{base[:30]}_{n}")


def restore_drill(catalog: Catalog, backup: StoredBackup, *, jobs: int | None = None) -> Outcome:
    m = backup.manifest
    repository_for(catalog).sweep()
    if m.format == roles.FORMAT:
        return _roles_drill(catalog, backup)
    if m.engine == "sqlite":
        return _sqlite_drill(catalog, backup)
    return _postgres_drill(catalog, backup, jobs=jobs)


def _roles_drill(catalog: Catalog, backup: StoredBackup, saved: roles.Globals | None = None) -> Outcome:
    """Create the saved roles the drill server lacks, with their memberships, in a transaction
    that is rolled back: the statements are proven valid and the server is left as it was."""
    m, path = backup.manifest, backup.artifact_path
    started = time.monotonic()
    try:
        if saved is None:
            saved = roles.load(path, m, crypto.identities_for(catalog, m, artifact=str(path)))
        ep = drill_endpoint(catalog, m.source)
        with postgres.connect(ep, what=f"restore drill of {m.source}/{m.group}: ") as conn:
            tried = roles.drill(conn, saved)
    except (BackupError, zstandard.ZstdError) as exc:
        return Outcome.failure(exc, f"{path}: roles drill failed: {exc}")
    except psycopg.Error as exc:
        return Outcome(False, f"{path}: roles drill failed: {str(exc).strip().splitlines()[0]}")
    rto = time.monotonic() - started
    return Outcome(True, f"{path.name}: {len(saved.roles)} role(s) checked; {len(tried)} missing on the drill server "
                         "were created and rolled back", {"rto_s": round(rto, 3), "roles": len(saved.roles),
                                                          "roles_created_and_rolled_back": tried})


def _postgres_drill(catalog: Catalog, backup: StoredBackup, *, jobs: int | None, prepared=None) -> Outcome:
    try:
        return _postgres_drill_steps(catalog, backup, jobs=jobs, prepared=prepared)
    except psycopg.Error as exc:  # e.g. the drill server went away: a failed drill, said in one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Outcome(False, f"{backup.artifact_path}: restore drill failed: {scrub(text)}")
    except BackupError as exc:  # e.g. a role that may not create the scratch database
        return Outcome.failure(exc, f"{backup.artifact_path}: restore drill failed: {exc}")


def _drop_scratch(admin, ep: postgres.Endpoint, name: str) -> None:
    """Drop the drill's scratch database, over a new connection when the old one is gone; if even
    that fails, its name says its owner, and the next drill after this process drops it."""
    try:
        pg_databases.drop_database(admin, name)
        return
    except psycopg.Error:
        pass
    try:
        with postgres.connect(ep) as again:
            pg_databases.drop_database(again, name)
    except (psycopg.Error, BackupError):
        pass


def _postgres_drill_steps(catalog: Catalog, backup: StoredBackup, *, jobs: int | None, prepared=None) -> Outcome:
    """The drill; `prepared` is (scan, plain archive) from a pass that already read the artifact."""
    m, path = backup.manifest, backup.artifact_path
    src = catalog.sources.get(m.source)
    if src is None or src.engine != "postgres":
        return Outcome(False, f"{path}: source {m.source!r} is not a postgres source in the catalog")
    ep = drill_endpoint(catalog, m.source)
    protected = {src.connection.dbname, ep.dbname, "postgres", "template0", "template1"}
    repo = repository_for(catalog)
    started = time.monotonic()
    with postgres.connect(ep, what=f"restore drill of {m.source}/{m.group}: ") as admin:
        cleaned = cleanup_drill_leftovers(admin, protect=protected)
        target_major = postgres.server_major(admin)
        problem = version_problem(m, target_major)
        if problem:
            return Outcome(False, f"{path}: {problem}")
        name = None
        for n in range(1, 100):
            candidate = drill_name(m.source, m.group, m.partition, n)
            if candidate in protected:
                continue
            if not pg_databases.database_exists(admin, candidate):
                name = candidate
                break
            if not pg_databases.has_marker(pg_databases.database_comment(admin, candidate), DRILL_MARK):
                return Outcome(False, f"{path}: database {candidate} exists and is not a restore drill's; refusing to touch it")
        if name is None:
            return Outcome(False, f"{path}: no free drill database name")
        comment = pg_databases.marker(DRILL_MARK, name=name)
        # the scratch database is created (the server copying its template, WAL and fsyncs: 0.15 s on this
        # project's bench machine) while the archive is decoded here; `admin` is not used again until it is there
        scratch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drill-scratch")
        creating = scratch_pool.submit(pg_databases.create_database, admin, name, comment=comment)
        scratch_pool.shutdown(wait=False)
        scratch_s = 0.0
        try:
            with contextlib.ExitStack() as stack:
                t0 = time.monotonic()
                if prepared is not None:
                    archive, raw = prepared
                else:
                    raw = stack.enter_context(repo.scratch("drill", need_bytes=m.raw_size_bytes)) / "archive.dump"
                    try:
                        archive = archive_scan.scan(path, m, copy_to=raw,
                                                    identities=crypto.identities_for(catalog, m, artifact=str(path)))
                    except BackupError as exc:
                        return Outcome.failure(exc, f"restore drill: {exc}",
                                       {"drill_database": name, "leftovers_dropped": cleaned})
                decompress_s = time.monotonic() - t0 if prepared is None else archive.seconds
                t_scratch = time.monotonic()
                creating.result()  # its error (no CREATEDB) is the drill's
                scratch_s = time.monotonic() - t_scratch
                failpoints.point("drill.decoded")
                target = ep.with_db(name)
                entries = None if m.whole_database else toc_selection.group_entries(
                    archive.archive, [TableName.parse(t) for t in m.tables], m.partitions)
                missing = postgres.missing_roles(admin, toc_selection.roles_needed(archive.archive, entries))
                # a role that is not a superuser cannot give objects to other roles: it restores without owners
                superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
                t1 = time.monotonic()
                retried = pg_restore_archive(
                    catalog, backup, target, raw, entries=entries, jobs=jobs, target_major=target_major,
                    no_owner=bool(missing) or not superuser, what=f"restore drill of {path.name}: ",
                    reset=lambda: pg_databases.recreate_database(admin, name, comment=comment))
                restore_s = time.monotonic() - t1
                t2 = time.monotonic()
                schema = prove_schema(catalog, backup, archive, raw, entries, target, target_major=target_major,
                                      no_owner=bool(missing) or not superuser)
                schema_s = time.monotonic() - t2
            t3 = time.monotonic()
            with postgres.connect(target) as conn:
                wanted = [TableName.parse(t) for t in m.row_counts]
                facts = postgres.table_facts(conn, wanted)
                exts = dict(conn.execute("SELECT extname, extversion FROM pg_extension").fetchall())
            restored = pg_content.fingerprints(target, [t for t in wanted if str(t) in facts.row_counts])
            content_s = time.monotonic() - t3
            rto = time.monotonic() - started
            problems = compare_with_manifest(m, facts.row_counts, facts.vectors, facts.indexes, exts)
            problems += compare_content(archive.tables, restored)
            problems += schema.problems
            hook_runs, hook_problem = drill_verify_hook(catalog, backup, name, endpoint=target)
            problems += [hook_problem] if hook_problem else []
            problems += _database_properties_problems(admin, archive, m, name)
        finally:
            t4 = time.monotonic()
            if creating.exception() is None:  # (waits for it) a database it did not create is not dropped
                _drop_scratch(admin, ep, name)
            scratch_s += time.monotonic() - t4
    meta = {
        "rto_s": round(rto, 3), "decompress_s": round(decompress_s, 3), "pg_restore_s": round(restore_s, 3),
        # where a small database's drill spends its time (make bench): the rest of rto_s is catalog reads
        "phases_s": {"scratch_database": round(scratch_s, 3), "decode": round(decompress_s, 3),
                     "pg_restore": round(restore_s, 3), "schema_compare": round(schema_s, 3),
                     "counts_and_fingerprints": round(content_s, 3)},
        "drill_database": name, "drill_server": f"{ep.host}:{ep.port}", "row_counts": facts.row_counts,
        "tables": len(facts.row_counts), "rows": sum(facts.row_counts.values()),
        "leftovers_dropped": cleaned,
        "archive_fingerprints": archive.fingerprints(),
        "restored_fingerprints": {k: {"rows": r, "fingerprint": f} for k, (r, f) in sorted(restored.items())},
        "owners_restored": not missing and superuser, "missing_roles": missing,
        **({"verify_hook": hook_runs} if hook_runs else {}),
        **({"pg_restore_retried_serially": retried} if retried else {}),
        "objects": schema.kinds, "objects_compared": "definitions" if schema.exact else "presence only (another major)",
        "large_objects": schema.large_objects, "schema_differences": len(schema.problems),
    }
    if problems:
        return Outcome(False, f"{path}: restore differs from the archive or manifest: {'; '.join(problems[:8])}"
                              f"{f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''}", meta)
    note = f" (roles {', '.join(missing)} are missing on {ep.host}:{ep.port}: restored without owners)" if missing else ""
    if not superuser and not missing:
        note = f" (the drill's role is not a superuser on {ep.host}:{ep.port}: restored without owners and privileges)"
    if retried:
        note += "; the parallel pg_restore failed and a serial one succeeded"
    return Outcome(True, f"{path.name}: restored into {name} in {rto:.1f}s, {len(facts.row_counts)} table(s) and "
                         f"{sum(facts.row_counts.values())} rows match the manifest, content fingerprints match "
                         f"the archive, {sum(schema.kinds.values())} object(s) match its definitions"
                         f"{'' if schema.exact else ' (presence only: another major version)'}{note}", meta)


def prove_schema(catalog: Catalog, backup: StoredBackup, scanned: archive_scan.ArchiveScan, raw: Path,
                 entries: list | None, target: postgres.Endpoint, *, target_major: int,
                 no_owner: bool) -> schema_compare.Comparison:
    """The restored database `target` against the archive's definitions (see schema_compare) and its large
    objects (when the restored entries hold them)."""
    m = backup.manifest
    src = catalog.sources.get(m.source)
    pg_dump, pg_dump_major = postgres.find_tool("pg_dump", target_major, src.pg_bin_dir if src else None)
    result = schema_compare.compare(scanned.archive, raw, entries, target,
                                    pg_restore=_pg_restore_for(catalog, m, at_most=target_major),
                                    pg_dump=pg_dump, pg_dump_major=pg_dump_major, no_owner=no_owner)
    chosen = scanned.archive.entries if entries is None else entries
    if any(e.desc == "BLOBS" for e in chosen):
        with postgres.connect(target) as conn:
            got = schema_compare.large_objects(conn)
        want = tuple(scanned.large_objects)
        result.large_objects = {"count": got[0], "bytes": got[1]}
        if got[:2] != want[:2]:
            result.problems.append(f"large objects: {got[0]} ({got[1]} bytes) after the restore, the archive holds "
                                   f"{want[0]} ({want[1]} bytes)")
        elif got[2] != want[2]:
            result.problems.append(f"large objects differ in content from the archive's (fingerprint {got[2]}, "
                                   f"archive {want[2]})")
    return result


def _database_properties_problems(admin, scanned: archive_scan.ArchiveScan, m: Manifest, name: str) -> list[str]:
    """The database's own privileges and settings (which a whole restore applies) must apply to the drill's
    copy: proven by applying them (as a superuser only: a grantor's own grants need its authorization)."""
    if not m.whole_database or not admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        return []
    props = schema_compare.database_properties(scanned.archive, m.database)
    if props is None:
        return []
    props = dataclasses.replace(props, owner=None)  # the scratch database keeps its owner: it drops it
    return [f"database privilege or setting does not apply: {p}" for p in props.apply(admin, name)]


def compare_content(archive: dict, restored: dict[str, tuple[int, str]]) -> list[str]:
    """Every table whose restored rows differ from the archive's (count or content fingerprint)."""
    problems = []
    for key, content in sorted(archive.items()):
        got = restored.get(key)
        if got is None:
            problems.append(f"table {key} is missing after the restore")
        elif got[0] != content.rows:
            problems.append(f"{key} has {got[0]} rows after the restore, the archive holds {content.rows}")
        elif got[1] != content.fingerprint:
            problems.append(f"{key}: restored rows differ in content from the archive's "
                            f"(fingerprint {got[1]}, archive {content.fingerprint})")
    return problems


def version_problem(m: Manifest, target_major: int) -> str | None:
    """Why an archive cannot go into a server of `target_major` (None: it can)."""
    source_major = server_major_of(m)
    if source_major is not None and target_major < source_major:
        return (f"the backup is of PostgreSQL {source_major} and the target server is PostgreSQL {target_major}: "
                "restoring into an older major version is not supported")
    return None


def server_major_of(m: Manifest) -> int | None:
    match = re.match(r"(\d+)", m.server_version or "")
    return int(match.group(1)) if match else None


# a decoded archive smaller than this restores serially unless jobs are asked for: a parallel pg_restore
# dispatches each object to a worker, which gains nothing where there is little data to share and loses on a
# busy machine (PostgreSQL's regression database, 3 MB in 2,400 objects: idle, 2.0-2.1 s with one job and 2.2 s
# with two; beside other work 2.0-2.3 s and 3.1-3.6 s; a 48 MB archive the same either way; a 480 MB one 20%
# faster with two), and one job never meets PostgreSQL's parallel-restore race
SERIAL_BELOW_BYTES = 64 << 20


def restore_jobs(catalog: Catalog, raw: Path, jobs: int | None) -> int:
    """pg_restore's jobs for the decoded archive `raw`: the ones asked for (--jobs, the restore job's config),
    else one for a small archive and the catalog's restore.jobs for the rest."""
    if jobs is not None:
        return max(1, jobs)
    return 1 if raw.stat().st_size < SERIAL_BELOW_BYTES else catalog.restore.jobs


def pg_restore_archive(catalog: Catalog, backup: StoredBackup, target: postgres.Endpoint, raw: Path, *,
                       entries: list | None, jobs: int | None, target_major: int, no_owner: bool = False,
                       what: str = "", reset=None) -> str | None:
    """pg_restore of a decoded archive: all of it, or the given TOC entries (a --use-list file), with
    `jobs` parallel jobs (None: `restore_jobs`). A parallel restore that fails is tried once
    more serially into a fresh target (`reset` empties it) before the failure counts: PostgreSQL races on
    some schemas (two ATTACH PARTITIONs of one partitioned index on two levels). Returns what happened then
    (for the log and the metadata), None when the first try succeeded."""
    tool = _pg_restore_for(catalog, backup.manifest, at_most=target_major)
    list_file = toc_selection.write_list_file(entries, raw.with_suffix(".list")) if entries is not None else None
    jobs = restore_jobs(catalog, raw, jobs)
    try:
        postgres.pg_restore(target, raw, tool=tool, jobs=jobs, use_list=list_file, no_owner=no_owner, what=what)
        return None
    except BackupError as exc:
        if jobs <= 1 or reset is None:
            raise
        reset()
        postgres.pg_restore(target, raw, tool=tool, jobs=1, use_list=list_file, no_owner=no_owner, what=what)
        return f"pg_restore --jobs={jobs} failed ({exc}); a serial pg_restore (--jobs=1) into a fresh database succeeded"


def drill_verify_hook(catalog: Catalog, backup: StoredBackup, target: str, *, endpoint=None) -> tuple[list, str | None]:
    """The source's verify hook against the drill's scratch target, when the catalog says it works on any
    target (`hooks.verify_in_drill`). Returns (runs, problem)."""
    m = backup.manifest
    src = catalog.sources.get(m.source)
    if src is None or not src.hooks.verify_in_drill or not src.hooks.verify or m.format == roles.FORMAT:
        return [], None
    env = hooks.target_env(source=m.source, group=m.group, engine=m.engine, artifact=m.artifact, partition=m.partition,
                           target=target, endpoint=endpoint, drill=True)
    runs = hooks.run_stage("verify", src.hooks.verify, env, timeout_s=src.hooks.timeout_s, say=lambda _m: None)
    problem = f"verify hook failed on the drill's copy: {runs[-1].problem}" if runs and not runs[-1].ok else None
    return [r.as_dict() for r in runs], problem


def _sqlite_drill(catalog: Catalog, backup: StoredBackup, decoded: Path | None = None) -> Outcome:
    """Restore into a temporary file (or use the copy a stream decoded, `decoded`) and compare."""
    m, path = backup.manifest, backup.artifact_path
    started = time.monotonic()
    with repository_for(catalog).scratch("drill", need_bytes=0 if decoded is not None else m.raw_size_bytes) as tmp:
        copy = tmp / "drill.db"
        try:
            if decoded is not None:
                os.replace(decoded, copy)  # the drill's copy may be changed by a verify hook: it is the last user
            else:
                decompress_to(path, copy, expected_size=m.raw_size_bytes,
                              identities=crypto.identities_for(catalog, m, artifact=str(path)))
            problems_found = sqlite.integrity_problems(copy)
            if problems_found:
                return Outcome(False, f"{path}: integrity_check failed after restore: {'; '.join(problems_found[:5])}")
            counts = sqlite.row_counts(copy)
            idx = sqlite.indexes(copy)
            setting_problems = sqlite.apply_file_settings(copy, m.file_settings)
            hook_runs, hook_problem = drill_verify_hook(catalog, backup, str(copy))
        except (zstandard.ZstdError, BackupError, OSError) as exc:
            return Outcome.failure(exc, f"{path}: restore drill failed: {exc}")
        except Exception as exc:  # sqlite3.DatabaseError and friends
            return Outcome(False, f"{path}: restored copy is not a usable SQLite database: {exc}")
    rto = time.monotonic() - started
    problems = compare_with_manifest(m, counts, {}, idx) + setting_problems + ([hook_problem] if hook_problem else [])
    meta = {"rto_s": round(rto, 3), "row_counts": counts, "tables": len(counts), "rows": sum(counts.values()),
            **({"verify_hook": hook_runs} if hook_runs else {})}
    if problems:
        return Outcome(False, f"{path}: restore differs from the manifest: {'; '.join(problems[:8])}", meta)
    return Outcome(True, f"{path.name}: restored in {rto:.2f}s, {len(counts)} table(s) match the manifest", meta)
