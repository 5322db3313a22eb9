"""The physical tier side by side with pgBackRest, the tool most PostgreSQL operators would pick instead.

One PostgreSQL 15 cluster (Debian's: the pgBackRest Debian ships, 2.45, does not support 18) archives its WAL
through both tools (`archive_command = 'backup-assets wal-push … %p && pgbackrest archive-push %p'`), pgbench
data, then alternating pairs (the order flips every pair, so neither tool always runs on a warm cache):

  - full base backup: `backup-assets basebackup --kind full --local-only` vs `pgbackrest backup --type=full`
    (both zstd level 3, two processes, a fast checkpoint);
  - restore to the end of the archive, until the server accepts connections and is out of recovery:
    `backup-assets restore --latest` vs `pgbackrest restore` + `pg_ctl start`;
  - restore to a time between two commits after the backup (`restore --to-time T` vs `pgbackrest restore
    --type=time --target=T --target-action=promote`), likewise; both checked to hold exactly the rows
    committed before the target;
  - the size of one full backup, and of the WAL archive.

Medians and per-pair ratios (ours / pgBackRest) in the JSON. Without `pgbackrest` on PATH (Debian: `apt-get
install pgbackrest`) it says so and skips.

`--postgres 18` runs the same pairs on the embedded PostgreSQL 18, which Debian's pgBackRest does not support,
against the raw equivalent instead: `pg_basebackup -Ft -X none | zstd -T2 -3` for the backup, and for the
restores untar + `zstd -d` + `restore_command = zstd -d` of the same archived segments, `pg_ctl start`.

    python -m bench.peer [--scale 20] [--pairs 2] [--postgres 15|18]
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

PG15 = Path("/usr/lib/postgresql/15/bin")
STANZA = "bench"


def _as_server(user) -> dict:
    return {"user": user.pw_uid, "group": user.pw_gid} if user else {}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _wait_out_of_recovery(port: int, password: str, timeout: float = 600) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres",
                                 connect_timeout=2) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return
        except psycopg.OperationalError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server on port {port} did not leave recovery in {timeout:g}s")


class Peer:
    """pgBackRest, configured for the bench cluster: its repository, lock, spool and log under a folder the
    server's user owns (archive-push runs as that user)."""

    def __init__(self, work: Path, cluster: LocalCluster, user):
        self.root = work / "pgbackrest"
        for sub in ("repo", "lock", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "pgbackrest.conf"
        self.conf.write_text(
            "[global]\n"
            f"repo1-path={self.root / 'repo'}\nlock-path={self.root / 'lock'}\nspool-path={self.root / 'spool'}\n"
            f"log-path={self.root / 'log'}\nlog-level-console=warn\nlog-level-file=info\n"
            "compress-type=zst\ncompress-level=3\nprocess-max=2\nstart-fast=y\nrepo1-retention-full=100\n"
            f"[{STANZA}]\npg1-path={cluster.data_dir}\npg1-port={cluster.port}\npg1-socket-path={cluster.data_dir}\n"
            f"pg1-user={cluster.superuser}\n")
        self.user = user
        if user:
            subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(self.root)], check=True)
            _open_path_for(self.root)

    def command(self) -> str:
        return f"pgbackrest --config={self.conf} --stanza={STANZA}"

    def run(self, *args: str, env: dict) -> subprocess.CompletedProcess:
        done = subprocess.run(["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args], env=env,
                              capture_output=True, text=True, **_as_server(self.user))
        if done.returncode != 0:
            raise RuntimeError(f"pgbackrest {' '.join(args)}: {done.stdout[-1000:]}{done.stderr[-2000:]}")
        return done


class Raw:
    """The raw tools a script would use, for the PostgreSQL pgBackRest does not support: pg_basebackup's tar to
    zstd, and back with tar, zstd and a restore_command of `zstd -d` over our own archived segments."""

    def __init__(self, work: Path, cluster: LocalCluster, wal: Path, user):
        self.root, self.cluster, self.wal, self.user = work / "raw", cluster, wal, user
        self.root.mkdir()
        self.backups: list[Path] = []

    def command(self) -> str:
        return ""

    def backup(self, env: dict) -> None:
        out = self.root / f"base-{len(self.backups)}.tar.zst"
        subprocess.run(["bash", "-o", "pipefail", "-c",
                        f"'{self.cluster.bin_dir / 'pg_basebackup'}' -D - -Ft -X none --checkpoint=fast "
                        f"| zstd -q -T2 -3 -o '{out}'"], check=True, env=env)
        self.backups.append(out)

    def restore(self, pgdata: Path, kind: str, target: str) -> None:
        pgdata.mkdir(mode=0o700)
        subprocess.run(["bash", "-o", "pipefail", "-c", f"zstd -q -d -c '{self.backups[-1]}' | tar -x -C '{pgdata}'"],
                       check=True)
        with open(pgdata / "postgresql.auto.conf", "a") as conf:
            conf.write(f"restore_command = 'zstd -d -q -f {self.wal}/%f.zst -o %p'\n")
            if kind == "restore_to_time":
                conf.write(f"recovery_target_time = '{target}'\nrecovery_target_action = 'promote'\n")
        (pgdata / "recovery.signal").touch()
        if self.user:
            subprocess.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(pgdata)], check=True)


def _restore(who: str, kind: str, pgdata: Path, *, cli, env, peer, user, password: str, target: str,
             expected: tuple[int, int], bin_dir: Path = PG15) -> tuple[float, bool, str]:
    """One restore (to the end of the archive, or to `target`) until the server accepts connections out of
    recovery; its seconds, whether it holds exactly the expected rows (pgbench_accounts, after_backup), and our
    restore's own timeline."""
    import psycopg

    port, phases = free_port(), ""
    t0 = time.perf_counter()
    if who == "ours":
        how = ["--latest"] if kind == "restore" else ["--to-time", target]
        done = subprocess.run([*cli, "restore", "--source", "bench", *how, "--pgdata", str(pgdata), "--port", str(port),
                               "--confirm", "--timings"], check=True, env=env, capture_output=True, text=True)
        _wait_out_of_recovery(port, password)
        phases = next((ln.split("timings: ", 1)[1] for ln in done.stdout.splitlines() if ln.startswith("timings: ")),
                      "")
    else:
        if isinstance(peer, Raw):
            peer.restore(pgdata, kind, target)
        else:
            pgdata.mkdir(mode=0o700)
            if user:
                os.chown(pgdata, user.pw_uid, user.pw_gid)
            how = ["--type=default"] if kind == "restore" else ["--type=time", f"--target={target}",
                                                                "--target-action=promote"]
            peer.run("restore", f"--pg1-path={pgdata}", *how, env=env)
        with open(pgdata / "postgresql.auto.conf", "a") as conf:
            # the source ran with max_connections 200 (on its command line): a standby needs as many
            conf.write(f"archive_mode = off\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{pgdata}'\nmax_connections = 200\n")
        started = subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "server.log"), "start"],
                                 capture_output=True, text=True, **_as_server(user))
        if started.returncode != 0:
            log = pgdata / "server.log"
            raise RuntimeError(f"the server {who} restored did not start: {started.stderr[-1000:]}"
                               f"{log.read_text()[-2000:] if log.exists() else ''}")
        _wait_out_of_recovery(port, password)
    seconds = time.perf_counter() - t0
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres") as c:
            got = (c.execute("SELECT count(*) FROM pgbench_accounts").fetchone()[0],
                   c.execute("SELECT count(*) FROM after_backup").fetchone()[0])
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"], capture_output=True,
                       **_as_server(user))
        shutil.rmtree(pgdata, ignore_errors=True)
    return seconds, got == expected, phases


def bench_peer(work: Path, *, scale: int = 20, pairs: int = 2, postgres: int = 15) -> dict:
    if postgres == 15 and shutil.which("pgbackrest") is None:
        return {"skipped": "pgbackrest is not installed (Debian: apt-get install pgbackrest)"}
    if postgres == 15 and not (PG15 / "postgres").exists():
        return {"skipped": f"Debian's PostgreSQL 15 is not installed ({PG15})"}
    bin_dir = PG15 if postgres == 15 else Path(embedded_bin_dir())
    user = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    shared = work / "shared"
    repo = shared / "backups"
    repo.mkdir(parents=True)
    cluster = LocalCluster(bin_dir, work / "pg", free_port(), "peer-" + os.urandom(6).hex())
    catalog = shared / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"repository": {"root": str(repo)}, "sources": {"bench": {
        "engine": "postgres", "groups": {"full": {}}, "pg_bin_dir": str(bin_dir),
        "pitr": {**({"run_as": SERVER_USER} if user else {})},
        "connection": {"host": cluster.host, "port": cluster.port, "dbname": "postgres",
                       "password_env": "BENCH_PEER_PASSWORD"}}}}))
    cluster.init()
    if user:
        _open_path_for(repo)
        shared.chmod(0o755)
        catalog.chmod(0o644)
        os.chown(repo, user.pw_uid, user.pw_gid)
        _open_path_for(Path(sys.executable).resolve())
    peer = Peer(work, cluster, user) if postgres == 15 else Raw(work, cluster, repo / "wal" / "bench", user)
    push = f"{sys.executable} -m backup_assets --catalog {catalog} wal-push --source bench %p"
    both = f" && {peer.command()} archive-push %p" if postgres == 15 else ""
    with open(cluster.data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"archive_mode = on\nwal_level = replica\narchive_timeout = 60\n"
                   f"archive_command = '{push}{both}'\n")
    cluster.start()
    env = dict(os.environ, PGPASSWORD=cluster.password, BENCH_PEER_PASSWORD=cluster.password,
               PGHOST=cluster.host, PGPORT=str(cluster.port), PGUSER=cluster.superuser)
    cli = [sys.executable, "-m", "backup_assets.cli", "--catalog", str(catalog)]
    result: dict = {"postgres": postgres, "scale": scale, "pairs": [],
                    "pgbackrest": peer.run("version", env=env).stdout.strip() if postgres == 15 else
                    "the raw tools (pg_basebackup | zstd; tar, zstd -d)"}
    try:
        if postgres == 15:
            peer.run("stanza-create", env=env)
        subprocess.run([str(bin_dir / "pgbench"), "-i", "-s", str(scale), "-q", "postgres"], check=True, env=env,
                       capture_output=True)
        with cluster.connect() as conn:
            result["database_bytes"] = conn.execute("SELECT pg_database_size('postgres')").fetchone()[0]
            conn.execute("CHECKPOINT")
            conn.execute("SELECT pg_switch_wal()")
        for i in range(pairs):
            pair: dict = {}
            order = ["ours", "peer"] if i % 2 == 0 else ["peer", "ours"]
            for who in order:  # full backups
                t0 = time.perf_counter()
                if who == "ours":
                    subprocess.run([*cli, "basebackup", "--source", "bench", "--kind", "full", "--local-only"],
                                   check=True, env=env, capture_output=True)
                elif postgres == 15:
                    peer.run("backup", "--type=full", env=env)
                else:
                    peer.backup(env)
                pair[f"backup_{who}_s"] = time.perf_counter() - t0
            with cluster.connect() as conn:  # a little WAL after both backups, archived by both, with a target
                conn.execute("CREATE TABLE IF NOT EXISTS after_backup (i int)")  # time between two commits
                conn.execute("INSERT INTO after_backup SELECT generate_series(1, 1000)")
                at_target = conn.execute("SELECT count(*) FROM after_backup").fetchone()[0]
                time.sleep(1.2)  # pgBackRest compares the target with its backups' stop times in whole seconds
                now = conn.execute("SELECT clock_timestamp() AT TIME ZONE 'UTC'").fetchone()[0]
                target = now.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "+00"  # as both tools read a time
                time.sleep(0.3)
                conn.execute("INSERT INTO after_backup SELECT generate_series(1, 1000)")
                at_end = conn.execute("SELECT count(*) FROM after_backup").fetchone()[0]
                last = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
                conn.execute("SELECT pg_switch_wal()")
                deadline = time.monotonic() + 120
                while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < last:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{last} not archived in 120 s")
                    time.sleep(0.1)
                accounts = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()[0]
            # restores to the end of the archive and to the time, until the server is up and out of recovery
            for kind, expected in (("restore", at_end), ("restore_to_time", at_target)):
                for who in order:
                    pair[f"{kind}_{who}_s"], pair[f"{kind}_{who}_exact"], phases = _restore(
                        who, kind, work / f"{kind}-{who}-{i}", cli=cli, env=env, peer=peer, user=user,
                        password=cluster.password, target=target, expected=(accounts, expected), bin_dir=bin_dir)
                    if phases:
                        pair[f"{kind}_ours_phases"] = phases
                pair[f"{kind}_ratio"] = pair[f"{kind}_ours_s"] / pair[f"{kind}_peer_s"]
            pair["backup_ratio"] = pair["backup_ours_s"] / pair["backup_peer_s"]
            result["pairs"].append(pair)
        bases = sorted((repo / "base" / "bench").glob("base-*.json"))
        result["full_backup_bytes_ours"] = json.loads(bases[-1].read_text())["size_bytes"]
        if postgres == 15:
            labels = sorted(p for p in (peer.root / "repo" / "backup" / STANZA).iterdir()
                            if p.is_dir() and p.name.endswith("F"))
            result["full_backup_bytes_peer"] = _size(labels[-1])
        else:
            result["full_backup_bytes_peer"] = peer.backups[-1].stat().st_size
        result["size_ratio"] = result["full_backup_bytes_ours"] / result["full_backup_bytes_peer"]
        result["wal_archive_bytes_ours"] = _size(repo / "wal" / "bench")
        # the raw restores read our own archive: only pgBackRest has one of its own
        result["wal_archive_bytes_peer"] = _size(peer.root / "repo" / "archive") if postgres == 15 else None
    finally:
        cluster.destroy()
    for name in ("backup", "restore", "restore_to_time"):
        result[f"{name}_ratio_median"] = statistics.median(p[f"{name}_ratio"] for p in result["pairs"])
        result[f"{name}_ours_median_s"] = statistics.median(p[f"{name}_ours_s"] for p in result["pairs"])
        result[f"{name}_peer_median_s"] = statistics.median(p[f"{name}_peer_s"] for p in result["pairs"])
    return result


def _ratios(r: dict, name: str) -> str:
    return ", ".join(f"{p[name + '_ratio']:.2f}" for p in r["pairs"])


def report(r: dict) -> None:
    if "skipped" in r:
        print(f"  pgBackRest side by side: skipped: {r['skipped']}")
        return
    # the goals are against pgBackRest; the raw tools are a floor to read the figures by, not a product
    goals = ({"backup": "goal <= 1.0", "restore": "goal <= 1.1"} if r["postgres"] == 15 else
             {"backup": "the raw tools: a floor, no goal", "restore": "the raw tools: a floor, no goal"})
    print(f"  against {r['pgbackrest']} on PostgreSQL {r['postgres']} (pgbench scale {r['scale']}, "
          f"{r['database_bytes'] / 1e6:.0f} MB), {len(r['pairs'])} alternating pairs:")
    print(f"    full backup: {r['backup_ours_median_s']:.2f}s vs {r['backup_peer_median_s']:.2f}s -> ratio "
          f"{r['backup_ratio_median']:.2f} (pairs {_ratios(r, 'backup')}; "
          f"{goals['backup']})")
    print(f"    restore to the end of the archive, server up: {r['restore_ours_median_s']:.2f}s vs "
          f"{r['restore_peer_median_s']:.2f}s -> ratio {r['restore_ratio_median']:.2f} "
          f"(pairs {_ratios(r, 'restore')}; {goals['restore']})")
    print(f"    restore to a time between two commits, server up: {r['restore_to_time_ours_median_s']:.2f}s vs "
          f"{r['restore_to_time_peer_median_s']:.2f}s -> ratio {r['restore_to_time_ratio_median']:.2f} "
          f"(pairs {_ratios(r, 'restore_to_time')}; {goals['restore']})")
    for p in r["pairs"]:
        print(f"    where our restore's time goes: {p.get('restore_ours_phases') or '?'}")
    exact = all(p[f"{k}_{who}_exact"] for p in r["pairs"] for k in ("restore", "restore_to_time")
                for who in ("ours", "peer"))
    wal = (f"; WAL archive {r['wal_archive_bytes_ours'] / 1e6:.1f} MB vs {r['wal_archive_bytes_peer'] / 1e6:.1f} MB"
           if r.get("wal_archive_bytes_peer") else "")
    print(f"    both restored exactly: {'yes' if exact else 'NO'}; one full backup {r['full_backup_bytes_ours'] / 1e6:.1f}"
          f" MB vs {r['full_backup_bytes_peer'] / 1e6:.1f} MB (ratio {r['size_ratio']:.2f}){wal}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (20: about 300 MB)")
    parser.add_argument("--pairs", type=int, default=2, help="alternating pairs of each measurement")
    parser.add_argument("--postgres", type=int, choices=(15, 18), default=15,
                        help="15: against pgBackRest; 18: against the raw tools (pgBackRest 2.45 has no 18)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="backup_assets_peer_"))
    try:
        r = bench_peer(work, scale=args.scale, pairs=args.pairs, postgres=args.postgres)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
