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

        record, _ = daemon_run(instance, env, "2026-11-20")
        run_id = record.dagster_run.run_id
        created = record.create_timestamp.timestamp()
        wall = record.end_time - created
        timeline: dict[str, dict] = {}
        trace = os.environ.get("BENCH_FLEET_TRACE")
        if trace:  # every event of the run with its time, to see where a step spends it
            with open(trace, "w") as fh:
                for rec in instance.all_logs(run_id):
                    kind = rec.dagster_event.event_type_value if rec.dagster_event else "LOG"
                    fh.write(f"{rec.timestamp - created:8.2f} {rec.step_key or '-':30} {kind:28} "
                             f"{(rec.user_message or '')[:100]}\n")
        for rec in instance.all_logs(run_id):
            event = rec.dagster_event
            if event is None or not rec.step_key:
                continue
            step = timeline.setdefault(rec.step_key, {"assets": 0})
            if event.event_type == DagsterEventType.STEP_START:
                step["start_s"] = round(rec.timestamp - created, 2)
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                step["end_s"] = round(rec.timestamp - created, 2)
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                step["assets"] += 1
        for c, seconds in zip(clusters, raw):
            step = timeline.get(f"pg_{c.host.replace('.', '_')}_{c.port}__daily", {})
            step["raw_serial_s"] = round(seconds, 2)
        return {"servers": servers, "databases": servers * per_server, "raw_serial_per_server_s": raw,
                "slowest_server_serial_s": max(raw), "raw_all_servers_at_once_s": raw_parallel,
                "run_wall_s": wall, "ratio_run_vs_slowest_serial": wall / max(raw),
                "ratio_run_vs_raw_all_servers_at_once": wall / raw_parallel, "cpus": os.cpu_count(),
                "timeline": timeline}
    finally:
        for c in clusters_and_storage:
            c.destroy()


def report(r: dict) -> None:
    print(f"  {r['databases']} databases on {r['servers']} servers: run {r['run_wall_s']:.1f}s, slowest server's serial "
          f"raw dumps {r['slowest_server_serial_s']:.1f}s -> ratio {r['ratio_run_vs_slowest_serial']:.2f} (goal <= 1.25); "
          f"raw dumps of all servers at once {r['raw_all_servers_at_once_s']:.1f}s -> ratio "
          f"{r['ratio_run_vs_raw_all_servers_at_once']:.2f} ({r['cpus']} CPUs)")
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
