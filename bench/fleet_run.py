"""The fleet run: 30 databases over 3 throwaway PostgreSQL servers, one daily partition of all of
them in one daemon-launched `daily_backups` run (queued run coordinator, one step per server, each server's
pool keeping it to one dump at a time), against the slowest server's serial raw dump time
(`pg_dump -Fc -Z0 | zstd -T2 -3` of its databases one after the other). Goal: wall <= 1.25x. Also timed:
the same raw dumps on all servers at once (what the machine's cores allow), and the per-server timeline.
Dagster's storage is PostgreSQL (a fourth throwaway server), as in production.

    python -m bench.fleet_run [--servers 3] [--per-server 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backup_assets.demo.cluster import LocalCluster, embedded_bin_dir, free_port
from backup_assets.demo.seed import Scale, seed_myloware

ROOT = Path(__file__).resolve().parents[1]
PASSWORD_ENV = "BENCH_FLEET_PG_PASSWORD"
# about 75 MB on disk per database: a fleet of small application databases
SCALE = Scale(runs=12000, artifacts_per_run=3, webhooks=18000, checkpoints_per_run=2, documents=450,
              chunks_per_document=5, dims=256, text_bytes=512, days=90)


def _servers(work: Path, servers: int, per_server: int) -> list[LocalCluster]:
    password = "fleet-" + os.urandom(8).hex()
    os.environ[PASSWORD_ENV] = password
    clusters = []
    for i in range(servers):
        c = LocalCluster(embedded_bin_dir(), work / f"pg{i}", free_port(), password)
        c.start()
        clusters.append(c)
        c.create_database("seed")
        with c.connect("seed") as conn:
            seed_myloware(conn, SCALE, hnsw=False)
        with c.connect() as conn:
            for j in range(per_server):
                conn.execute(f'CREATE DATABASE "app{j:02d}" TEMPLATE seed')
    return clusters


def _catalog(work: Path, clusters: list[LocalCluster], per_server: int) -> Path:
    sources = {}
    for i, c in enumerate(clusters):
        for j in range(per_server):
            sources[f"s{i}_app{j:02d}"] = {
                "engine": "postgres", "globals": False, "tiers": ["daily"],
                "connection": {"host": c.host, "port": c.port, "dbname": f"app{j:02d}", "user": c.superuser,
                               "password_env": PASSWORD_ENV},
                "groups": {"full": {}}}
    catalog = {"repository": {"root": str(work / "repo")}, "start_date": "2026-11-01",
               "tiers": {"daily": {"drill": False}, "weekly": {"enabled": False}, "monthly": {"enabled": False}},
               "dr_drill": {"enabled": False}, "sources": sources}
    path = work / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


def _raw_serial(c: LocalCluster, per_server: int) -> float:
    pg_dump = Path(embedded_bin_dir()) / "pg_dump"
    env = dict(os.environ, PGPASSWORD=c.password, PGHOST=c.host, PGPORT=str(c.port), PGUSER=c.superuser)
    start = time.perf_counter()
    for j in range(per_server):
        subprocess.run(["bash", "-o", "pipefail", "-c", f"{pg_dump} -Fc -Z0 -d app{j:02d} | zstd -T2 -3 -q > /dev/null"],
                       check=True, env=env)
    return time.perf_counter() - start


# the same backups and checks as the run's steps, one after another in one process without Dagster: the CPU
# this process spends itself (not pg_dump's or zstd's) after its imports is the project's own work per backup
CORE_ONLY = """
import json, resource, sys, time
from backup_assets.catalog import load_catalog
from backup_assets.core.backup.take import run_backup
from backup_assets.core.verify.checks import evaluate, find_backup, stream_check
from backup_assets.core.backup.head_start import backup_check_names
catalog = load_catalog(sys.argv[1])
names = backup_check_names(catalog, "daily")
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
for source in catalog.sources:
    stream = stream_check(catalog, source, "full", names)
    try:
        run_backup(catalog, source, "full", "daily", sys.argv[2], stream=stream)
        outcomes = evaluate(catalog, find_backup(catalog, source, "full", "daily", sys.argv[2]), names, stream=stream)
    finally:
        if stream is not None:
            stream.close()
    assert all(o.passed for o in outcomes.values()), outcomes
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                  "wall_s": time.perf_counter() - started, "backups": len(catalog.sources)}))
"""


def _python_cpu(processes: list[dict], since: float) -> tuple[float, int]:
    """CPU seconds of the Python processes that started for the run (its worker and step processes), and
    how many there were."""
    ours = [p for p in processes if p["started"] >= since - 0.5 and "python" in p["name"].lower()]
    return sum(p["cpu_s"] for p in ours), ours


def bench_fleet_run(work: Path, servers: int = 3, per_server: int = 10) -> dict:
    import dagster as dg
    from dagster import DagsterEventType

    clusters = _servers(work, servers, per_server)
    # Dagster's own storage in PostgreSQL, as production's dagster.yaml has it (SQLite storage serialises
    # the event writes of parallel steps), on a server of its own
    storage = LocalCluster(embedded_bin_dir(), work / "pg_dagster", free_port(), os.environ[PASSWORD_ENV])
    storage.start()
    storage.create_database("dagster")
    os.environ.update(DAGSTER_PG_HOST=storage.host, DAGSTER_PG_PORT=str(storage.port), DAGSTER_PG_DB="dagster",
                      DAGSTER_PG_USER=storage.superuser, DAGSTER_PG_PASSWORD=storage.password)
    clusters_and_storage = [*clusters, storage]
    try:
        catalog = _catalog(work, clusters, per_server)
        raw = [_raw_serial(c, per_server) for c in clusters]
        # the same raw dumps with every server at once (each still one database after the other): what the
        # machine itself allows when the servers share its cores
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()
        with ThreadPoolExecutor(len(clusters)) as pool:
            list(pool.map(lambda c: _raw_serial(c, per_server), clusters))
        raw_parallel = time.perf_counter() - started
        home = work / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())  # production's instance
        env = dict(os.environ, BACKUP_ASSETS_CATALOG=str(catalog), DAGSTER_HOME=str(home))
        os.environ.update(BACKUP_ASSETS_CATALOG=str(catalog), DAGSTER_HOME=str(home))
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)
        from bench.daemon import daemon_run

        record, _, processes = daemon_run(instance, env, "2026-11-20", watch=True)
        run_id = record.dagster_run.run_id
        created = record.create_timestamp.timestamp()
        wall = record.end_time - created
        dumps = sorted(p["started"] for p in processes if p["name"] == "pg_dump" and p["started"] >= created)
        run_python_cpu, run_processes = _python_cpu(processes, created)
        core = json.loads(subprocess.run([sys.executable, "-c", CORE_ONLY, str(catalog), "2026-11-21"], check=True,
                                         env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        databases = servers * per_server
        timeline: dict[str, dict] = {}
        trace = os.environ.get("BENCH_FLEET_TRACE")
        if trace:  # every event of the run with its time, to see where a step spends it
            with open(trace, "w") as fh:
                for rec in instance.all_logs(run_id):
                    kind = rec.dagster_event.event_type_value if rec.dagster_event else "LOG"
                    fh.write(f"{rec.timestamp - created:8.2f} {rec.step_key or '-':30} {kind:28} "
                             f"{(rec.user_message or '')[:100]}\n")
        run_started = None
        for rec in instance.all_logs(run_id):
            event = rec.dagster_event
            if event is not None and event.event_type == DagsterEventType.RUN_START:
                run_started = rec.timestamp
            if event is None or not rec.step_key:
                continue
            step = timeline.setdefault(rec.step_key, {"assets": 0})
            if event.event_type == DagsterEventType.STEP_START:
                step["start_s"] = round(rec.timestamp - created, 2)
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                step["end_s"] = round(rec.timestamp - created, 2)
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                step["assets"] += 1
        for i, seconds in enumerate(raw):  # a server's step is named after its sources
            for name, step in timeline.items():
                if f"s{i}_app00" in name:
                    step["raw_serial_s"] = round(seconds, 2)
        return {"servers": servers, "databases": servers * per_server, "raw_serial_per_server_s": raw,
                "slowest_server_serial_s": max(raw), "raw_all_servers_at_once_s": raw_parallel,
                "run_wall_s": wall, "ratio_run_vs_slowest_serial": wall / max(raw),
                "ratio_run_vs_raw_all_servers_at_once": wall / raw_parallel, "cpus": os.cpu_count(),
                # Dagster's own CPU per backup: the run's Python processes (worker, steps; not pg_dump, zstd or
                # the servers) less the same backups and checks in one process without Dagster
                "run_python_cpu_s": run_python_cpu, "run_python_processes": len(run_processes),
                "run_python_processes_cpu_s": sorted(([round(p["cpu_s"], 2), round(p["started"] - created, 2),
                                                       p["cmdline"][:160]] for p in run_processes), reverse=True),
                "core_only_cpu_s": core["cpu_s"],
                "dagster_cpu_per_backup_s": (run_python_cpu - core["cpu_s"]) / databases,
                # from the run's creation (a schedule tick queues it) and from its start to the first pg_dump
                "first_dump_after_created_s": dumps[0] - created if dumps else None,
                "first_dump_after_run_start_s": dumps[0] - run_started if dumps and run_started else None,
                "timeline": timeline}
    finally:
        for c in clusters_and_storage:
            c.destroy()


def report(r: dict) -> None:
    print(f"  {r['databases']} databases on {r['servers']} servers: run {r['run_wall_s']:.1f}s, slowest server's serial "
          f"raw dumps {r['slowest_server_serial_s']:.1f}s -> ratio {r['ratio_run_vs_slowest_serial']:.2f} (goal <= 1.25); "
          f"raw dumps of all servers at once {r['raw_all_servers_at_once_s']:.1f}s -> ratio "
          f"{r['ratio_run_vs_raw_all_servers_at_once']:.2f} ({r['cpus']} CPUs)")
    print(f"  Dagster's own CPU per backup {r['dagster_cpu_per_backup_s']:.3f}s (goal <= 0.15): the run's "
          f"{r['run_python_processes']} Python processes {r['run_python_cpu_s']:.1f}s of CPU, the same backups and "
          f"checks without Dagster {r['core_only_cpu_s']:.1f}s; the first dump {r['first_dump_after_created_s']:.1f}s "
          f"after the run was queued, {r['first_dump_after_run_start_s']:.1f}s after it started (goal <= 3)")
    for step, t in sorted(r["timeline"].items()):
        print(f"    {step:32} start {t.get('start_s', '?'):>7}s  end {t.get('end_s', '?'):>7}s  "
              f"{t['assets']:2d} backups  (raw serial {t.get('raw_serial_s', '?')}s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--per-server", type=int, default=10)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="backup_assets_fleet_"))
    try:
        r = bench_fleet_run(work, args.servers, args.per_server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    print(json.dumps({k: v for k, v in r.items() if k != "timeline"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
