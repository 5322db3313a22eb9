"""Point-in-time recovery under a steady writer (issue 14): a PostgreSQL 18 server archiving through
`backup-assets wal-push` while pgbench writes. Prints
  - the WAL generation rate of the pgbench load and the throughput of wal-push (ratio, goal >= 5),
  - the recovery point over the run: the age of the newest archived segment, sampled every second
    (goal <= 60 s with archive_timeout = 60).

    python -m bench.pitr [--seconds 60] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backup_assets.demo.cluster import SERVER_USER, LocalCluster, _open_path_for, embedded_bin_dir, free_port


def bench_pitr(work: Path, seconds: int = 60, clients: int = 2) -> dict:
    shared = work / "shared"
    repo = shared / "backups"
    repo.mkdir(parents=True)
    c = LocalCluster(embedded_bin_dir(), work / "pg", free_port(), "pitr-" + os.urandom(6).hex())
    catalog = shared / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"repository": {"root": str(repo)}, "sources": {"bench": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"host": c.host, "port": c.port, "dbname": "postgres"}}}}))
    c.init()
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        _open_path_for(repo)
        shared.chmod(0o755)
        catalog.chmod(0o644)
        os.chown(repo, user.pw_uid, user.pw_gid)
        _open_path_for(Path(sys.executable).resolve())
    push = f"{sys.executable} -m backup_assets.cli --catalog {catalog} wal-push --source bench %p"
    with open(c.data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"archive_mode = on\narchive_command = '{push}'\narchive_timeout = 60\n")
    c.start()
    try:
        env = dict(os.environ, PGPASSWORD=c.password, PGHOST=c.host, PGPORT=str(c.port), PGUSER=c.superuser)
        pgbench = str(Path(embedded_bin_dir()) / "pgbench")
        subprocess.run([pgbench, "-i", "-s", "20", "-q", "postgres"], check=True, env=env, capture_output=True)
        with c.connect() as conn:
            conn.execute("SELECT pg_switch_wal()")
            start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            load = subprocess.Popen([pgbench, "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-n",
                                     "postgres"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.monotonic()
            ages = []
            while load.poll() is None:
                last = conn.execute("SELECT extract(epoch FROM now() - last_archived_time) FROM pg_stat_archiver"
                                    ).fetchone()[0]
                if last is not None:
                    ages.append(float(last))
                time.sleep(1)
            elapsed = time.monotonic() - started
            wal_bytes = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start_lsn,)).fetchone()[0]
            failed = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
        segs = sorted((repo / "wal" / "bench").glob("*.json"))
        # wal-push alone, one process per segment as PostgreSQL runs it, over copies of archived segments
        sample = work / "sample"
        sample.mkdir()
        scratch_catalog = work / "scratch.yaml"
        scratch_catalog.write_text(yaml.safe_dump({"repository": {"root": str(work / "scratch_repo")}, "sources": {
            "bench": {"engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "postgres"}}}}))
        names = [p.name[:-5] for p in segs if len(p.name) == 29][:8]
        for name in names:
            fetched = sample / name
            subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", str(catalog), "wal-fetch",
                            "--source", "bench", name, str(fetched)], check=True, capture_output=True)
        t0 = time.perf_counter()
        for name in names:
            subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", str(scratch_catalog), "wal-push",
                            "--source", "bench", str(sample / name)], check=True, capture_output=True)
        push_s = time.perf_counter() - t0
        pushed = sum((sample / n).stat().st_size for n in names)
    finally:
        c.destroy()
    wal_rate = float(wal_bytes) / elapsed
    push_rate = pushed / push_s if push_s else 0.0
    return {"seconds": elapsed, "clients": clients, "wal_bytes": int(wal_bytes), "wal_rate_mb_s": wal_rate / 1e6,
            "wal_push_rate_mb_s": push_rate / 1e6, "ratio_push_vs_wal_rate": push_rate / wal_rate if wal_rate else None,
            "segments_pushed_in_sample": len(names), "archive_failures": failed,
            "rpo_max_s": max(ages) if ages else None, "rpo_samples": len(ages)}


def report(r: dict) -> None:
    print(f"  pgbench ({r['clients']} clients, {r['seconds']:.0f}s) wrote WAL at {r['wal_rate_mb_s']:.1f} MB/s; wal-push "
          f"archives {r['wal_push_rate_mb_s']:.1f} MB/s -> ratio {r['ratio_push_vs_wal_rate']:.1f} (goal >= 5)")
    print(f"  recovery point: newest archived segment at most {r['rpo_max_s']:.1f}s old over {r['rpo_samples']} samples "
          f"(goal <= 60 s with archive_timeout = 60); archive failures: {r['archive_failures']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="backup_assets_pitr_"))
    try:
        r = bench_pitr(work, args.seconds, args.clients)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
