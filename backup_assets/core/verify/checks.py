"""Proving a backup: intact, readable, restorable to exactly what was dumped.

Each function returns an `Outcome` (passed, a one-line message naming the artifact and what
differs, and metadata) rather than raising, so the Dagster checks and the CLI report the same
thing. Restore drills go into scratch targets that are always removed, also after a failure; a
drill killed midway leaves a database marked as a drill, which the next drill removes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import zstandard

from backup_assets.catalog import AUTO_STREAM_CPUS, Catalog
from backup_assets.core import BackupError, crypto, failpoints
from backup_assets.core.verify import archive_scan
from backup_assets.core.restore import hooks
from backup_assets.core.backup import roles
from backup_assets.core.verify import schema_compare
from backup_assets.core.artifact import decompress_to, scan_artifact, sha256_file
from backup_assets.core.backup.take import repository_for
from backup_assets.core.engines import postgres, sqlite
from backup_assets.core.manifest import MANIFEST_SUFFIX, Manifest, read_manifest
from backup_assets.core.names import TableName
from backup_assets.core.outcome import Outcome
from backup_assets.core.repository import LocalRepository, StoredBackup
from backup_assets.core.secrets import scrub

DRILL_MARK = "backup_assets restore drill"


# -- finding the backup of a partition ----------------------------------------------------------

def find_backup(catalog: Catalog, source: str, group: str, tier: str, partition: str) -> StoredBackup:
    """The newest complete backup of a partition: found by its manifest (an artifact without one
    is never a backup and hides nothing), read strictly (a damaged or edited manifest is an error,
    not a reason to fall back silently)."""
    repo = repository_for(catalog)
    engine = catalog.sources[source].engine
    folder = repo.folder(engine, tier)
    prefix = f"{source}-{group}-{partition}-"
    manifests = sorted(p for p in folder.glob(prefix + "*" + MANIFEST_SUFFIX)
                       if not p.name.startswith(".")) if folder.is_dir() else []
    if not manifests:
        orphans = [p.name for p in repo.orphans() if p.name.startswith(prefix) and p.parent == folder]
        also = f" ({', '.join(orphans)} has no manifest: not a backup)" if orphans else ""
        raise BackupError(f"no backup of {source}/{group}/{tier} partition {partition} in {folder}{also}")
    path = manifests[-1]
    manifest = read_manifest(path)
    artifact = path.name[: -len(MANIFEST_SUFFIX)]
    if manifest.artifact != artifact:
        raise BackupError(f"manifest {path} describes {manifest.artifact}, not {artifact}")
    if (manifest.source, manifest.group, manifest.tier, manifest.partition) != (source, group, tier, partition):
        raise BackupError(f"manifest {path} describes {manifest.asset_key} partition {manifest.partition}, "
                          f"not {source}/{group}/{tier} partition {partition}")
    return StoredBackup(manifest, path)


# -- artifact_intact ----------------------------------------------------------------------------

def artifact_intact(backup: StoredBackup, identities=None) -> Outcome:
    """Size and SHA-256 match the manifest, and the stream decrypts (when encrypted and the
    identities are given) and decodes to its end. Without identities an encrypted artifact is
    checked by size and SHA-256 (of the ciphertext) only, which needs no key."""
    m, path = backup.manifest, backup.artifact_path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Outcome(False, f"{path}: artifact is missing")
    if size != m.size_bytes:
        return Outcome(False, f"{path}: size {size} bytes differs from the manifest's {m.size_bytes}",
                       {"size_bytes": size, "manifest_size_bytes": m.size_bytes})
    digest, decode_error, decoded = scan_artifact(path, m.raw_size_bytes, identities, encrypted=bool(m.encryption))
    if digest != m.sha256:
        also = f"; {decode_error}" if decode_error else ""
        return Outcome(False, f"{path}: sha256 {digest} differs from the manifest's {m.sha256}{also}",
                       {"sha256": digest, "manifest_sha256": m.sha256})
    if decode_error:
        return Outcome(False, f"{path}: {decode_error}")
    if not decoded:
        return Outcome(True, f"{path.name}: {m.size_human}, sha256 of the encrypted artifact verified (not decrypted: "
                             "no identity here)", {"sha256": m.sha256, "size_bytes": size, "decoded": False})
    return Outcome(True, f"{path.name}: {m.size_human}, sha256 and {'age and ' if m.encryption else ''}zstd stream "
                         "verified", {"sha256": m.sha256, "size_bytes": size, "decoded_bytes": m.raw_size_bytes})


# -- archive_readable ---------------------------------------------------------------------------

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


# -- comparing a restored database with the manifest --------------------------------------------

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


# -- restore drill ------------------------------------------------------------------------------

def drill_endpoint(catalog: Catalog, source: str) -> postgres.Endpoint:
    src = catalog.sources[source]
    server = src.drill_server or src.connection
    return postgres.Endpoint(server.host, server.port, server.user, server.dbname, server.password(), server.sslmode,
                             str(catalog.resolve_path(server.sslrootcert)) if server.sslrootcert else None)


def cleanup_drill_leftovers(conn, *, protect: set[str]) -> list[str]:
    """Drop databases left by interrupted drills (marked by us, named drill_*), never another."""
    return postgres.drop_marked_databases(conn, like="drill\\_%", mark=DRILL_MARK, protect=protect)


def drill_name(source: str, group: str, partition: str, n: int = 1) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", f"drill_{source}_{group}_{partition.replace('-', '')}".lower())
    return postgres.owned_name(f"{base[:30]}_{n}")


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
        postgres.drop_database(admin, name)
        return
    except psycopg.Error:
        pass
    try:
        with postgres.connect(ep) as again:
            postgres.drop_database(again, name)
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
            if not postgres.database_exists(admin, candidate):
                name = candidate
                break
            if not postgres.has_marker(postgres.database_comment(admin, candidate), DRILL_MARK):
                return Outcome(False, f"{path}: database {candidate} exists and is not a restore drill's; refusing to touch it")
        if name is None:
            return Outcome(False, f"{path}: no free drill database name")
        postgres.create_database(admin, name, comment=postgres.marker(DRILL_MARK, name=name))
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
                failpoints.point("drill.decoded")
                target = ep.with_db(name)
                entries = None if m.whole_database else archive_scan.group_entries(
                    archive.archive, [TableName.parse(t) for t in m.tables], m.partitions)
                missing = postgres.missing_roles(admin, archive_scan.roles_needed(archive.archive, entries))
                # a role that is not a superuser cannot give objects to other roles: it restores without owners
                superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
                t1 = time.monotonic()
                comment = postgres.marker(DRILL_MARK, name=name)
                retried = pg_restore_archive(
                    catalog, backup, target, raw, entries=entries, jobs=jobs, target_major=target_major,
                    no_owner=bool(missing) or not superuser, what=f"restore drill of {path.name}: ",
                    reset=lambda: postgres.recreate_database(admin, name, comment=comment))
                restore_s = time.monotonic() - t1
                schema = prove_schema(catalog, backup, archive, raw, entries, target, target_major=target_major,
                                      no_owner=bool(missing) or not superuser)
            with postgres.connect(target) as conn:
                wanted = [TableName.parse(t) for t in m.row_counts]
                facts = postgres.table_facts(conn, wanted)
                exts = dict(conn.execute("SELECT extname, extversion FROM pg_extension").fetchall())
            restored = postgres.fingerprints(target, [t for t in wanted if str(t) in facts.row_counts])
            rto = time.monotonic() - started
            problems = compare_with_manifest(m, facts.row_counts, facts.vectors, facts.indexes, exts)
            problems += compare_content(archive.tables, restored)
            problems += schema.problems
            hook_runs, hook_problem = drill_verify_hook(catalog, backup, name, endpoint=target)
            problems += [hook_problem] if hook_problem else []
            problems += _database_properties_problems(admin, archive, m, name)
        finally:
            _drop_scratch(admin, ep, name)
    meta = {
        "rto_s": round(rto, 3), "decompress_s": round(decompress_s, 3), "pg_restore_s": round(restore_s, 3),
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


def pg_restore_archive(catalog: Catalog, backup: StoredBackup, target: postgres.Endpoint, raw: Path, *,
                       entries: list | None, jobs: int | None, target_major: int, no_owner: bool = False,
                       what: str = "", reset=None) -> str | None:
    """pg_restore of a decoded archive: all of it, or the given TOC entries (a --use-list file), with
    `jobs` parallel jobs (None: the catalog's restore.jobs). A parallel restore that fails is tried once
    more serially into a fresh target (`reset` empties it) before the failure counts: PostgreSQL races on
    some schemas (two ATTACH PARTITIONs of one partitioned index on two levels). Returns what happened then
    (for the log and the metadata), None when the first try succeeded."""
    tool = _pg_restore_for(catalog, backup.manifest, at_most=target_major)
    list_file = archive_scan.write_list_file(entries, raw.with_suffix(".list")) if entries is not None else None
    jobs = catalog.restore.jobs if jobs is None else max(1, jobs)
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


# -- every check of a backup, reading it once -------------------------------------------------------

CHECK_NAMES = ("artifact_intact", "archive_readable", "size_anomaly", "restore_drill")


def stream_check(catalog: Catalog, source: str, group: str, names) -> archive_scan.StreamCheck | None:
    """A StreamCheck to hand to the backup about to be written (`run_backup(stream=...)`), when
    its checks can be read from the stream as it is written (the catalog's `checks_while_writing`;
    `auto`: with enough cores, or for an encrypted backup when the identity is not at hand), with
    artifact_intact and archive_readable among `names`. A PostgreSQL dump is read by structure
    (with restore_drill, the plain archive for pg_restore is written at the same time); a SQLite
    copy or the roles' JSON is decoded into a scratch file that the checks then read. Its scratch
    folder goes with `close()`. None when the checks read the artifact afterwards instead."""
    src = catalog.sources.get(source)
    names = set(names)
    if (catalog.checks_while_writing is False or src is None
            or not {"artifact_intact", "archive_readable"} <= names):
        return None
    encryption = catalog.encryption_for(source)
    if catalog.checks_while_writing == "auto" and (os.cpu_count() or 1) < AUTO_STREAM_CPUS:
        # afterwards is as fast here, but an encrypted backup can only be read afterwards with the
        # private key, which a backup host need not have: then it is read while it is written
        if encryption is None or _identity_at_hand(encryption):
            return None
    stack = contextlib.ExitStack()
    try:
        folder = stack.enter_context(repository_for(catalog).scratch("check"))
    except OSError:  # no scratch folder (a full disk, say): the checks read the artifact afterwards
        return None
    return archive_scan.StreamCheck(folder, copy="restore_drill" in names, encrypted=encryption is not None,
                                    plain=src.engine == "sqlite" or group == roles.GROUP, cleanup=stack.close)


def _identity_at_hand(encryption) -> bool:
    """The identity file the catalog names for a source is there and holds usable keys."""
    if not encryption.identity_file_env:
        return False
    try:
        crypto.Identities.load(encryption.identity_file_env)
    except BackupError:
        return False
    return True


def evaluate(catalog: Catalog, backup: StoredBackup, names, *, jobs: int | None = None,
             stream: archive_scan.StreamCheck | None = None) -> dict[str, Outcome]:
    """The outcomes of the named checks. For a PostgreSQL archive, intact and readable come from
    one pass over the artifact (SHA-256, decryption, decoding, the archive's structure and
    fingerprints, pg_restore --list), and a drill restores from the plain copy written by that
    same pass: the artifact is read once, not once per check. Given the `stream` that read the
    backup while it was written (`stream_check`), that pass is not needed: the file on disk is
    only hashed, to prove it holds exactly the bytes that were read."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}")
    m = backup.manifest
    ids = crypto.identities_if_any(catalog, m, artifact=str(backup.artifact_path))
    out: dict[str, Outcome] = {}
    if (stream is not None and stream.artifact == backup.artifact_path
            and {"artifact_intact", "archive_readable"} <= set(names)):
        read = _plain_from_stream if stream.plain else _postgres_from_stream
        out.update(read(catalog, backup, stream, drill="restore_drill" in names, jobs=jobs))
    if (not out and m.engine == "postgres" and m.format != roles.FORMAT
            and {"artifact_intact", "archive_readable"} <= set(names) and (ids is not None or not m.encryption)):
        try:
            out.update(_postgres_in_one_pass(catalog, backup, ids, drill="restore_drill" in names, jobs=jobs))
        except BackupError:  # the shared pass could not run (a full scratch folder, say): each check alone
            out.clear()     # says what it can prove without it, and why not otherwise
    single = {
        "artifact_intact": lambda: artifact_intact(backup, ids),
        "archive_readable": lambda: archive_readable(catalog, backup),
        "size_anomaly": lambda: size_anomaly(repository_for(catalog), backup, catalog.size_anomaly_threshold),
        "restore_drill": lambda: restore_drill(catalog, backup, jobs=jobs),
    }
    for name in names:
        if name not in out:
            try:
                out[name] = single[name]()
            except BackupError as exc:
                out[name] = Outcome.failure(exc, str(exc))
    return {n: out[n] for n in names}


def _postgres_in_one_pass(catalog: Catalog, backup: StoredBackup, ids, *, drill: bool, jobs: int | None) -> dict[str, Outcome]:
    m, path = backup.manifest, backup.artifact_path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {}  # each check says so itself
    if size != m.size_bytes:
        return {}
    repo = repository_for(catalog)
    repo.sweep()
    out: dict[str, Outcome] = {}
    with repo.scratch("check", need_bytes=m.raw_size_bytes if drill else 0) as tmp:
        raw = tmp / "archive.dump" if drill else None
        digest = hashlib.sha256()
        readable, scanned = _readable_pass(catalog, backup, copy_to=raw, sha256=digest, identities=ids)
        out["archive_readable"] = readable
        if scanned is None:  # it did not decode or parse: say exactly why the artifact is not intact
            out["artifact_intact"] = artifact_intact(backup, ids)
        elif digest.hexdigest() != m.sha256:
            out["artifact_intact"] = Outcome(False, f"{path}: sha256 {digest.hexdigest()} differs from the manifest's "
                                                    f"{m.sha256}", {"sha256": digest.hexdigest(),
                                                                    "manifest_sha256": m.sha256})
        else:
            out["artifact_intact"] = Outcome(
                True, f"{path.name}: {m.size_human}, sha256 and {'age and ' if m.encryption else ''}zstd stream verified",
                {"sha256": m.sha256, "size_bytes": size, "decoded_bytes": scanned.decoded_bytes})
        if drill:
            out["restore_drill"] = _drill_after_pass(catalog, backup, scanned, raw, out, jobs=jobs)
    return out


def _drill_after_pass(catalog: Catalog, backup: StoredBackup, scanned: archive_scan.ArchiveScan | None, raw: Path,
                      out: dict[str, Outcome], *, jobs: int | None) -> Outcome:
    """The drill of a PostgreSQL backup from a pass that decoded it (its scan, the plain copy `raw`),
    attempted when that pass read the archive and found the artifact intact."""
    intact, readable = out["artifact_intact"], out["archive_readable"]
    if scanned is None or not intact.passed:
        why = intact.message if not intact.passed else readable.message
        return Outcome(False, f"restore drill not attempted: {why}")
    try:
        return _postgres_drill(catalog, backup, jobs=jobs, prepared=(scanned, raw))
    except BackupError as exc:  # e.g. the drill server cannot be reached
        return Outcome.failure(exc, str(exc))


def _postgres_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck, *, drill: bool,
                          jobs: int) -> dict[str, Outcome]:
    """intact, readable (and the drill) of a backup whose stream was read as it was written. Any
    doubt (the stream did not read, the file on disk is not what was written) returns nothing, and
    the checks read the artifact itself, which says exactly what is wrong."""
    m, path = backup.manifest, backup.artifact_path
    scanned = stream.result(m)
    intact = _intact_from_stream(catalog, backup, stream) if scanned is not None else None
    if intact is None:
        return {}
    out = {"artifact_intact": intact}
    try:
        tool = _pg_restore_for(catalog, m)
    except BackupError as exc:
        out["archive_readable"] = Outcome.failure(exc, _naming(path, exc))
    else:
        listed = subprocess.run([str(tool), "--list"], input=stream.head, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        out["archive_readable"] = (_unlisted(path, tool, listed.stderr) if listed.returncode != 0
                                   else _readable_outcome(backup, scanned))
    if drill:
        out["restore_drill"] = (_drill_after_pass(catalog, backup, scanned, stream.copy_to, out, jobs=jobs)
                                if stream.copy_to is not None and stream.copy_to.exists()
                                else restore_drill(catalog, backup, jobs=jobs))
    return out


def _intact_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck) -> Outcome | None:
    """artifact_intact of a backup whose zstd stream decoded to its end while it was written: the
    file on disk is exactly what was written (and, encrypted, decrypts to exactly what was read
    when the identity is at hand). None on any doubt: the artifact is then read again."""
    m, path = backup.manifest, backup.artifact_path
    try:
        if path.stat().st_size != m.size_bytes or sha256_file(path) != m.sha256:
            return None
    except OSError:
        return None
    meta = {"sha256": m.sha256, "size_bytes": m.size_bytes, "decoded_bytes": stream.decoded_bytes,
            "read_while_written": True}
    how = "sha256 verified on disk; the zstd stream decoded to its end (frame checksum verified) as it was written"
    if m.encryption:
        ids = crypto.identities_if_any(catalog, m, artifact=str(path))
        if ids is None:
            how = ("sha256 of the encrypted artifact verified on disk; the zstd stream inside decoded to its end "
                   "(frame checksum verified) as it was written, before encryption (not decrypted: no identity here)")
            meta["decrypted"] = False
        elif stream.inner_sha256 is None or _decrypted_sha256(path, ids) != stream.inner_sha256.hexdigest():
            return None
        else:
            how = ("sha256 verified on disk; it decrypts to exactly the zstd stream that was decoded to its end "
                   "(frame checksum verified) as it was written")
            meta["decrypted"] = True
    return Outcome(True, f"{path.name}: {m.size_human}, {how}", meta)


def _plain_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck, *, drill: bool,
                       jobs: int) -> dict[str, Outcome]:
    """intact, readable (and the drill) of a SQLite copy or a roles backup whose stream was decoded
    into a scratch file while it was written; any doubt reads the artifact again instead."""
    m = backup.manifest
    copy = stream.copy_to
    intact = _intact_from_stream(catalog, backup, stream) if stream.decoded(m) and copy and copy.exists() else None
    if intact is None:
        return {}
    out = {"artifact_intact": intact}
    if m.format == roles.FORMAT:
        try:
            saved = roles.Globals.from_bytes(copy.read_bytes(), where=str(backup.artifact_path))
        except BackupError as exc:  # it names the artifact
            out["archive_readable"] = Outcome.failure(exc, str(exc))
        else:
            out["archive_readable"] = _roles_readable(backup, saved)
            if drill and out["archive_readable"].passed:
                out["restore_drill"] = _roles_drill(catalog, backup, saved)
    else:
        out["archive_readable"] = _sqlite_readable(backup, copy)
        if drill and out["archive_readable"].passed:
            out["restore_drill"] = _sqlite_drill(catalog, backup, decoded=copy)
    if drill and "restore_drill" not in out:
        out["restore_drill"] = Outcome(False, f"restore drill not attempted: {out['archive_readable'].message}")
    return out


def _decrypted_sha256(path: Path, ids) -> str | None:
    """The SHA-256 of what an encrypted artifact decrypts to (None when it does not decrypt)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            reader = crypto.DecryptingReader(fh, ids, what=str(path))
            try:
                while chunk := reader.read(1 << 20):
                    digest.update(chunk)
            finally:
                reader.close()
    except (BackupError, OSError):
        return None
    return digest.hexdigest()


# -- size anomaly -------------------------------------------------------------------------------

def size_anomaly(repo: LocalRepository, backup: StoredBackup, threshold: float) -> Outcome:
    m = backup.manifest
    earlier = [b for b in repo.backups(source=m.source, group=m.group, tier=m.tier) if b.manifest.partition < m.partition]
    if not earlier:
        return Outcome(True, f"{backup.artifact_path.name}: first partition of {m.asset_key}, nothing to compare with",
                       {"previous_partition": None})
    prev = earlier[-1].manifest
    change = (m.size_bytes - prev.size_bytes) / prev.size_bytes if prev.size_bytes else float("inf")
    meta = {"previous_partition": prev.partition, "previous_size_bytes": prev.size_bytes,
            "size_bytes": m.size_bytes, "change_pct": round(change * 100, 1), "threshold_pct": round(threshold * 100, 1)}
    if abs(change) > threshold:
        return Outcome(False, f"{backup.artifact_path.name}: compressed size {m.size_human} changed by {change:+.0%} "
                              f"against partition {prev.partition} ({prev.size_human}); threshold {threshold:.0%}",
                       meta, warn=True)
    return Outcome(True, f"{backup.artifact_path.name}: size changed by {change:+.1%} against {prev.partition}", meta)

