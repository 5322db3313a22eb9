"""The physical tier's checks: pg_verifybackup of a base backup, the WAL archive's continuity and recovery point,
and the drill that recovers to a random time between two commits and proves where recovery stopped."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import subprocess
import shutil
import time
from pathlib import Path

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.crypto import NoIdentity
from backup_assets.core.engines import tools
from backup_assets.core.outcome import Outcome
from backup_assets.core.net import free_port
from backup_assets.core.pitr.base import _now, base_backups
from backup_assets.core.pitr.recovery import (Recovered, _scratch, _server_env, _unpack, recovered_major,
                                              restore_to_time)


def verify_base(catalog: Catalog, source: str, meta: dict) -> Outcome:
    """pg_verifybackup of one base backup (unpacked into a scratch directory): every file in the manifest is
    there with its size and checksum, nothing extra. Its WAL is the continuity check's business."""
    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_verifybackup", meta["server_major"], src.pg_bin_dir)
    scratch = _scratch("backup-assets-verify-")
    started = time.monotonic()
    try:
        _unpack(catalog, source, meta, scratch, durable=False)
        done = subprocess.run([str(tool), "--no-parse-wal", "--quiet", str(scratch)], capture_output=True, text=True)
    except BackupError as exc:  # not checked here when the key is not at hand
        return Outcome.failure(exc, f"{meta['artifact']}: {exc}", {"artifact": meta["artifact"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    md = {"artifact": meta["artifact"], "kind": meta.get("kind", "full"), "raw_size_bytes": meta["raw_size_bytes"],
          "duration_s": round(time.monotonic() - started, 3)}
    if done.returncode != 0:
        problems = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        md["problems"] = problems[:20]
        return Outcome(False, f"pg_verifybackup found {len(problems)} problem(s) in {meta['artifact']}: "
                            f"{problems[0] if problems else done.returncode}", md)
    return Outcome(True, f"pg_verifybackup: {meta['artifact']} matches its manifest", md)


def archive_state(catalog: Catalog, source: str):
    """The WAL archive from the oldest kept base backup's start on (one read of its descriptions), with that
    base backup list: what wal_continuity and recovery_point look at."""
    from backup_assets.core.pitr import wal

    bases = base_backups(catalog, source)
    return bases, wal.verify(catalog, source, since=bases[0]["start_wal"] if bases else None)


def wal_continuity(catalog: Catalog, source: str, state=None) -> Outcome:
    bases, result = state or archive_state(catalog, source)
    since = bases[0]["start_wal"] if bases else None
    md = {"segments": result.segments, "first": result.first, "last": result.last, "gaps": len(result.gaps),
          "oldest_base_backup": bases[0]["artifact"] if bases else None}
    if not bases:
        return Outcome(False, f"no base backup of {source}: the WAL archive restores nothing on its own", md)
    if result.segments == 0:
        return Outcome(False, f"no WAL archived since {since} (is archive_command = wal-push set?)", md)
    if since is not None and result.first != since:
        return Outcome(False, f"the WAL archive starts at {result.first}, after the oldest base backup's start "
                            f"{since}: that base backup cannot be recovered", md)
    if result.gaps:
        md["gap_list"] = [f"{a} .. {b}" for a, b in result.gaps[:20]]
        return Outcome(False, f"{len(result.gaps)} gap(s) in the WAL archive, first after {result.gaps[0][0]} "
                            f"(next archived: {result.gaps[0][1]})", md)
    return Outcome(True, f"{result.segments} segments from {result.first} to {result.last}, no gaps", md)


def recovery_point(catalog: Catalog, source: str, now: dt.datetime | None = None, state=None) -> Outcome:
    """The age of the newest archived WAL: what a restore to --latest would lose at most now."""
    now = now or _now()
    rpo = catalog.sources[source].wal_rpo_seconds
    newest = (state or archive_state(catalog, source))[1].newest_pushed_at
    if newest is None:
        return Outcome(False, f"nothing archived for {source} yet", {"rpo_seconds": rpo}, warn=True)
    age = (now - dt.datetime.fromisoformat(newest)).total_seconds()
    md = {"newest_wal_at": newest, "recovery_point_age_s": round(age, 1), "rpo_seconds": rpo}
    if rpo is not None and age > rpo:
        return Outcome(False, f"the newest archived WAL is {age:.0f}s old, over the RPO of {rpo}s", md, warn=True)
    return Outcome(True, f"the newest archived WAL is {age:.0f}s old" + (f" (RPO {rpo}s)" if rpo else ""), md)


COMMIT = re.compile(r"tx:\s+(\d+),.*desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def _commits(catalog: Catalog, source: str, major: int, segment: str, scratch: Path) -> list[tuple[int, dt.datetime]]:
    """(xid, commit time) of the commits recorded in one archived segment (pg_waldump)."""
    from backup_assets.core.pitr import wal

    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_waldump", major, src.pg_bin_dir)
    wal.fetch(catalog, source, segment, str(scratch / segment))
    try:
        done = subprocess.run([str(tool), "--rmgr=Transaction", "--path", str(scratch), segment, segment],
                              capture_output=True, text=True, env={**_server_env(), "TZ": "UTC"})
    finally:
        (scratch / segment).unlink(missing_ok=True)
    found = []
    for xid, stamp in COMMIT.findall(done.stdout):
        found.append((int(xid), dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc)))
    return found


def drill_target(catalog: Catalog, source: str, rng) -> tuple[dt.datetime, tuple, tuple] | None:
    """A random time between two commits in the archive, after the oldest base backup ended: (target, the
    commit before it, the commit after it). None when the window holds no two commits."""
    from backup_assets.core.pitr import wal

    bases = base_backups(catalog, source)
    if not bases:
        raise BackupError(f"no base backup of {source}")
    oldest_end = dt.datetime.fromisoformat(bases[0]["finished_at"])
    names = wal.segment_names(catalog, source, since=bases[0]["start_wal"])
    if not names:
        return None
    newest_tli = max(n[:8] for n in names)
    names = [n for n in names if n[:8] == newest_tli]
    start = rng.randrange(len(names))
    scratch = _scratch("backup-assets-waldump-")
    try:
        for name in names[start:] + names[:start]:  # from a random segment on, until one has two commits to split
            commits = [c for c in _commits(catalog, source, bases[-1]["server_major"], name, scratch)
                       if c[1] > oldest_end]
            pairs = [(a, b) for a, b in zip(commits, commits[1:]) if b[1] - a[1] > dt.timedelta(microseconds=2)]
            if pairs:
                before, after = rng.choice(pairs)
                return before[1] + (after[1] - before[1]) * rng.uniform(0.1, 0.9), before, after
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def pitr_drill(catalog: Catalog, source: str, *, rng=None, say=lambda _m: None) -> Outcome:
    """Restore to a random committed time in the window into a scratch cluster and prove it: recovery stopped
    exactly between the commits around the target, the server starts and promotes, pg_amcheck is clean and
    every table of every database can be read."""
    import random

    rng = rng or random.Random()
    cfg = catalog.sources[source].pitr
    try:
        picked = drill_target(catalog, source, rng)
    except NoIdentity as exc:  # the archived WAL opens only with the key: not checked here
        return Outcome.failure(exc, str(exc))
    if picked is None:
        return Outcome(False, "no two commits after the oldest base backup in the archive: nothing to restore to "
                            "(is anything written to the server, is archive_timeout set?)", {}, warn=True)
    target, before, after = picked
    if os.geteuid() == 0 and not (cfg and cfg.run_as):
        return Outcome(False, f"the drill's scratch cluster cannot run as root: set sources.{source}.pitr.run_as to the "
                            "server's OS user (e.g. postgres)", _md_target(target, before, after))
    user = pwd.getpwnam(cfg.run_as) if os.geteuid() == 0 else None
    scratch = _scratch("backup-assets-pitr-drill-", user)
    pgdata = scratch / "pgdata"
    started = time.monotonic()
    recovered = None
    md = _md_target(target, before, after)
    try:
        recovered = restore_to_time(catalog, source, str(pgdata), to_time=target, port=free_port(),
                                    run_as=cfg.run_as if cfg else None, say=say, local_trust=True)
        md["rto_s"] = round(time.monotonic() - started, 3)
        md["base_backups"] = recovered.chain
        md["reached"] = recovered.reached
        stop = re.search(r"recovery stopping before commit of transaction (\d+)", recovered.reached)
        if stop is None or int(stop.group(1)) != after[0]:
            return Outcome(False, f"recovery to {target.isoformat()} did not stop before transaction {after[0]} "
                                f"(the first commit after the target): {recovered.reached}", md)
        tables, rows, problems = _prove(catalog, source, recovered)
        md.update({"tables_read": tables, "rows_read": rows, "amcheck": "clean" if not problems else problems[:10]})
        if problems:
            return Outcome(False, f"pg_amcheck found problems after recovery to {target.isoformat()}: {problems[0]}", md)
        return Outcome(True, f"recovered to {target.isoformat()} (between transactions {before[0]} and {after[0]}) "
                           f"from {len(recovered.chain)} base backup(s) in {md['rto_s']:.1f}s; pg_amcheck clean; "
                           f"{tables} tables ({rows} rows) read", md)
    except BackupError as exc:  # a missing key: not checked here
        return Outcome.failure(exc, f"restore to {target.isoformat()} failed: {exc}", md)
    finally:
        if recovered is not None:
            recovered.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _md_target(target: dt.datetime, before: tuple, after: tuple) -> dict:
    return {"target": target.isoformat(), "commit_before": f"{before[0]} at {before[1].isoformat()}",
            "commit_after": f"{after[0]} at {after[1].isoformat()}"}


def _prove(catalog: Catalog, source: str, recovered: Recovered) -> tuple[int, int, list[str]]:
    import psycopg
    from psycopg import sql

    from backup_assets.core.backup.take import endpoint_for

    ep = endpoint_for(catalog, source)
    host = str(recovered.pgdata)

    def connect(dbname: str, user: str):
        return psycopg.connect(host=host, port=recovered.port, user=user, dbname=dbname, autocommit=True,
                               client_encoding="UTF8", application_name="backup_assets_drill")

    with connect(ep.dbname, ep.user) as conn:
        superuser = conn.execute("SELECT rolname FROM pg_roles WHERE oid = 10").fetchone()[0]
        databases = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
    tables = rows = 0
    for dbname in databases:
        with connect(dbname, superuser) as conn:
            for schema, name in conn.execute(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "AND n.nspname NOT LIKE 'pg_toast%' AND NOT c.relispartition ORDER BY 1, 2").fetchall():
                rows += conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(name))).fetchone()[0]
                tables += 1
    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_amcheck", recovered_major(recovered), src.pg_bin_dir)
    done = subprocess.run([str(tool), "--all", "--install-missing", "--heapallindexed", "-h", host,
                           "-p", str(recovered.port), "-U", superuser], capture_output=True, text=True,
                          env=_server_env())
    problems = [] if done.returncode == 0 else \
        [line for line in (done.stdout + done.stderr).splitlines() if line.strip()] or [f"exit {done.returncode}"]
    return tables, rows, problems
