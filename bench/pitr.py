"""Point-in-time recovery under a steady writer: a PostgreSQL 18 server archiving through
`backup-assets wal-push` while pgbench writes, twice: with fsynced commits and as a heavy writer
(synchronous_commit off, more clients). Prints, per load,
  - the WAL generation rate of the pgbench load and the throughput of wal-push (ratio, goal >= 5),
  - the recovery point over the run: the age of the newest archived segment, sampled every second
    (goal <= 60 s with archive_timeout = 60);
and restore --to-time (a time inside the heavy load, from the base backup taken before both) against the raw
equivalent (untar the base backup, restore_command = zstd -d of the same archived segments), side by side
(goal <= 1.3).

    python -m bench.pitr [--seconds 45]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backup_assets.demo.cluster import SERVER_USER, LocalCluster, _open_path_for, embedded_bin_dir, free_port


PAIRS = 2  # of the restore to a time: ours and the raw equivalent, alternating
LOADS = {  # name: (clients, synchronous_commit)
    "fsynced": (2, "on"),        # every commit waits for its WAL flush (this VM's fsync bounds the rate)
    "heavy": (4, "off"),         # commits do not wait: the WAL rate is bound by the CPU
}


def _wait_archived(conn, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
        if last and last[:24] >= name:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name} not archived in {timeout:g}s")


def _load(conn, pgbench: str, env: dict, name: str, seconds: int) -> dict:
    """One pgbench load with the recovery point sampled every second."""
    clients, sync = LOADS[name]
    conn.execute(f"ALTER SYSTEM SET synchronous_commit = {sync}")
    conn.execute("SELECT pg_reload_conf()")
    start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    failed_before = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
    load = subprocess.Popen([pgbench, "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-n", "postgres"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    ages, marks = [], []
    while load.poll() is None:
        last = conn.execute("SELECT extract(epoch FROM now() - last_archived_time), now() FROM pg_stat_archiver"
                            ).fetchone()
        if last[0] is not None:
            ages.append(float(last[0]))
        marks.append(last[1])
        time.sleep(1)
    elapsed = time.monotonic() - started
    wal_bytes = float(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start_lsn,)).fetchone()[0])
    failed = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0] - failed_before
    return {"clients": clients, "synchronous_commit": sync, "seconds": elapsed, "wal_bytes": int(wal_bytes),
            "wal_rate_mb_s": wal_bytes / elapsed / 1e6, "rpo_max_s": max(ages) if ages else None,
            "rpo_samples": len(ages), "archive_failures": failed,
            # a time well inside the load (commits on both sides of it) for the restore comparison
            "target": marks[int(len(marks) * 0.8)] if marks else None}


def _recover_raw(work: Path, base: Path, wal: Path, bin_dir: Path, target, port: int, settings: dict,
                 name: str = "raw_recovered") -> float:
    """The raw equivalent of restore --to-time: untar the base backup, restore_command = zstd -d of the same
    archived segments, recovery to the target, promote. Wall seconds until the server accepts connections."""
    pgdata = work / name
    pgdata.mkdir(mode=0o700)
    user = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    t0 = time.perf_counter()
    subprocess.run(f"zstd -d -q -c {base} | tar -x -C {pgdata}", shell=True, check=True)
    limits = "".join(f"{k} = {int(v)}\n" for k, v in sorted(settings.items()))
    with open(pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write(f"restore_command = 'zstd -d -q -f {wal}/%f.zst -o %p'\narchive_mode = off\n"
                   f"recovery_target_time = '{target.isoformat()}'\nrecovery_target_action = 'promote'\n"
                   f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{pgdata}'\n{limits}")
    (pgdata / "recovery.signal").touch()
    if user is not None:
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(pgdata)], check=True)
    log = pgdata / "recovery.log"
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-l", str(log), "start"], check=True,
                   capture_output=True, user=user.pw_uid if user else None, group=user.pw_gid if user else None)
    while "archive recovery complete" not in (log.read_text(errors="replace") if log.exists() else "") or \
            "ready to accept connections" not in log.read_text(errors="replace"):
        if "FATAL" in log.read_text(errors="replace"):
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"], capture_output=True,
                   user=user.pw_uid if user else None, group=user.pw_gid if user else None)
    return wall


def bench_pitr(work: Path, seconds: int = 45) -> dict:
    shared = work / "shared"
    repo = shared / "backups"
    repo.mkdir(parents=True)
    bin_dir = Path(embedded_bin_dir())
    c = LocalCluster(bin_dir, work / "pg", free_port(), "pitr-" + os.urandom(6).hex())
    catalog = shared / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"repository": {"root": str(repo)}, "sources": {"bench": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {
            "host": c.host, "port": c.port, "dbname": "postgres", "password_env": "BENCH_PITR_PASSWORD"}}}}))
    c.init()
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        _open_path_for(repo)
        shared.chmod(0o755)
        catalog.chmod(0o644)
        os.chown(repo, user.pw_uid, user.pw_gid)
        _open_path_for(Path(sys.executable).resolve())
    push = f"{sys.executable} -m backup_assets --catalog {catalog} wal-push --source bench %p"
    with open(c.data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"archive_mode = on\narchive_command = '{push}'\narchive_timeout = 60\n")
    c.start()
    cli = [sys.executable, "-m", "backup_assets.cli", "--catalog", str(catalog)]
    runas = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
    result: dict = {}
    try:
        env = dict(os.environ, PGPASSWORD=c.password, PGHOST=c.host, PGPORT=str(c.port), PGUSER=c.superuser,
                   BENCH_PITR_PASSWORD=c.password)
        pgbench = str(bin_dir / "pgbench")
        subprocess.run([pgbench, "-i", "-s", "20", "-q", "postgres"], check=True, env=env, capture_output=True)
        subprocess.run([*cli, "basebackup", "--source", "bench"], check=True, env=env, capture_output=True)
        with c.connect() as conn:
            conn.execute("SELECT pg_switch_wal()")
            for name in LOADS:
                result[name] = _load(conn, pgbench, env, name, seconds)
            last = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
            conn.execute("SELECT pg_switch_wal()")
            _wait_archived(conn, last)
        segs = sorted((repo / "wal" / "bench").glob("*.json"))
        # wal-push alone, one process per segment as PostgreSQL runs it, over copies of archived segments
        sample = work / "sample"
        sample.mkdir()
        scratch_catalog = work / "scratch.yaml"
        scratch_catalog.write_text(yaml.safe_dump({"repository": {"root": str(work / "scratch_repo")}, "sources": {
            "bench": {"engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "postgres"}}}}))
        names = [p.name[:-5] for p in segs if len(p.name) == 29][-8:]
        for name in names:
            subprocess.run([*cli, "wal-fetch", "--source", "bench", name, str(sample / name)], check=True,
                           capture_output=True)
        def push_one(name: str) -> None:  # as PostgreSQL runs it: the console script's fast path
            subprocess.run([sys.executable, "-m", "backup_assets", "--catalog", str(scratch_catalog), "wal-push",
                            "--source", "bench", str(sample / name)], check=True, capture_output=True)

        push_one(names[0])  # the first push after a catalog change loads it fully (then cached): not timed
        t0 = time.perf_counter()
        for name in names[1:]:
            push_one(name)
        push_s = time.perf_counter() - t0
        pushed = sum((sample / n).stat().st_size for n in names[1:])
        result["wal_push_rate_mb_s"] = pushed / push_s / 1e6
        for name in LOADS:
            result[name]["ratio_push_vs_wal_rate"] = result["wal_push_rate_mb_s"] / result[name]["wal_rate_mb_s"]
        # restore to a time inside the heavy load: ours (restore --to-time) and the raw equivalent, side by side
        target = result["heavy"]["target"]
        base_meta = json.loads(next((repo / "base" / "bench").glob("base-*.json")).read_text())
        replay = sum(1 for p in segs if len(p.name) == 29 and p.name[8:24] >= base_meta["start_wal"][8:])
        def ours(i: int) -> tuple[float, str]:
            port = free_port()
            t0 = time.perf_counter()
            done = subprocess.run([*cli, "restore", "--source", "bench", "--to-time", target.isoformat(), "--pgdata",
                                   str(work / f"recovered{i}"), "--port", str(port), "--confirm", "--timings", *runas],
                                  check=True, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            LocalCluster(bin_dir, work / f"recovered{i}", port, c.password).stop("immediate")
            return wall, next((ln.split("timings: ", 1)[1] for ln in done.stdout.splitlines()
                               if ln.startswith("timings: ")), "")

        def raw(i: int) -> float:
            return _recover_raw(work, repo / "base" / "bench" / base_meta["artifact"], repo / "wal" / "bench", bin_dir,
                                target, free_port(), base_meta.get("settings", {}), name=f"raw_recovered{i}")

        # alternating pairs, the raw one first in the first: whichever goes second finds the archived segments in
        # the page cache
        walls, raws, phases = [], [], []
        for i in range(PAIRS):
            if i % 2 == 0:
                raws.append(raw(i))
            wall, timings = ours(i)
            walls.append(wall)
            phases.append(timings)
            if i % 2 == 1:
                raws.append(raw(i))
        ours_s, raw_s = statistics.median(walls), statistics.median(raws)
        result["restore_to_time"] = {"target": target.isoformat(), "segments_replayed_at_most": replay,
                                     "ours_s": ours_s, "raw_s": raw_s, "ratio": ours_s / raw_s,
                                     "pairs": [round(o / r, 2) for o, r in zip(walls, raws)], "ours_timings": phases}
    finally:
        c.destroy()
    for name in LOADS:
        result[name]["target"] = result[name]["target"].isoformat() if result[name].get("target") else None
    return result


def report(r: dict) -> None:
    for name in LOADS:
        x = r[name]
        print(f"  {name} load: pgbench {x['clients']} clients, synchronous_commit={x['synchronous_commit']}, "
              f"{x['seconds']:.0f}s: WAL at {x['wal_rate_mb_s']:.1f} MB/s; wal-push archives "
              f"{r['wal_push_rate_mb_s']:.1f} MB/s -> ratio {x['ratio_push_vs_wal_rate']:.1f} (goal >= 5)")
        print(f"    recovery point: newest archived segment at most {x['rpo_max_s']:.1f}s old over {x['rpo_samples']} "
              f"samples (goal <= 60 s with archive_timeout = 60); archive failures: {x['archive_failures']}")
    t = r["restore_to_time"]
    print(f"  restore --to-time (base backup + up to {t['segments_replayed_at_most']} segments): {t['ours_s']:.1f}s vs raw "
          f"untar + zstd -d restore_command {t['raw_s']:.1f}s -> ratio {t['ratio']:.2f} (medians of {len(t['pairs'])} "
          f"alternating pairs: {', '.join(f'{x:.2f}' for x in t['pairs'])}; goal <= 1.3)")
    for phases in t["ours_timings"]:
        print(f"    where our restore's time goes: {phases}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=45, help="seconds of each load")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="backup_assets_pitr_"))
    try:
        r = bench_pitr(work, args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
