"""The WAL archive: a real PostgreSQL 18 archives through `backup-assets wal-push`;
segments come back byte for byte through `wal-fetch`; pushes are idempotent, refuse different content,
survive kill -9 at the narrow points, and the continuity check finds a missing segment."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest
import yaml

from backup_assets.catalog import load_catalog
from backup_assets.cli import main
from backup_assets.core import failpoints
from backup_assets.core.pitr import wal
from backup_assets.demo.cluster import LocalCluster, free_port

from .conftest import WAL_SERVER_USER as SERVER_USER


def cli(catalog_path, *args) -> int:
    return main(["--catalog", str(catalog_path), *args])


def archived(cluster, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with cluster.connect() as conn:
        while time.monotonic() < deadline:
            done, failed, last = conn.execute(
                "SELECT archived_count, failed_count, last_failed_wal FROM pg_stat_archiver").fetchone()
            assert failed == 0, f"archive_command failed for {last}: {(cluster.data_dir / 'server.log').read_text()[-2000:]}"
            if done >= count:
                return
            time.sleep(0.2)
    raise AssertionError(f"only {done} of {count} WAL files archived in {timeout:g}s: "
                         f"{(cluster.data_dir / 'server.log').read_text()[-3000:]}")


def switch(cluster, times: int) -> list[str]:
    names = []
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id serial PRIMARY KEY, v text)")
        for i in range(times):
            conn.execute("INSERT INTO t (v) SELECT md5(n::text) FROM generate_series(1, 2000) n")
            names.append(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])
            conn.execute("SELECT pg_switch_wal()")
    return names


def test_the_server_archives_through_wal_push_and_segments_come_back_byte_for_byte(archiving, tmp_path, capsys):
    cluster, catalog_path, folder = archiving
    names = switch(cluster, 4)
    archived(cluster, 4)
    assert cli(catalog_path, "wal-verify", "--source", "app") == 0
    out = capsys.readouterr().out
    assert "no gaps" in out and names[0] in out or "no gaps" in out
    for name in names:
        meta = yaml.safe_load((folder / f"{name}.json").read_text())
        dest = tmp_path / "restored" / name
        dest.parent.mkdir(exist_ok=True)
        assert cli(catalog_path, "wal-fetch", "--source", "app", name, str(dest)) == 0
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == meta["raw_sha256"]
        original = cluster.data_dir / "pg_wal" / name
        if original.exists():  # not yet recycled: the very bytes PostgreSQL wrote
            assert dest.read_bytes() == original.read_bytes()
    # a name that is not archived: non-zero and one line (PostgreSQL asks for such names during recovery)
    capsys.readouterr()
    assert cli(catalog_path, "wal-fetch", "--source", "app", "00000009.history", str(tmp_path / "h")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "00000009.history is not in the WAL archive of app" in err[0]
    assert not (tmp_path / "h").exists()


def test_pushes_are_idempotent_and_refuse_different_content(tmp_path, capsys):
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({"repository": {"root": str(tmp_path / "repo")}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    seg = tmp_path / "pg_wal" / "000000010000000000000003"
    seg.parent.mkdir()
    seg.write_bytes(os.urandom(1 << 20))
    assert cli(catalog_path, "wal-push", "--source", "app", str(seg)) == 0
    assert cli(catalog_path, "wal-push", "--source", "app", str(seg)) == 0  # PostgreSQL retrying after a crash
    assert "already archived" in capsys.readouterr().out
    stored = tmp_path / "repo" / "wal" / "app" / "000000010000000000000003.zst"
    before = stored.read_bytes()
    seg.write_bytes(os.urandom(1 << 20))
    assert cli(catalog_path, "wal-push", "--source", "app", str(seg)) == 1
    assert "archived already with different content" in capsys.readouterr().err
    assert stored.read_bytes() == before
    for bad in ("postgresql.conf", "../../etc/passwd", "00000001000000000000000G"):
        (tmp_path / "pg_wal" / Path(bad).name).write_bytes(b"x")
        assert cli(catalog_path, "wal-push", "--source", "app", str(tmp_path / "pg_wal" / Path(bad).name)) == 1
        assert "is not a WAL file name" in capsys.readouterr().err
    assert cli(catalog_path, "wal-push", "--source", "nope", str(seg)) == 2  # a name the catalog lacks: usage
    assert "unknown source 'nope': the catalog has app" in capsys.readouterr().err


@pytest.mark.parametrize("point", ["artifact.before_rename", "artifact.renamed", "wal.before_meta"])
def test_a_push_killed_at_any_narrow_point_never_counts_and_the_next_push_succeeds(point, tmp_path):
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({"repository": {"root": str(tmp_path / "repo")}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    seg = tmp_path / "000000010000000000000007"
    seg.write_bytes(os.urandom(1 << 20))
    argv = [sys.executable, "-m", "backup_assets.cli", "--catalog", str(catalog_path), "wal-push", "--source", "app",
            str(seg)]
    killed = subprocess.run(argv, env={**os.environ, failpoints.ENV: point}, capture_output=True)
    assert killed.returncode == -9
    catalog = load_catalog(catalog_path)
    assert wal.verify(catalog, "app").segments == 0  # nothing counts without its JSON
    with pytest.raises(Exception, match="not in the WAL archive"):
        wal.fetch(catalog, "app", seg.name, str(tmp_path / "out"))
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert wal.fetch(catalog, "app", seg.name, str(tmp_path / "out")) == 1 << 20
    assert (tmp_path / "out").read_bytes() == seg.read_bytes()
    leftovers = [p.name for p in (tmp_path / "repo" / "wal" / "app").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or point == "artifact.before_rename"  # a killed writer's partial: swept by doctor


def test_the_continuity_check_finds_a_missing_segment(archiving, capsys):
    cluster, catalog_path, folder = archiving
    names = switch(cluster, 5)
    archived(cluster, 5)
    missing = names[2]
    (folder / f"{missing}.json").unlink()
    assert cli(catalog_path, "wal-verify", "--source", "app") == 1
    out = capsys.readouterr()
    assert f"gap after {names[1]}" in out.out + out.err and names[3] in out.out + out.err
    # and the metrics say so, with the recovery point
    assert cli(catalog_path, "metrics") == 0
    text = capsys.readouterr().out
    assert 'backup_assets_wal_gaps{source="app"} 1.0' in text
    counted = wal.verify(load_catalog(catalog_path), "app").segments
    assert f'backup_assets_wal_segments{{source="app"}} {float(counted)}' in text
    age = [line for line in text.splitlines() if line.startswith('backup_assets_wal_since_last_archived_seconds{source="app"}')]
    assert age and 0 <= float(age[0].split()[-1]) < 300


def test_encrypted_wal_is_stored_encrypted_and_fetched_with_the_identity(tmp_path, monkeypatch):
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "age.key"
    key_file.write_text(str(identity) + "\n")
    monkeypatch.setenv("WAL_AGE_IDENTITY", str(key_file))
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({
        "repository": {"root": str(tmp_path / "repo")},
        "encryption": {"recipients": [str(identity.to_public())], "identity_file_env": "WAL_AGE_IDENTITY"},
        "sources": {"app": {"engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    seg = tmp_path / "000000010000000000000001"
    seg.write_bytes(b"WAL " * 50_000)
    assert cli(catalog_path, "wal-push", "--source", "app", str(seg)) == 0
    stored = tmp_path / "repo" / "wal" / "app" / f"{seg.name}.zst.age"
    assert stored.read_bytes().startswith(b"age-encryption.org/v1") and b"WAL WAL" not in stored.read_bytes()
    assert cli(catalog_path, "wal-fetch", "--source", "app", seg.name, str(tmp_path / "back")) == 0
    assert (tmp_path / "back").read_bytes() == seg.read_bytes()


def wait_archived_through(cluster, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with cluster.connect() as conn:
        while time.monotonic() < deadline:
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
            if last and last[:24] >= name:
                return
            time.sleep(0.2)
    raise AssertionError(f"{name} not archived in {timeout:g}s")


@pytest.mark.parametrize("archiving", [18, 15], indirect=True, ids=["pg18", "pg15"])
def test_restore_to_a_time_holds_exactly_the_rows_committed_by_then(archiving, tmp_path, capsys):
    import datetime as dt

    import psycopg

    cluster, catalog_path, _ = archiving
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE stamped (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO stamped (note) SELECT 'before the base backup' FROM generate_series(1, 20)")
    assert cli(catalog_path, "basebackup", "--source", "app") == 0
    base_done = dt.datetime.now(dt.timezone.utc)
    # a writer: one row per transaction (each commit has its own time)
    with cluster.connect() as conn:
        for i in range(60):
            conn.execute("INSERT INTO stamped (note) VALUES (%s)", (f"row {i}",))
            time.sleep(0.03)
        commits = conn.execute("SELECT id, pg_xact_commit_timestamp(xmin) FROM stamped ORDER BY id").fetchall()
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    wait_archived_through(cluster, name)
    after = [ts for _, ts in commits[20:]]
    # at a commit, between two, the one before the last (a time target is reached at the first later commit)
    targets = [after[10], after[30] + (after[31] - after[30]) / 2, after[-2], None]  # None: --latest
    user = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
    for k, target in enumerate(targets):
        pgdata, port = tmp_path / f"recovered{k}", free_port()
        how = ["--to-time", target.isoformat()] if target else ["--latest"]
        code = cli(catalog_path, "restore", "--source", "app", *how, "--pgdata", str(pgdata), "--port", str(port),
                   "--confirm", *user)
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        assert "recovered" in out.out and ("recovery stopping" in out.out or target is None), out.out
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=cluster.password,
                                 dbname="postgres", autocommit=True) as conn:
                ids = {r[0] for r in conn.execute("SELECT id FROM stamped")}
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False  # promoted
        finally:
            LocalCluster(cluster.bin_dir, pgdata, port, cluster.password).stop()
        expected = {i for i, ts in commits if target is None or ts <= target}
        assert ids == expected, (target, sorted(ids ^ expected))
    # before the oldest base backup ended: refused, nothing built
    early = base_done - dt.timedelta(hours=1)
    assert cli(catalog_path, "restore", "--source", "app", "--to-time", early.isoformat(), "--pgdata",
               str(tmp_path / "too_early"), "--confirm", *user) == 1
    assert "is before the oldest base backup of app ended" in capsys.readouterr().err
    assert not (tmp_path / "too_early").exists()


def test_wal_push_killed_at_random_moments_never_leaves_a_counted_corrupt_segment(tmp_path):
    import random

    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({"repository": {"root": str(tmp_path / "repo")}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    catalog = load_catalog(catalog_path)
    rng = random.Random(20261202)
    for i in range(6):
        seg = tmp_path / f"0000000100000000000000{i:02X}"
        seg.write_bytes(os.urandom(16 << 20))  # a full segment: pushing it takes a while
        argv = [sys.executable, "-m", "backup_assets.cli", "--catalog", str(catalog_path), "wal-push", "--source",
                "app", str(seg)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9))
        proc.kill()
        proc.wait()
        out = tmp_path / "fetched"
        try:
            wal.fetch(catalog, "app", seg.name, str(out))
        except Exception as exc:  # not archived: fine, as long as nothing half-written counts
            assert "not in the WAL archive" in str(exc), exc
        else:  # the push finished before the kill: then the bytes are exact
            assert out.read_bytes() == seg.read_bytes()
        # PostgreSQL retries: the next push succeeds and the segment comes back exact
        assert subprocess.run(argv, capture_output=True).returncode == 0
        wal.fetch(catalog, "app", seg.name, str(out))
        assert out.read_bytes() == seg.read_bytes()
    assert wal.verify(catalog, "app").ok


def test_the_freshness_sensor_alerts_on_a_stale_wal_archive_and_on_a_gap(tmp_path, smtp_sink, http_sink):
    import dagster as dg

    from backup_assets.defs.build import build_definitions

    from .conftest import alert_config

    def catalog_with(rpo: int):
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump({
            "repository": {"root": str(tmp_path / "repo")}, "alerts": alert_config(smtp_sink, http_sink, window_minutes=0),
            "sources": {"app": {"engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"},
                                "wal_rpo_seconds": rpo}}}))
        return load_catalog(path)

    catalog = catalog_with(3600)
    for i in (1, 2, 4):  # 3 is missing
        seg = tmp_path / f"00000001000000000000000{i}"
        seg.write_bytes(os.urandom(1 << 20))
        wal.push(catalog, "app", str(seg))
    with dg.instance_for_test() as instance:
        sensor = build_definitions(catalog).resolve_sensor_def("freshness_alerts")
        sensor(dg.build_sensor_context(instance=instance))
        subjects = [str(m["Subject"]) for m in smtp_sink.messages]
        assert subjects == ["[ERROR] app: WAL archive has a gap"], subjects
        assert "first after 000000010000000000000002 (next: 000000010000000000000004)" in smtp_sink.messages[-1].get_payload(decode=True).decode()
        time.sleep(1.1)
        sensor = build_definitions(catalog_with(1)).resolve_sensor_def("freshness_alerts")
        sensor(dg.build_sensor_context(instance=instance))
        assert "[ERROR] app: WAL archive is stale" in [str(m["Subject"]) for m in smtp_sink.messages]


def test_wal_rpo_is_for_postgres_sources(tmp_path):
    from backup_assets.catalog import CatalogError, parse_catalog

    with pytest.raises(CatalogError, match=r"sources\.lite: 'wal_rpo_seconds' belongs to postgres sources"):
        parse_catalog({"repository": {"root": str(tmp_path)}, "sources": {
            "lite": {"engine": "sqlite", "path": "a.db", "wal_rpo_seconds": 60}}})


@pytest.mark.encrypted
def test_an_encrypted_base_backup_and_wal_restore_to_the_latest(archiving, tmp_path, capsys):
    """The base backup is taken on a host that only encrypts (no private key in its environment: its backup_label
    and manifest are read from the stream as it is written); the restore, with the key, reaches the latest."""
    import psycopg

    cluster, catalog_path, folder = archiving
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE secret_rows (id serial PRIMARY KEY, note text)")
    key = os.environ.pop("WAL_AGE_IDENTITY")
    try:
        assert cli(catalog_path, "basebackup", "--source", "app") == 0, capsys.readouterr().err[-2000:]
    finally:
        os.environ["WAL_AGE_IDENTITY"] = key
    meta = json.loads(next((catalog_path.parent / "backups" / "base" / "app").glob("base-*.json")).read_text())
    assert meta["start_wal"] and meta["end_lsn"] and meta["manifest"]["raw_size_bytes"] > 0
    base = next((catalog_path.parent / "backups" / "base" / "app").glob("base-*.tar.zst.age"))
    assert base.read_bytes()[:21] == b"age-encryption.org/v1"
    with cluster.connect() as conn:
        conn.execute("INSERT INTO secret_rows (note) SELECT 'after the base ' || n FROM generate_series(1, 500) n")
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    wait_archived_through(cluster, name)
    assert all(p.name.endswith(".zst.age") for p in folder.iterdir() if p.name.endswith((".zst", ".age")))
    pgdata, port = tmp_path / "recovered", free_port()
    user = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
    assert cli(catalog_path, "restore", "--source", "app", "--latest", "--pgdata", str(pgdata), "--port", str(port),
               "--confirm", *user) == 0, capsys.readouterr().err[-3000:]
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=cluster.password,
                             dbname="postgres", autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM secret_rows").fetchone()[0] == 500
    finally:
        LocalCluster(cluster.bin_dir, pgdata, port, cluster.password).stop()


def test_the_fast_wal_path_follows_every_change_of_the_catalog_and_its_environment(tmp_path):
    """`backup-assets wal-push` (what PostgreSQL runs per segment) caches the catalog's WAL facts: a changed file
    or a changed variable it references is a different catalog; a broken one is one line and a non-zero exit."""
    import tempfile

    catalog_path = tmp_path / "catalog.yaml"
    seg = tmp_path / "000000010000000000000007"
    seg.write_bytes(os.urandom(1 << 16))

    def run(root_env: str, *args) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "BACKUP_ASSETS_CATALOG"}
        env["WAL_TEST_ROOT"] = root_env
        return subprocess.run([sys.executable, "-m", "backup_assets", "--catalog", str(catalog_path), *args],
                              capture_output=True, text=True, env=env)

    catalog_path.write_text(yaml.safe_dump({"repository": {"root": "${WAL_TEST_ROOT}/one"}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    for _ in range(2):  # the second run reads the cache
        done = run(str(tmp_path / "a"), "wal-push", "--source", "app", str(seg))
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "one" / "wal" / "app" / f"{seg.name}.json").exists()
    cache = Path(tempfile.gettempdir()) / f"backup-assets-{os.getuid()}"
    assert cache.stat().st_mode & 0o077 == 0 and list(cache.glob("wal-*.json"))
    # another value of the variable: another repository
    assert run(str(tmp_path / "b"), "wal-push", "--source", "app", str(seg)).returncode == 0
    assert (tmp_path / "b" / "one" / "wal" / "app" / f"{seg.name}.json").exists()
    # an edited catalog: followed at once
    catalog_path.write_text(catalog_path.read_text().replace("/one", "/two"))
    assert run(str(tmp_path / "a"), "wal-push", "--source", "app", str(seg)).returncode == 0
    assert (tmp_path / "a" / "two" / "wal" / "app" / f"{seg.name}.json").exists()
    # the segment comes back through the fast wal-fetch
    back = run(str(tmp_path / "a"), "wal-fetch", "--source", "app", seg.name, str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back").read_bytes() == seg.read_bytes()
    # a broken catalog: one line naming the file, non-zero (PostgreSQL keeps the segment and retries)
    catalog_path.write_text("sources: [not, a, mapping")
    broken = run(str(tmp_path / "a"), "wal-push", "--source", "app", str(seg))
    assert broken.returncode == 1 and len(broken.stderr.strip().splitlines()) == 1
    assert str(catalog_path) in broken.stderr and "not valid YAML" in broken.stderr
    # an unknown source: said
    catalog_path.write_text(yaml.safe_dump({"repository": {"root": str(tmp_path / "c")}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}}}))
    other = run("", "wal-push", "--source", "nope", str(seg))
    assert other.returncode == 1 and "'nope' is not a postgres source" in other.stderr


def test_wal_fetch_says_when_the_replica_cannot_be_reached_rather_than_calling_the_segment_missing(tmp_path, capsys,
                                                                                                     monkeypatch):
    """A segment missing locally is looked for on the S3 replica; an unreachable replica is an error of its own
    (PostgreSQL retries), never reported as the end of the archive."""
    monkeypatch.setenv("WAL_S3_KEY", "k")
    monkeypatch.setenv("WAL_S3_SECRET", "s")
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({"repository": {"root": str(tmp_path / "repo")}, "sources": {"app": {
        "engine": "postgres", "groups": {"full": {}}, "connection": {"dbname": "x"}}},
        "replication": {"s3": {"bucket": "b", "endpoint_url": f"http://127.0.0.1:{free_port()}", "region": "us-east-1",
                               "access_key_id_env": "WAL_S3_KEY", "secret_access_key_env": "WAL_S3_SECRET"}}}))
    assert cli(catalog_path, "wal-fetch", "--source", "app", "000000010000000000000009", str(tmp_path / "x")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in the WAL archive" not in err and "127.0.0.1" in err, err
    assert not (tmp_path / "x").exists()
    assert not list(Path(tempfile.gettempdir()).glob("backup-assets-wal-*"))
