"""Small databases, where the fixed costs are all there is: a backup with its checks and drill against
`pg_dump -Fc`.

- PostgreSQL's regression database (a few MB, every kind of object): the backup and its checks in one
  process, with where the drill spends its time (the drill's scratch database, pg_restore, the definitions
  compared object by object). Needs the cached regression database (`.ci/run` builds it; see
  backup_assets_tests/regression.py).
- A 65 MB application database through the command line, as an operator runs it: `backup-assets backup
  --timings` (drill on) in an existing Dagster instance, with where its time goes (interpreter and imports,
  Dagster's instance, the run's events, the dump, the checks, the drill's phases).

    python -m bench.regression
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import yaml


def _pg_dump_fc_s(cluster, dbname: str, env: dict, work: Path) -> float:
    """Seconds of a raw `pg_dump -Fc` of the database (the figure each small-database ratio is against)."""
    with tempfile.NamedTemporaryFile(dir=work) as out:
        t = time.monotonic()
        subprocess.run([str(cluster.bin_dir / "pg_dump"), "-Fc", f"--host={cluster.host}", f"--port={cluster.port}",
                        f"--username={cluster.superuser}", f"--file={out.name}", dbname], env=env, check=True)
        return time.monotonic() - t


def bench_regression(work: Path, repeat: int = 2) -> dict:
    from backup_assets.catalog import load_catalog
    from backup_assets.core.backup.take import run_backup
    from backup_assets.core.repository import LocalRepository
    from backup_assets.core.verify.checks import evaluate
    from backup_assets.demo.cluster import LocalCluster, debian_bin_dir, free_port
    from backup_assets_tests import regression

    if not regression.available():
        return {"skipped": f"the regression database is not built ({regression.DUMP})"}
    cluster = LocalCluster(debian_bin_dir(15), work / "pg15", free_port(), "bench-" + secrets.token_hex(6))
    cluster.start()
    try:
        regression.load(cluster, "regression")
        os.environ["BENCH_REGRESSION_PASSWORD"] = cluster.password
        path = work / "catalog.yaml"
        path.write_text(yaml.safe_dump({"repository": {"root": str(work / "repo")}, "start_date": "2026-01-01",
                                        "checks_while_writing": False, "sources": {"reg": {
                                            "engine": "postgres", "groups": {"full": {}}, "globals": False,
                                            "connection": {"host": cluster.host, "port": cluster.port,
                                                           "dbname": "regression", "user": cluster.superuser,
                                                           "password_env": "BENCH_REGRESSION_PASSWORD"}}}}))
        catalog = load_catalog(path)
        env = {**os.environ, "PGPASSWORD": cluster.password}
        raw, ours, phases = [], [], {}
        for i in range(repeat):
            raw.append(_pg_dump_fc_s(cluster, "regression", env, work))
            t = time.monotonic()
            run_backup(catalog, "reg", "full", "daily", f"2026-11-{10 + i}")
            dumped = time.monotonic()
            backup = LocalRepository(catalog.repository_root).latest("reg", "full", "daily", f"2026-11-{10 + i}")
            outcomes = evaluate(catalog, backup, ("artifact_intact", "archive_readable", "restore_drill"))
            ours.append(time.monotonic() - t)
            phases["backup"] = min(phases.get("backup", 1e9), dumped - t)
            phases["checks_together"] = min(phases.get("checks_together", 1e9), time.monotonic() - dumped)
            failed = {k: o.message for k, o in outcomes.items() if not o.passed}
            if failed:
                raise SystemExit(f"bench.regression: checks failed: {failed}")
        for check in ("artifact_intact", "archive_readable", "restore_drill"):  # each on its own, for the breakdown
            t_check = time.monotonic()
            evaluate(catalog, backup, (check,))
            phases[f"{check}_alone"] = time.monotonic() - t_check
        drill = outcomes["restore_drill"].metadata
        return {"pg_dump_fc_s": round(min(raw), 3), "backup_checks_drill_s": round(min(ours), 3),
                "ratio": round(min(ours) / min(raw), 2), "objects": sum(drill["objects"].values()),
                "tables": drill["tables"], "rto_s": drill["rto_s"],
                "phases_s": {k: round(v, 3) for k, v in phases.items()}, "drill_phases_s": drill.get("phases_s", {})}
    finally:
        cluster.destroy()


def bench_small_cli(work: Path, repeat: int = 3) -> dict:
    """`backup-assets backup --timings` of a 65 MB database with the drill, against `pg_dump -Fc` of it."""
    import sys

    from backup_assets.demo.cluster import LocalCluster, embedded_bin_dir, free_port
    from backup_assets.demo.seed import seed_myloware
    from bench.fleet_run import SCALE

    cluster = LocalCluster(embedded_bin_dir(), work / "pg18", free_port(), "bench-" + secrets.token_hex(6))
    cluster.start()
    try:
        cluster.create_database("app")
        with cluster.connect("app") as conn:
            seed_myloware(conn, SCALE, hnsw=False)
            size = conn.execute("SELECT pg_database_size('app')").fetchone()[0]
        path = work / "small.yaml"
        path.write_text(yaml.safe_dump({"repository": {"root": str(work / "small_repo")}, "start_date": "2026-01-01",
                                        "tiers": {"daily": {"drill": True}}, "sources": {"app": {
                                            "engine": "postgres", "groups": {"full": {}}, "globals": False,
                                            "connection": {"host": cluster.host, "port": cluster.port,
                                                           "dbname": "app", "user": cluster.superuser,
                                                           "password_env": "BENCH_SMALL_PASSWORD"}}}}))
        home = work / "dagster_home"  # an instance that exists already, as an operator's does
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {**os.environ, "PGPASSWORD": cluster.password, "BENCH_SMALL_PASSWORD": cluster.password,
               "DAGSTER_HOME": str(home)}
        raw, ours = [], []
        for i in range(repeat + 1):  # the first run creates the instance's storage: not timed
            raw.append(_pg_dump_fc_s(cluster, "app", env, work))
            t = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", str(path), "backup",
                                   "--partition", f"2026-11-{10 + i}", "--timings"], env=env, capture_output=True,
                                  text=True)
            wall = time.monotonic() - t
            if done.returncode != 0 or "checks drilled" not in done.stdout:
                raise SystemExit(f"bench.regression: the small database's backup failed: {done.stdout}{done.stderr}")
            if i:
                timings = next(ln[len("timings: "):] for ln in done.stdout.splitlines() if ln.startswith("timings: "))
                drill = next(ln.split("the drill: ", 1)[1] for ln in done.stdout.splitlines() if "the drill: " in ln)
                ours.append((wall, timings, drill))
        best = min(ours)
        inside = float(best[1].rsplit("total ", 1)[1].split("s", 1)[0])
        return {"database_bytes": size, "pg_dump_fc_s": round(min(raw[1:]), 3), "cli_backup_drill_s": round(best[0], 3),
                "ratio": round(best[0] / min(raw[1:]), 2), "timings": best[1], "drill": best[2],
                "outside_the_command_s": round(best[0] - inside, 3)}
    finally:
        cluster.destroy()


def report(r: dict) -> None:
    if "skipped" in r:
        print(f"  skipped: {r['skipped']}")
        return
    print(f"  pg_dump -Fc {r['pg_dump_fc_s']:.2f}s; backup + artifact_intact + archive_readable + restore_drill "
          f"{r['backup_checks_drill_s']:.2f}s -> ratio {r['ratio']:.1f} ({r['objects']} objects, {r['tables']} tables "
          f"compared; a small database: fixed costs dominate)")
    print("    where the time goes: " + "; ".join(f"{k} {v:.2f}s" for k, v in r.get("phases_s", {}).items())
          + " (a check alone reads the artifact again; together they share one read)")
    print("    inside the drill: " + "; ".join(f"{k} {v:.2f}s" for k, v in r.get("drill_phases_s", {}).items()))


def report_small(r: dict) -> None:
    print(f"  pg_dump -Fc {r['pg_dump_fc_s']:.2f}s; `backup-assets backup` with its checks and the drill "
          f"{r['cli_backup_drill_s']:.2f}s -> ratio {r['ratio']:.1f} (goal <= 3; {r['database_bytes'] / 1e6:.0f} MB)")
    print(f"    where the time goes: the interpreter's start and exit {r['outside_the_command_s']:.2f}s; {r['timings']}")
    print(f"    inside the drill: {r['drill']}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_regression_") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        report(bench_regression(work))
        report_small(bench_small_cli(work))
