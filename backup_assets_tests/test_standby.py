"""Backups from a hot standby, so the primary is not loaded: a streaming standby of a throwaway primary
(`pg_basebackup -R`), pgbench writing on the primary the whole time.

- logical: `pg_dump` from the standby is one consistent snapshot (pgbench's balances add up in the restore),
  its checks and drill pass, and restores and row pruning go to the primary;
- a dump the standby cancels to go on replaying (hot_standby_feedback off, max_standby_streaming_delay 0)
  fails in one line that names the settings to change;
- physical: a base backup from the standby, its WAL from the primary's archive, restores to the end of the
  archive with the balances adding up; without `primary` in the catalog it is refused."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from backup_assets.catalog import load_catalog
from backup_assets.core import BackupError
from backup_assets.core.backup.take import endpoint_for, repository_for, run_backup
from backup_assets.core.engines import postgres
from backup_assets.core.pitr import base as pitr_base
from backup_assets.core.verify.checks import evaluate
from backup_assets.demo.cluster import LocalCluster, _ensure_server_user, free_port

from .conftest import pg_restore_into
from .test_pitr import archive_now
from .test_wal import SERVER_USER, cli

BALANCES = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
            "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
            "(SELECT count(*) FROM pgbench_history)")


def _standby(primary: LocalCluster, tmp_path: Path, **settings) -> LocalCluster:
    """A streaming hot standby of `primary` (pg_basebackup -R), with `settings` in its configuration."""
    data = tmp_path / "standby"
    data.mkdir(mode=0o700)
    user = _ensure_server_user()
    if user:
        os.chown(data, user.pw_uid, user.pw_gid)
    conninfo = f"host={primary.host} port={primary.port} user={primary.superuser} password={primary.password}"
    primary._run_as_server([str(primary.bin_dir / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream",
                            "--checkpoint=fast", "-d", conninfo])
    with open(data / "postgresql.auto.conf", "a") as conf:
        conf.write("hot_standby = on\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    standby = LocalCluster(primary.bin_dir, data, free_port(), primary.password)
    standby.start()
    return standby


def _pgbench_and_standby(primary: LocalCluster, tmp_path: Path) -> LocalCluster:
    """pgbench's tables on the primary (scale 2), then a standby of it with hot_standby_feedback on."""
    env = dict(os.environ, PGPASSWORD=primary.password)
    subprocess.run([str(primary.bin_dir / "pgbench"), "-i", "-s", "2", "-q", "-h", primary.host, "-p",
                    str(primary.port), "-U", primary.superuser, "postgres"], check=True, env=env, capture_output=True)
    return _standby(primary, tmp_path, hot_standby_feedback="on")


def _caught_up(primary: LocalCluster, standby: LocalCluster, timeout: float = 60) -> None:
    with primary.connect() as conn:
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    with standby.connect() as conn:
        while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
            assert time.monotonic() < deadline, f"the standby did not replay up to {lsn} in {timeout:g}s"
            time.sleep(0.1)


class Load:
    """pgbench on the primary until stopped (each transaction moves the same amount in all four tables)."""

    def __init__(self, primary: LocalCluster):
        env = dict(os.environ, PGPASSWORD=primary.password)
        self.primary = primary
        self.proc = subprocess.Popen([str(primary.bin_dir / "pgbench"), "-h", primary.host, "-p", str(primary.port),
                                      "-U", primary.superuser, "-c", "2", "-T", "600", "-n", "postgres"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        """pgbench stopped, and its sessions gone: a COMMIT it sent just before it ended still lands after it
        exits, so what the primary holds is read once no pgbench session is left."""
        self.proc.terminate()
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        with self.primary.connect() as conn:
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'"
                               ).fetchone()[0]:
                assert time.monotonic() < deadline, "pgbench's sessions did not end"
                time.sleep(0.05)


def _point_at_standby(catalog_path: Path, standby: LocalCluster, primary: LocalCluster | None) -> None:
    """The source's backups read from `standby`; `primary` named in the catalog or not."""
    data = yaml.safe_load(catalog_path.read_text())
    src = data["sources"]["app"]
    src.pop("primary", None)
    if primary is not None:
        src["primary"] = {**src["connection"], "port": primary.port}
    src["connection"] = {**src["connection"], "port": standby.port}
    catalog_path.write_text(yaml.safe_dump(data))


def _consistent(conn) -> tuple:
    accounts, tellers, branches, history, transactions = conn.execute(BALANCES).fetchone()
    assert accounts == tellers == branches == history, (accounts, tellers, branches, history)
    return accounts, transactions


def test_a_dump_from_the_standby_under_load_is_one_consistent_snapshot(archiving, tmp_path):
    primary, catalog_path, _ = archiving
    standby = _pgbench_and_standby(primary, tmp_path)
    try:
        _point_at_standby(catalog_path, standby, primary)
        catalog = load_catalog(catalog_path)
        assert endpoint_for(catalog, "app").port == standby.port
        load = Load(primary)
        try:
            time.sleep(2)  # transactions on both sides of the snapshot
            run_backup(catalog, "app", "full", "daily", "2026-11-20")
            backup = repository_for(catalog).latest("app", "full", "daily", "2026-11-20")
            time.sleep(1)
        finally:
            load.stop()
        assert load.proc.returncode in (0, -15), load.proc.stderr.read().decode()[-2000:]
        with standby.connect() as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        # the checks, the drill among them (on the primary: a standby holds no scratch database)
        outcomes = evaluate(catalog, backup, ("artifact_intact", "archive_readable", "restore_drill"))
        assert all(o.passed for o in outcomes.values()), {k: o.message for k, o in outcomes.items()}
        assert outcomes["restore_drill"].metadata["drill_server"] == f"{primary.host}:{primary.port}"
        # the restored copy is one snapshot taken while pgbench ran: every balance adds up, and it holds some but
        # not all of the transactions
        pg_restore_into(primary, backup.artifact_path, "from_standby")
        with primary.connect("from_standby") as conn:
            _, in_backup = _consistent(conn)
        with primary.connect() as conn:
            _, in_the_end = _consistent(conn)
        assert 0 < in_backup < in_the_end, (in_backup, in_the_end)
        assert backup.manifest.row_counts["public.pgbench_history"] == in_backup
        # restores go to the primary, never to the read-only standby
        code = cli(catalog_path, "restore", "--source", "app", "--group", "full", "--tier", "daily", "--partition",
                   "2026-11-20", "--target-db", "restored_from_standby", "--confirm")
        assert code == 0
        with primary.connect("restored_from_standby") as conn:
            assert _consistent(conn)[1] == in_backup
    finally:
        standby.destroy()


def test_a_dump_the_standby_cancels_names_the_settings_to_change(archiving, tmp_path):
    primary, catalog_path, _ = archiving
    with primary.connect() as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, filler text)")
        conn.execute("INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g")
        conn.execute("ALTER TABLE big SET (autovacuum_enabled = off)")
    standby = _standby(primary, tmp_path, hot_standby_feedback="off", max_standby_streaming_delay="0")
    try:
        _caught_up(primary, standby)
        _point_at_standby(catalog_path, standby, primary)
        catalog = load_catalog(catalog_path)

        def write(stream) -> None:
            # pg_dump is running on the standby: the primary removes the row versions the dump's snapshot still
            # sees. The dump is read slowly meanwhile (a backend blocked writing to its client cannot take the
            # standby's cancel, and replay would wait for it) until the standby has replayed that, then drained.
            stream.read(1024)
            with primary.connect() as conn:
                conn.execute("UPDATE big SET filler = 'y'")
                conn.execute("VACUUM big")
                lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            deadline = time.monotonic() + 60
            with standby.connect() as watch:
                while not watch.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                    assert time.monotonic() < deadline, f"the standby did not replay up to {lsn} in 60s"
                    if not stream.read(16 * 1024):
                        break
                    time.sleep(0.01)
            while stream.read(1 << 20):
                pass

        with pytest.raises(BackupError) as caught:
            postgres.dump(endpoint_for(catalog, "app"), None, write, what="app/full: ")
        message = str(caught.value)
        assert "\n" not in message and "cancelled the dump to replay WAL (conflict with recovery)" in message, message
        assert "hot_standby_feedback = on" in message and "max_standby_streaming_delay = -1" in message, message
        assert primary.password not in message
    finally:
        standby.destroy()


@pytest.mark.pitr(incremental=False)
def test_a_base_backup_from_the_standby_restores_to_the_end_of_the_primarys_archive(archiving, tmp_path, capsys):
    primary, catalog_path, _ = archiving
    standby = _pgbench_and_standby(primary, tmp_path)
    try:
        _point_at_standby(catalog_path, standby, None)
        with pytest.raises(BackupError, match="is a standby: a base backup from it needs the source's `primary`"):
            pitr_base.base_backup(load_catalog(catalog_path), "app", kind="full")
        _point_at_standby(catalog_path, standby, primary)
        catalog = load_catalog(catalog_path)
        load = Load(primary)
        said: list[str] = []
        try:
            meta = pitr_base.base_backup(catalog, "app", kind="full", say=said.append)
            time.sleep(1)
        finally:
            load.stop()
        assert any("waiting for the primary to archive" in line for line in said), said
        assert meta["start_wal"] and meta["end_lsn"]
        with primary.connect() as conn:
            expected = _consistent(conn)
        archive_now(primary)
        pgdata, port = tmp_path / "recovered", free_port()
        user = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
        code = cli(catalog_path, "restore", "--source", "app", "--latest", "--pgdata", str(pgdata), "--port",
                   str(port), "--confirm", *user)
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=primary.password,
                                 dbname="postgres", autocommit=True) as conn:
                assert _consistent(conn) == expected
        finally:
            LocalCluster(primary.bin_dir, pgdata, port, primary.password).stop()
    finally:
        standby.destroy()
