"""`make bench`: backup_assets against the raw tools, in one run, on this machine.

For each database size it times
  (a) the runbook's `pg_dump | gzip`, (b) `pg_dump | zstd -T2 -3`,
  (c) the asset's materialization of the full group (dagster.materialize, peak RSS measured),
  (d) raw `pg_restore -j2` of (c)'s dump, (e) backup_assets' restore drill of (c), and
  (f) backup_assets' restore of (c) into a new database,
for SQLite, the asset's materialization against `sqlite3 .backup` alone, and the peak RSS of a
streaming multipart upload of a 2 GB artifact to moto's S3 server on 127.0.0.1.
Ratios are printed and written as JSON under bench/results/. Goals (from the issues):
  (c)/(b) wall ≤ 1.2, output ≤ 1.05, peak RSS ≤ 300 MB and flat across sizes;
  drill/(d) ≤ 1.2; restore/(d) ≤ 1.1; SQLite ≤ 1.5× .backup; S3 upload peak RSS ≤ 300 MB.

Also: loading the definitions of a 100-source fleet catalog against `import dagster` (CPU ≤ 3×),
and `backup-assets backup` with its blocking checks against the raw tools (≤ 1.3× dump|zstd; with
the drill ≤ 1.2× the runbook's dump|zstd, zstd -d, pg_restore -j2, counts), and the fleet run of
bench/fleet_run.py (30 databases on 3 servers in one daemon-launched run, ≤ 1.25× the slowest
server's serial raw dumps; also against the raw dumps of all servers at once, with a timeline).

Usage: python -m bench.run [--sizes small,large] [--fresh] [--skip-sqlite] [--s3-upload-gb 2] [--only-s3]
                           [--only-definitions]
The generated databases are kept in bench/data/ and reused by the next run (--fresh rebuilds).
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from backup_assets.demo.seed import Scale, seed_miyabi, seed_myloware

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
PASSWORD_ENV = "BENCH_PG_PASSWORD"

# about 0.4 GB and 1.5 GB on disk (tables + TOAST; the HNSW index is rebuilt, not dumped)
SIZES = {
    "small": Scale(runs=50_000, artifacts_per_run=3, webhooks=100_000, checkpoints_per_run=2,
                   documents=3_000, chunks_per_document=5, dims=1536, text_bytes=1024, days=365),
    "large": Scale(runs=200_000, artifacts_per_run=3, webhooks=400_000, checkpoints_per_run=2,
                   documents=12_000, chunks_per_document=5, dims=1536, text_bytes=1024, days=365),
}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sh(cmd: str, env: dict) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)


def cluster() -> LocalCluster:
    DATA.mkdir(exist_ok=True)
    pw_file = DATA / "password"
    if not pw_file.exists():
        pw_file.write_text("bench-" + os.urandom(8).hex())
    port_file = DATA / "port"
    if not port_file.exists():
        port_file.write_text(str(free_port()))
    c = LocalCluster(embedded_bin_dir(), DATA / "pg", int(port_file.read_text()), pw_file.read_text().strip())
    c.start()
    os.environ[PASSWORD_ENV] = c.password
    return c


def ensure_db(c: LocalCluster, name: str, scale: Scale, fresh: bool) -> int:
    with c.connect() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and fresh:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            print(f"generating {name} ...", flush=True)
            conn.execute(f'CREATE DATABASE "{name}"')
            with c.connect(name) as db:
                db.execute("SET maintenance_work_mem = '1GB'")
                seed_myloware(db, scale)
    with c.connect(name) as db:
        return db.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def catalog_file(c: LocalCluster, dbname: str, root: Path) -> Path:
    sources = {
        "bench": {
            "engine": "postgres",
            "connection": {"host": c.host, "port": c.port, "dbname": dbname, "user": c.superuser,
                           "password_env": PASSWORD_ENV},
            "groups": {"full": {}},
        }
    }
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump({"repository": {"root": str(root / "repo")}, "sources": sources}))
    return path


MATERIALIZE = r"""
import json, resource, sys, time
import dagster as dg
from backup_assets.catalog import load_catalog
from backup_assets.defs.build import build_definitions
catalog = load_catalog(sys.argv[1])
key = dg.AssetKey(sys.argv[2].split("/"))
asset = build_definitions(catalog).resolve_assets_def(key)
with dg.instance_for_test() as instance:
    start = time.perf_counter()
    result = dg.materialize([asset], selection=dg.AssetSelection.assets(key).without_checks(),
                            partition_key="2026-11-20", instance=instance,
                            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    wall = time.perf_counter() - start
assert result.success
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def asset(source: str) -> str:
    """The daily full backup asset of a bench source, as the definitions name it."""
    from backup_assets.defs.keys import backup_key

    return backup_key(source, "full", "daily").to_user_string()


def materialize(catalog: Path, key: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MATERIALIZE, str(catalog), key], check=True, capture_output=True,
                         text=True, env=dict(os.environ, DAGSTER_HOME=tempfile.mkdtemp()))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_postgres(c: LocalCluster, size: str, fresh: bool, work: Path) -> dict:
    dbname = f"bench_{size}"
    db_size = ensure_db(c, dbname, SIZES[size], fresh)
    bin_dir = embedded_bin_dir()
    env = dict(os.environ, PGPASSWORD=c.password, PGHOST=c.host, PGPORT=str(c.port), PGUSER=c.superuser)
    out = work / size
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"database": dbname, "database_bytes": db_size}

    a, _ = timed(lambda: sh(f"'{bin_dir}/pg_dump' -d {dbname} | gzip > '{out}/a.sql.gz'", env))
    b, _ = timed(lambda: sh(f"'{bin_dir}/pg_dump' -d {dbname} | zstd -q -T2 -3 > '{out}/b.sql.zst'", env))
    res["a_pg_dump_gzip"] = {"wall_s": a, "bytes": (out / "a.sql.gz").stat().st_size}
    res["b_pg_dump_zstd"] = {"wall_s": b, "bytes": (out / "b.sql.zst").stat().st_size}

    cat = catalog_file(c, dbname, out)
    m = materialize(cat, asset("bench"))
    artifact = next((out / "repo" / "postgres" / "daily").glob("*.dump.zst"))
    res["c_asset"] = {**m, "bytes": artifact.stat().st_size}
    res["ratio_c_b_wall"] = m["wall_s"] / b
    res["ratio_c_b_bytes"] = artifact.stat().st_size / (out / "b.sql.zst").stat().st_size
    res["ratio_c_a_wall"] = m["wall_s"] / a

    # raw pg_restore -j2 of the same dump, for the drill and restore comparisons of later steps
    raw = out / "c.dump"
    unz, _ = timed(lambda: sh(f"zstd -q -d -f '{artifact}' -o '{raw}'", env))
    res["zstd_d"] = {"wall_s": unz}
    target = f"{dbname}_raw_restore"
    with c.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{target}"')
    d, _ = timed(lambda: sh(f"'{bin_dir}/pg_restore' -j2 --exit-on-error -d {target} '{raw}'", env))
    res["d_raw_pg_restore_j2"] = {"wall_s": d}
    with c.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
    raw.unlink()
    for extra in EXTRA_POSTGRES:
        res.update(extra(c, cat, artifact, res))
    for f in ("a.sql.gz", "b.sql.zst"):
        (out / f).unlink()
    return res


def bench_drill(c: LocalCluster, cat: Path, artifact: Path, res: dict) -> dict:
    """The restore_drill check of the same dump against raw pg_restore -j2 (d)."""
    from backup_assets.catalog import load_catalog
    from backup_assets.core.verify.checks import find_backup
    from backup_assets.core.verify.restore_drill import restore_drill

    catalog = load_catalog(cat)
    backup = find_backup(catalog, "bench", "full", "daily", "2026-11-20")
    wall, outcome = timed(lambda: restore_drill(catalog, backup, jobs=2))
    assert outcome.passed, outcome.message
    return {"e_restore_drill": {"wall_s": wall, "rto_s": outcome.metadata["rto_s"]},
            "ratio_drill_vs_raw_pg_restore": wall / res["d_raw_pg_restore_j2"]["wall_s"]}


def timed_restore(c: LocalCluster, cat: Path, suffix: str):
    """backup_assets' restore of the catalog's bench backup into a new database: (seconds, backup)."""
    from backup_assets.catalog import load_catalog
    from backup_assets.core.restore.postgres import restore_postgres
    from backup_assets.core.verify.checks import find_backup

    catalog = load_catalog(cat)
    backup = find_backup(catalog, "bench", "full", "daily", "2026-11-20")
    target = f"{backup.manifest.database}_{suffix}"
    with c.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
    wall, result = timed(lambda: restore_postgres(catalog, backup, target_db=target, jobs=2))
    assert result.matches
    with c.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
    return wall, backup


def bench_restore(c: LocalCluster, cat: Path, artifact: Path, res: dict) -> dict:
    """backup_assets' restore of the same dump into a new database against raw pg_restore -j2 (d)."""
    wall, _ = timed_restore(c, cat, "restored")
    return {"f_restore": {"wall_s": wall}, "ratio_restore_vs_raw_pg_restore": wall / res["d_raw_pg_restore_j2"]["wall_s"]}


def bench_encryption(c: LocalCluster, cat: Path, artifact: Path, res: dict) -> dict:
    """(g) the asset with age encryption against (c) without, and (h) the restore of the encrypted
    backup against (f): the price of encryption at rest, on the same database in the same run."""
    import pyrage

    key = pyrage.x25519.Identity.generate()
    work = cat.parent / "encrypted"
    work.mkdir(exist_ok=True)
    (work / "age.key").write_text(f"{key}\n")
    os.environ["BENCH_AGE_IDENTITY"] = str(work / "age.key")
    data = yaml.safe_load(cat.read_text())
    data["repository"]["root"] = str(work / "repo")
    data["encryption"] = {"recipients": [str(key.to_public())], "identity_file_env": "BENCH_AGE_IDENTITY"}
    enc_cat = work / "catalog.yaml"
    enc_cat.write_text(yaml.safe_dump(data))
    # encrypted and plain backups taken in turns, the best of each: a ratio of two walls of a few
    # seconds is otherwise at the mercy of whatever else the machine did in one of them
    encrypted, plain = [], [res["c_asset"]["wall_s"]]
    for _turn in range(3):
        encrypted.append(materialize(enc_cat, asset("bench")))
        plain.append(materialize(cat, asset("bench"))["wall_s"])
    g = min(encrypted, key=lambda r: r["wall_s"])
    wall, backup = timed_restore(c, enc_cat, "restored_enc")
    shutil.rmtree(work)
    return {"g_asset_encrypted": {**g, "bytes": backup.manifest.size_bytes},
            "plain_backup_best_s": min(plain),
            "ratio_encrypted_vs_plain_backup": g["wall_s"] / min(plain),
            "h_restore_encrypted": {"wall_s": wall},
            "ratio_encrypted_vs_plain_restore": wall / res["f_restore"]["wall_s"]}


def bench_cli_with_checks(c: LocalCluster, cat: Path, artifact: Path, res: dict) -> dict:
    """`backup-assets backup` of one partition with every blocking check, drill off
    against (b) `pg_dump | zstd -T2 -3`, drill on against the runbook's whole pipeline: (b), then
    `zstd -d`, `pg_restore -j2` (d) and a row count of every table."""
    from backup_assets.catalog import AUTO_STREAM_CPUS, load_catalog

    catalog = load_catalog(cat)
    env = dict(os.environ, PGPASSWORD=c.password, PGHOST=c.host, PGPORT=str(c.port), PGUSER=c.superuser)
    dbname = catalog.sources["bench"].connection.dbname
    count_all = "SELECT format('SELECT count(*) FROM %I.%I', schemaname, relname) FROM pg_stat_user_tables \\gexec"
    counts, _ = timed(lambda: sh(f"echo \"{count_all}\" | '{embedded_bin_dir()}/psql' -qAt -d {dbname} > /dev/null", env))
    out = {}
    # an instance that exists already, as an operator's does (creating its storage is a first run's cost only)
    home = Path(tempfile.mkdtemp())
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    subprocess.run([sys.executable, "-c", "from backup_assets.demo.__main__ import prepare_instance; prepare_instance()"],
                   check=True, env=dict(os.environ, DAGSTER_HOME=str(home)))
    # the checks read the artifact after writing it, and (catalog `checks_while_writing`) read the
    # stream while it is written; "auto" picks the latter on machines with AUTO_STREAM_CPUS cores
    for drill in (False, True):
        for while_writing in (False, True):
            data = yaml.safe_load(cat.read_text())
            root = cat.parent / f"cli_{drill}_{while_writing}"
            data["repository"]["root"] = str(root)
            data["tiers"] = {"daily": {"drill": drill}}
            data["checks_while_writing"] = while_writing
            data["sources"]["bench"]["globals"] = False
            path = cat.parent / f"catalog_cli_{drill}_{while_writing}.yaml"
            path.write_text(yaml.safe_dump(data))
            wall, _ = timed(lambda: subprocess.run(
                [sys.executable, "-m", "backup_assets.cli", "--catalog", str(path), "backup", "--tier", "daily",
                 "--partition", "2026-11-20", "--select", "bench/full"],
                check=True, env=dict(os.environ, DAGSTER_HOME=str(home))))
            shutil.rmtree(root, ignore_errors=True)
            name = "i_cli_backup_checks" + ("_drill" if drill else "") + ("_while_writing" if while_writing else "")
            out[name] = {"wall_s": wall}
    runbook = res["b_pg_dump_zstd"]["wall_s"] + res["zstd_d"]["wall_s"] + res["d_raw_pg_restore_j2"]["wall_s"] + counts
    out["runbook_pipeline_s"] = runbook
    auto = "_while_writing" if (os.cpu_count() or 1) >= AUTO_STREAM_CPUS else ""
    out["checks_while_writing_auto"] = bool(auto)
    for suffix in ("", "_while_writing"):
        out["ratio_cli_checks_vs_dump_zstd" + suffix] = (out["i_cli_backup_checks" + suffix]["wall_s"]
                                                         / res["b_pg_dump_zstd"]["wall_s"])
        out["ratio_cli_checks_drill_vs_runbook" + suffix] = (out["i_cli_backup_checks_drill" + suffix]["wall_s"]
                                                             / runbook)
    # the headline: what this machine does by default
    out["ratio_cli_checks_vs_dump_zstd_default"] = out["ratio_cli_checks_vs_dump_zstd" + auto]
    out["ratio_cli_checks_drill_vs_runbook_default"] = out["ratio_cli_checks_drill_vs_runbook" + auto]
    return out


# later benchmarks register here: fn(cluster, catalog_path, artifact, results) -> dict
EXTRA_POSTGRES: list = [bench_drill, bench_restore, bench_encryption, bench_cli_with_checks]


def bench_daemon_run(c: LocalCluster, work: Path) -> dict:
    """One partition of `daily_backups` for a demo-sized catalog (MyloWare PostgreSQL with full,
    core and kb, the roles backup, a Miyabi SQLite store; drill on): launched through the queued
    run coordinator and run by `dagster-daemon` with the default run launcher, against the CLI's
    in-process `backup-assets backup` of the same partition (goal: <= 1.5x)."""

    from backup_assets.demo.seed import DEMO_SCALE

    root = Path(__file__).resolve().parents[1]
    with c.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'bench_demo'").fetchone():
            conn.execute('CREATE DATABASE "bench_demo"')
            with c.connect("bench_demo") as db:
                seed_myloware(db, DEMO_SCALE)
    lite = work / "daemon" / "miyabi.db"
    seed_miyabi(lite)
    catalog = {
        "repository": {"root": str(work / "daemon" / "repo")}, "start_date": "2026-11-01",
        "tiers": {"daily": {"drill": True}},
        "sources": {
            "myloware": {"engine": "postgres", "connection": {
                "host": c.host, "port": c.port, "dbname": "bench_demo", "user": c.superuser,
                "password_env": PASSWORD_ENV},
                "groups": {"full": {}, "core": {"tables": ["runs", "artifacts", "webhook_events", "hitl_approvals"]},
                           "kb": {"tables": ["kb_documents", "kb_embeddings"]}}},
            "miyabi": {"engine": "sqlite", "path": str(lite)},
        },
    }
    path = work / "daemon" / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    partition = "2026-11-20"

    cli_home = work / "daemon" / "cli_home"
    cli_home.mkdir()
    env = dict(os.environ, BACKUP_ASSETS_CATALOG=str(path), DAGSTER_HOME=str(cli_home))
    cli, _ = timed(lambda: subprocess.run([sys.executable, "-m", "backup_assets.cli", "backup", "--tier", "daily",
                                           "--partition", partition], check=True, env=env, capture_output=True))
    shutil.rmtree(catalog["repository"]["root"])

    home = work / "daemon" / "dagster_home"
    home.mkdir()
    # the project's instance settings (queued run coordinator, pools), with SQLite storage and
    # Dagster's default run launcher
    instance_cfg = yaml.safe_load((root / "dagster.yaml").read_text())
    for name in ("storage", "run_launcher", "run_monitoring"):
        instance_cfg.pop(name, None)
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_cfg))
    env = dict(os.environ, BACKUP_ASSETS_CATALOG=str(path), DAGSTER_HOME=str(home))
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()  # creates the storage before any other process opens it
    instance.get_runs(limit=1)
    from bench.daemon import daemon_run

    record, submit_s = daemon_run(instance, env, partition)
    daemon_wall = record.end_time - record.create_timestamp.timestamp()
    return {"cli_in_process_s": cli, "daemon_launched_s": daemon_wall, "ratio_daemon_vs_cli": daemon_wall / cli,
            "job_launch_command_s": submit_s}


LOAD_DEFS = r"""
import json, resource, sys, time
start = time.process_time()
if sys.argv[1] == "dagster":
    import dagster
else:
    import backup_assets.definitions as d
    repo = d.defs.get_repository_def()
    jobs = [repo.get_job(j.name) for j in repo.get_all_jobs()]
print(json.dumps({"cpu_s": time.process_time() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_definitions(work: Path, sizes=(25, 50, 100), repeat: int = 3) -> dict:
    """Loading the definitions of a fleet catalog (bench/fleet.py: N PostgreSQL sources x 3 groups
    x 3 tiers, S3) and resolving every job, against `import dagster` alone: CPU time (best of
    `repeat` runs) and peak memory, and the memory each further source costs."""
    from bench.fleet import fleet_catalog

    def run(what: str, catalog: Path | None = None) -> dict:
        env = dict(os.environ, FLEET_PG_PASSWORD="x", PYTHONWARNINGS="default")
        if catalog is not None:
            env["BACKUP_ASSETS_CATALOG"] = str(catalog)
        best = None
        for _ in range(repeat):
            proc = subprocess.run([sys.executable, "-c", LOAD_DEFS, what], check=True, capture_output=True, text=True,
                                  env=env)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            got["warning_lines"] = sum(1 for line in proc.stderr.splitlines() if "Warning:" in line)
            best = got if best is None or got["cpu_s"] < best["cpu_s"] else best
        return best

    res = {"import_dagster": run("dagster"), "fleet": {}}
    for n in sizes:
        path = work / f"fleet_{n}.yaml"
        path.write_text(yaml.safe_dump(fleet_catalog(n, root=str(work / "fleet_repo"))))
        res["fleet"][n] = run("defs", path)
    big, small = res["fleet"][max(sizes)], res["fleet"][min(sizes)]
    res["ratio_defs_vs_import_dagster_cpu"] = big["cpu_s"] / res["import_dagster"]["cpu_s"]
    res["mb_per_source"] = (big["peak_rss_mb"] - small["peak_rss_mb"]) / (max(sizes) - min(sizes))
    return res


def bench_sqlite(fresh: bool, work: Path) -> dict:
    src = DATA / "miyabi-bench.db"
    if fresh or not src.exists():
        src.unlink(missing_ok=True)
        print("generating the SQLite store ...", flush=True)
        seed_miyabi(src, runs=150_000, checkpoints_per_run=3, payload_bytes=1024)
    out = work / "sqlite"
    out.mkdir(parents=True, exist_ok=True)
    raw, _ = timed(lambda: subprocess.run(["sqlite3", str(src), f".backup '{out}/raw.db'"], check=True))
    cat = _sqlite_catalog(out, src)
    m = materialize(cat, asset("benchlite"))
    artifact = next((out / "repo" / "sqlite" / "daily").glob("*.db.zst"))
    (out / "raw.db").unlink()
    return {"database_bytes": src.stat().st_size, "sqlite3_backup": {"wall_s": raw},
            "asset": {**m, "bytes": artifact.stat().st_size}, "ratio_asset_backup_wall": m["wall_s"] / raw}


UPLOAD = r"""
import json, resource, sys, time
from backup_assets.catalog import S3Replication
from backup_assets.core.storage.s3 import S3Storage
cfg = S3Replication(bucket="bench", endpoint_url=sys.argv[1], part_size_mb=64)
import boto3
client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
start = time.perf_counter()
S3Storage(cfg, client).put_file(__import__("pathlib").Path(sys.argv[2]), "bench/artifact.zst", sha256=sys.argv[3])
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_s3_upload(gb: float, work: Path) -> dict:
    """Streaming multipart upload of a large artifact to moto's server: peak RSS of the uploader."""
    import hashlib

    from moto.server import ThreadedMotoServer

    path = work / "big.zst"
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(int(gb * 1024)):
            block = os.urandom(1 << 20)
            digest.update(block)
            fh.write(block)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="bench")
        out = subprocess.run([sys.executable, "-c", UPLOAD, f"http://127.0.0.1:{port}", str(path), digest.hexdigest()],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        path.unlink()
    return {"artifact_bytes": int(gb * 1024**3), **result}


def _sqlite_catalog(root: Path, src: Path) -> Path:
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump({"repository": {"root": str(root / "repo")},
                                    "sources": {"benchlite": {"engine": "sqlite", "path": str(src)}}}))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--s3-upload-gb", type=float, default=2.0, help="size of the S3 upload test (0: skip)")
    parser.add_argument("--only-s3", action="store_true", help="only the S3 upload test")
    parser.add_argument("--only-definitions", action="store_true",
                        help="only the definitions load, the daemon-launched run and the fleet run")
    args = parser.parse_args(argv)
    if not shutil.which("zstd") or not shutil.which("sqlite3"):
        sys.exit("bench needs the zstd and sqlite3 command-line tools (apt-get install zstd sqlite3)")
    work = Path(tempfile.mkdtemp(prefix="backup_assets_bench_", dir=DATA if DATA.exists() else None))
    c = cluster()
    results: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "cpus": os.cpu_count(), "postgres": {}}
    try:
        print("== Definitions of a fleet catalog (100 PostgreSQL sources x 3 groups x 3 tiers, S3)", flush=True)
        results["definitions"] = dfs = bench_definitions(work)
        for n, r in dfs["fleet"].items():
            print(f"  {n:3d} sources: {r['cpu_s']:.2f}s CPU, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['warning_lines']} warning line(s)")
        print(f"  import dagster: {dfs['import_dagster']['cpu_s']:.2f}s CPU -> ratio "
              f"{dfs['ratio_defs_vs_import_dagster_cpu']:.2f} (goal <= 3); {dfs['mb_per_source']:.2f} MB per source")
        print("== A daily_backups partition of a demo-sized catalog: daemon-launched run against the CLI", flush=True)
        results["daemon_run"] = dr = bench_daemon_run(c, work)
        print(f"  CLI in-process {dr['cli_in_process_s']:.1f}s, daemon-launched {dr['daemon_launched_s']:.1f}s -> "
              f"ratio {dr['ratio_daemon_vs_cli']:.2f} (goal <= 1.5)")
        print("== The fleet run: 30 databases on 3 servers, one daily partition of all of them", flush=True)
        from bench.fleet_run import bench_fleet_run, report as report_fleet

        (work / "fleet").mkdir()
        results["fleet_run"] = fr = bench_fleet_run(work / "fleet")
        report_fleet(fr)
        if args.only_definitions:
            args.sizes, args.s3_upload_gb, args.skip_sqlite = "", 0, True
        if not args.only_definitions and not args.only_s3:
            print("== Point-in-time recovery: wal-push under a pgbench load", flush=True)
            from bench.pitr import bench_pitr, report as report_pitr

            (work / "pitr").mkdir()
            results["pitr"] = pr = bench_pitr(work / "pitr")
            report_pitr(pr)
            print("== PostgreSQL's regression database: backup with checks and drill against pg_dump -Fc", flush=True)
            from bench.regression import bench_regression, report as report_regression

            (work / "regression").mkdir()
            os.chmod(work, 0o755)  # the throwaway PostgreSQL 15 server's user traverses it
            results["regression"] = rg = bench_regression(work / "regression")
            report_regression(rg)
            print("== A 65 MB database through the command line: backup with checks and drill against pg_dump -Fc",
                  flush=True)
            from bench.regression import bench_small_cli, report_small

            (work / "small").mkdir()
            results["small_cli"] = sm = bench_small_cli(work / "small")
            report_small(sm)
            print("== Point-in-time recovery against pgBackRest, side by side", flush=True)
            from bench.peer import bench_peer, report as report_peer

            (work / "peer").mkdir()
            results["peer"] = pe = bench_peer(work / "peer")
            report_peer(pe)
            print("== The same pairs on PostgreSQL 18, against the raw tools (pgBackRest 2.45 has no 18)", flush=True)
            (work / "peer18").mkdir()
            results["peer18"] = pe18 = bench_peer(work / "peer18", postgres=18)
            report_peer(pe18)
        for size in ([] if args.only_s3 or not args.sizes else args.sizes.split(",")):
            print(f"== PostgreSQL {size}", flush=True)
            results["postgres"][size] = bench_postgres(c, size, args.fresh, work)
            report_pg(size, results["postgres"][size])
        if args.s3_upload_gb > 0:
            print(f"== S3 multipart upload of {args.s3_upload_gb:g} GB", flush=True)
            results["s3_upload"] = u = bench_s3_upload(args.s3_upload_gb, work)
            print(f"  {u['wall_s']:.1f}s, peak RSS {u['peak_rss_mb']:.0f} MB (goal <= 300 MB)")
        if not args.skip_sqlite and not args.only_s3:
            print("== SQLite", flush=True)
            results["sqlite"] = bench_sqlite(args.fresh, work)
            s = results["sqlite"]
            print(f"  sqlite3 .backup {s['sqlite3_backup']['wall_s']:.1f}s, asset {s['asset']['wall_s']:.1f}s "
                  f"-> ratio {s['ratio_asset_backup_wall']:.2f} (goal <= 1.5), peak RSS {s['asset']['peak_rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")
    return 0


def report_pg(size: str, r: dict) -> None:
    mb = 1 / 1e6
    print(f"  database {r['database_bytes'] * mb:.0f} MB")
    print(f"  (a) pg_dump | gzip      {r['a_pg_dump_gzip']['wall_s']:7.1f}s  {r['a_pg_dump_gzip']['bytes'] * mb:8.1f} MB")
    print(f"  (b) pg_dump | zstd -T2  {r['b_pg_dump_zstd']['wall_s']:7.1f}s  {r['b_pg_dump_zstd']['bytes'] * mb:8.1f} MB")
    print(f"  (c) asset               {r['c_asset']['wall_s']:7.1f}s  {r['c_asset']['bytes'] * mb:8.1f} MB  "
          f"peak RSS {r['c_asset']['peak_rss_mb']:.0f} MB")
    print(f"  (c)/(b) wall {r['ratio_c_b_wall']:.2f} (goal <= 1.2), size {r['ratio_c_b_bytes']:.2f} (goal <= 1.05); "
          f"(c)/(a) wall {r['ratio_c_a_wall']:.2f}")
    print(f"  (d) raw pg_restore -j2  {r['d_raw_pg_restore_j2']['wall_s']:7.1f}s")
    if "g_asset_encrypted" in r:
        print(f"  (g) asset, age-encrypted {r['g_asset_encrypted']['wall_s']:6.1f}s  peak RSS "
              f"{r['g_asset_encrypted']['peak_rss_mb']:.0f} MB (goal <= 300 MB)")
    goals = {"ratio_drill_vs_raw_pg_restore": 1.2, "ratio_restore_vs_raw_pg_restore": 1.1,
             "ratio_encrypted_vs_plain_backup": 1.1, "ratio_encrypted_vs_plain_restore": 1.1,
             "ratio_cli_checks_vs_dump_zstd": 1.3, "ratio_cli_checks_drill_vs_runbook": 1.2}
    for key, value in r.items():
        if key.startswith("ratio_") and key not in ("ratio_c_b_wall", "ratio_c_b_bytes", "ratio_c_a_wall"):
            base = key.removesuffix("_while_writing").removesuffix("_default")
            goal = f" (goal <= {goals[base]})" if base in goals else ""
            print(f"  {key} {value:.2f}{goal}")


if __name__ == "__main__":
    sys.exit(main())
