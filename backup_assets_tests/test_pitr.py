"""The physical tier: full and incremental base backups (PostgreSQL 18, summarize_wal) combined at
restore with pg_combinebackup, exact to the transaction at times inside each backup's window; pg_verifybackup
catches a changed file; the drill restores to a random time between two commits and proves where recovery
stopped; retention keeps the window (a base backup, the chain under it, the WAL from its start) and nothing
older; and the Dagster job runs it all with its checks."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import random
import tarfile
import time

import psycopg
import pytest

from backup_assets.catalog import load_catalog
from backup_assets.core.pitr import recovery as pitr
from backup_assets.core.pitr import base as pitr_base
from backup_assets.core.pitr import checks as pitr_checks
from backup_assets.core.pitr import wal
from backup_assets.core.artifact import ArtifactWriter, open_decompressed
from backup_assets.demo.cluster import LocalCluster, free_port

from .test_wal import SERVER_USER, cli, wait_archived_through


def write_rows(cluster, n: int, note: str, pause: float = 0.02) -> None:
    with cluster.connect() as conn:
        conn.execute('CREATE TABLE IF NOT EXISTS "Stamped rows" (id serial PRIMARY KEY, note text)')
        for i in range(n):
            conn.execute('INSERT INTO "Stamped rows" (note) VALUES (%s)', (f"{note} {i}",))
            time.sleep(pause)


def commits(cluster) -> list[tuple[int, dt.datetime]]:
    with cluster.connect() as conn:
        return conn.execute('SELECT id, pg_xact_commit_timestamp(xmin) FROM "Stamped rows" ORDER BY id').fetchall()


def archive_now(cluster) -> None:
    with cluster.connect() as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    wait_archived_through(cluster, name)


def restored_ids(cluster, catalog_path, tmp_path, how: list[str], capsys) -> set[int]:
    pgdata, port = tmp_path / f"recovered-{os.urandom(3).hex()}", free_port()
    user = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
    code = cli(catalog_path, "restore", "--source", "app", *how, "--pgdata", str(pgdata), "--port", str(port),
               "--confirm", *user)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=cluster.password,
                             dbname="postgres", autocommit=True) as conn:
            return {r[0] for r in conn.execute('SELECT id FROM "Stamped rows"')}
    finally:
        LocalCluster(cluster.bin_dir, pgdata, port, cluster.password).stop()


def forge_physical_copies(catalog, storage, put) -> None:
    """Whoever holds the replica's credentials replaces a WAL segment (same size, same metadata, other bytes) and a
    base backup's description there: `replica_intact` names both, `replicate` puts both right, and they are proven
    again. `put(key, data, metadata)` writes an object past our checks, with the replica's own SDK."""
    from backup_assets.core.pitr import s3 as pitr_s3

    segment = sorted(k for k, _ in storage.list("wal/app/") if not k.endswith(".json"))[-1]
    info = storage.head(segment)
    put(segment, bytes(info.size), info.metadata)
    described = sorted(k for k, _ in storage.list("base/app/") if k.endswith(".json"))[0]
    text = storage.get_bytes(described)
    put(described, text.replace(b'"full"', b'"FULL"'), {})
    check = pitr_s3.replica_intact(catalog, "app", storage)
    assert not check.passed and len(check.metadata["problems"]) == 2, check
    problems = " / ".join(check.metadata["problems"])
    assert segment.rsplit("/", 1)[-1] in problems and described.rsplit("/", 1)[-1] in problems, problems
    assert pitr_s3.replicate(catalog, "app", storage)["uploaded_files"] == 2
    check = pitr_s3.replica_intact(catalog, "app", storage)
    assert check.passed, check.message
    assert pitr_s3.replicate(catalog, "app", storage)["uploaded_files"] == 0


@pytest.mark.pitr
def test_incremental_base_backups_combine_and_restore_exactly_inside_each_window(archiving, tmp_path, capsys):
    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    write_rows(cluster, 5, "before any base backup", pause=0)
    metas = []
    for k in range(3):
        metas.append(pitr_base.base_backup(catalog, "app"))
        write_rows(cluster, 25, f"after base {k}")
    archive_now(cluster)
    assert [m["kind"] for m in metas] == ["full", "incremental", "incremental"]
    assert metas[1]["parent"] == metas[0]["artifact"] and metas[2]["parent"] == metas[1]["artifact"]
    assert metas[2]["full"] == metas[0]["artifact"]
    assert metas[1]["size_bytes"] < metas[0]["size_bytes"]  # only the changed blocks
    for meta in metas:
        check = pitr_checks.verify_base(catalog, "app", meta)
        assert check.passed, check.message
    stamped = commits(cluster)
    # a time inside each base backup's window, between two commits: the restore uses that backup (and the
    # chain under it) and holds exactly the rows committed by then
    for k, meta in enumerate(metas):
        window = [(i, ts) for i, ts in stamped if ts > dt.datetime.fromisoformat(meta["finished_at"])]
        (_, a), (_, b) = window[10], window[11]
        target = a + (b - a) / 2
        assert pitr_base.pick_base(pitr_base.base_backups(catalog, "app"), "app", target)["artifact"] == meta["artifact"]
        ids = restored_ids(cluster, catalog_path, tmp_path, ["--to-time", target.isoformat()], capsys)
        expected = {i for i, ts in stamped if ts <= target}
        assert ids == expected, (k, sorted(ids ^ expected))
    assert restored_ids(cluster, catalog_path, tmp_path, ["--latest"], capsys) == {i for i, _ in stamped}
    # the metrics: the newest base backup (its kind) and where the window starts
    assert cli(catalog_path, "metrics") == 0
    text = capsys.readouterr().out
    newest = dt.datetime.fromisoformat(metas[2]["finished_at"]).timestamp()
    start = dt.datetime.fromisoformat(metas[0]["finished_at"]).timestamp()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['backup_assets_base_backup_last_timestamp_seconds{kind="incremental",source="app"}'] == \
        pytest.approx(newest)
    assert values['backup_assets_pitr_window_start_timestamp_seconds{source="app"}'] == pytest.approx(start)
    assert values['backup_assets_base_backup_count{source="app"}'] == 3
    # an incremental whose parent is gone cannot be restored: said, nothing built
    folder = pitr_base.base_dir(catalog, "app")
    (folder / f"{metas[1]['artifact']}.json").rename(folder / "parked.json")
    with pytest.raises(pitr.BackupError, match="is incremental on .*which is gone"):
        pitr_base.chain_of(pitr_base.base_backups(catalog, "app"), metas[2])
    (folder / "parked.json").rename(folder / f"{metas[1]['artifact']}.json")


@pytest.mark.pitr
@pytest.mark.encrypted
def test_a_host_without_the_private_key_takes_full_base_backups_and_says_why_not_incremental(archiving, monkeypatch):
    """An encrypting host needs only the recipients for a full base backup; an incremental one needs the parent's
    manifest in plaintext, so without the key the base backup is a full one that says why, and the checks that
    read the plaintext say "not checked here"; with the key, incremental, and verified."""
    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    key = os.environ["WAL_AGE_IDENTITY"]
    monkeypatch.delenv("WAL_AGE_IDENTITY")
    said: list[str] = []
    first = pitr_base.base_backup(catalog, "app", say=said.append)
    write_rows(cluster, 5, "after the first", pause=0)
    second = pitr_base.base_backup(catalog, "app", say=said.append)
    assert (first["kind"], second["kind"], second["encrypted"]) == ("full", "full", True)
    assert any("the incremental base backup failed" in m and "WAL_AGE_IDENTITY" in m for m in said), said
    # what needs the plaintext is not checked here (a warning that names the variable), never failed
    for outcome in (pitr_checks.verify_base(catalog, "app", second), pitr_checks.pitr_drill(catalog, "app")):
        assert (outcome.passed, outcome.not_checked, outcome.warn) == (False, True, True), outcome.message
        assert "WAL_AGE_IDENTITY" in outcome.message, outcome.message
    monkeypatch.setenv("WAL_AGE_IDENTITY", key)
    assert pitr_checks.verify_base(catalog, "app", second).passed
    third = pitr_base.base_backup(catalog, "app")
    assert third["kind"] == "incremental" and third["parent"] == second["artifact"]


@pytest.mark.pitr(incremental=False)
def test_pg_verifybackup_finds_a_changed_data_file(archiving):
    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    write_rows(cluster, 3, "row", pause=0)
    meta = pitr_base.base_backup(catalog, "app")
    assert meta["kind"] == "full"  # incremental: false
    folder = pitr_base.base_dir(catalog, "app")
    # rewrite the artifact with one byte of a table file changed (the same size; a valid tar and zstd stream)
    out, changed = io.BytesIO(), None
    with open_decompressed(folder / meta["artifact"], meta["raw_size_bytes"]) as reader, \
            tarfile.open(fileobj=reader, mode="r|") as tar, tarfile.open(fileobj=out, mode="w") as new:
        for member in tar:
            data = tar.extractfile(member).read() if member.isfile() else None
            if changed is None and member.name.startswith("base/") and member.isfile() and member.size > 8192:
                data = data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:]
                changed = member.name
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    assert changed is not None
    with ArtifactWriter(folder / meta["artifact"]) as writer:
        writer.write(out.getvalue())
        written = writer.commit()
    meta.update(sha256=written.sha256, size_bytes=written.size_bytes, raw_size_bytes=written.raw_size_bytes)
    (folder / f"{meta['artifact']}.json").write_text(json.dumps(meta))
    check = pitr_checks.verify_base(catalog, "app", meta)
    assert not check.passed and "pg_verifybackup found" in check.message
    assert any(changed.rsplit("/", 1)[-1] in p for p in check.metadata["problems"]), check.metadata


@pytest.mark.pitr
def test_the_drill_proves_a_random_time_and_retention_keeps_exactly_the_window(archiving, tmp_path, capsys):
    cluster, catalog_path, folder = archiving
    catalog = load_catalog(catalog_path)
    write_rows(cluster, 5, "before", pause=0)
    first = pitr_base.base_backup(catalog, "app", kind="full")
    write_rows(cluster, 30, "window of the first")
    archive_now(cluster)
    second = pitr_base.base_backup(catalog, "app", kind="full")
    write_rows(cluster, 30, "window of the second")
    archive_now(cluster)
    for seed in (1, 2):
        drill = pitr_checks.pitr_drill(catalog, "app", rng=random.Random(seed))
        assert drill.passed, (drill.message, drill.metadata)
        after_xid = int(drill.metadata["commit_after"].split()[0])
        assert f"recovery stopping before commit of transaction {after_xid}" in drill.metadata["reached"]
        assert drill.metadata["amcheck"] == "clean" and drill.metadata["tables_read"] >= 1
    assert not list(tmp_path.glob("backup-assets-pitr-drill-*"))
    if os.geteuid() == 0:  # as root without pitr.run_as: said, nothing started
        src = catalog.sources["app"]
        bare = catalog.model_copy(update={"sources": {"app": src.model_copy(update={
            "pitr": src.pitr.model_copy(update={"run_as": None})})}})
        refused = pitr_checks.pitr_drill(bare, "app", rng=random.Random(3))
        assert not refused.passed and "set sources.app.pitr.run_as" in refused.message
    assert pitr_checks.wal_continuity(catalog, "app").passed
    # retention: once the window (14 days) starts after the second base backup ended, the first one and the WAL
    # before the second's start go; restoring to the latest still works, and the continuity check still passes
    later = dt.datetime.fromisoformat(second["finished_at"]) + dt.timedelta(days=14, minutes=1)
    # the files of a base backup killed before its JSON: never counted; gone once a day old, not before
    folder_b = pitr_base.base_dir(catalog, "app")
    old_orphan = folder_b / "base-20261101T000000000000Z.tar.zst"
    new_orphan = folder_b / f"base-{(later - dt.timedelta(hours=1)).strftime('%Y%m%dT%H%M%S%fZ')}.manifest.zst"
    for orphan in (old_orphan, new_orphan):
        orphan.write_bytes(b"partial")
    dry = pitr_base.prune_base(catalog, "app", dry_run=True, now=later)
    assert dry["orphans_deleted"] == 1 and old_orphan.exists()
    assert dry["deleted"] == [first["artifact"]] and dry["wal_files_deleted"] > 0
    assert len(pitr_base.base_backups(catalog, "app")) == 2
    report = pitr_base.prune_base(catalog, "app", dry_run=False, now=later)
    assert report == dry
    assert not old_orphan.exists() and new_orphan.exists()
    new_orphan.unlink()
    assert [b["artifact"] for b in pitr_base.base_backups(catalog, "app")] == [second["artifact"]]
    assert not list(pitr_base.base_dir(catalog, "app").glob(first["artifact"].split(".")[0] + "*"))
    left = wal.verify(catalog, "app")
    assert left.first == second["start_wal"] and not left.gaps
    assert pitr_checks.wal_continuity(catalog, "app").passed
    assert restored_ids(cluster, catalog_path, tmp_path, ["--latest"], capsys) == {i for i, _ in commits(cluster)}
    # an hour before the oldest kept base backup: refused, with the reason
    with pytest.raises(pitr.BackupError, match="before the oldest base backup"):
        pitr_base.pick_base(pitr_base.base_backups(catalog, "app"), "app",
                       dt.datetime.fromisoformat(second["finished_at"]) - dt.timedelta(hours=1))


@pytest.mark.s3
@pytest.mark.pitr
def test_the_dagster_job_takes_the_base_backup_runs_every_check_and_replicates(archiving):
    import dagster as dg

    from backup_assets.defs.build import build_definitions
    from backup_assets.defs.pitr import BASE_BACKUPS_JOB

    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    write_rows(cluster, 3, "before", pause=0)
    pitr_base.base_backup(catalog, "app")  # yesterday's, say: the drill restores into its window
    write_rows(cluster, 20, "today")
    archive_now(cluster)
    defs = build_definitions(catalog)
    job = defs.resolve_job_def(BASE_BACKUPS_JOB)
    yesterday = (dt.date.today() - dt.timedelta(days=1)).isoformat()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(partition_key=yesterday, instance=instance, raise_on_error=False)
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(checks) == {"base_verified", "wal_continuity", "recovery_point", "pitr_drill", "replica_intact"}
        assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}
        mats = result.asset_materializations_for_node("app__base_backup")
        assert mats[0].metadata["kind"].value == "incremental"  # on the earlier one (PostgreSQL 18, summarize_wal)
        replica = {m.asset_key.to_user_string(): m for m in mats}["app/base_backup_s3"]
        assert replica.metadata["base_backups"].value == 2 and replica.metadata["wal_files"].value > 0
    base = pitr_base.base_backups(catalog, "app")[-1]
    assert base["partition"] == yesterday and base["kind"] == "incremental"


@pytest.mark.s3
@pytest.mark.pitr(wal_push_s3=True)
def test_base_backups_and_wal_on_s3_are_pruned_there_and_restore_when_the_local_copies_are_gone(
        archiving, tmp_path, capsys):
    import shutil

    from backup_assets.core.pitr import s3 as pitr_s3
    from backup_assets.core.pitr.locations import replica_storage
    from backup_assets.core.retention.prune import prune

    cluster, catalog_path, folder = archiving
    catalog = load_catalog(catalog_path)
    storage = replica_storage(catalog)
    write_rows(cluster, 5, "before", pause=0)
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 0  # and replicates
    write_rows(cluster, 10, "first window")
    archive_now(cluster)
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 0
    write_rows(cluster, 10, "second window")
    archive_now(cluster)
    # wal_push_s3: every segment was on S3 before PostgreSQL heard it was archived
    local_wal = {p.name for p in folder.glob("*.json")}
    on_s3 = {k.rsplit("/", 1)[-1] for k, _ in storage.list("wal/app/") if k.endswith(".json")}
    assert local_wal and local_wal <= on_s3
    assert pitr_s3.replica_intact(catalog, "app", storage).passed
    forge_physical_copies(catalog, storage, lambda key, data, meta: storage.client.put_object(
        Bucket=storage.bucket, Key=storage._full(key), Body=data, Metadata=meta))
    bases = pitr_base.base_backups(catalog, "app")
    later = dt.datetime.fromisoformat(bases[-1]["finished_at"]) + dt.timedelta(days=15)
    report = prune(catalog, dry_run=False, now=later)["pitr"]["app"]
    assert report["local"]["deleted"] == report["s3"]["deleted"] == [bases[0]["artifact"]]
    assert report["s3"]["wal_files_deleted"] > 0
    assert not [k for k, _ in storage.list("base/app/") if bases[0]["artifact"].split(".")[0] in k]
    check = pitr_s3.replica_intact(catalog, "app", storage)
    assert check.passed, check.message
    # the local repository's base backups and WAL are lost: restore to the latest from S3 alone
    shutil.rmtree(pitr_base.base_dir(catalog, "app"))
    for p in list(folder.iterdir()):
        p.unlink()
    assert restored_ids(cluster, catalog_path, tmp_path, ["--latest", "--from", "s3"], capsys) == \
        {i for i, _ in commits(cluster)}
    assert [b["artifact"] for b in pitr_base.base_backups(catalog, "app")] == [bases[1]["artifact"]]


@pytest.mark.s3(object_lock=True)
@pytest.mark.pitr(wal_push_s3=True, incremental=False)
def test_under_object_lock_base_backups_and_wal_restore_from_s3_behind_an_overwrite(archiving, tmp_path, capsys):
    """In a locked bucket: the base backup and every WAL segment are locked; whoever holds the host's credentials
    overwrites a segment and deletes the base backup (a delete marker); with the local copies gone, a restore to
    the latest from S3 still recovers every commit, from the locked versions."""
    import shutil

    from backup_assets.core.pitr.locations import replica_storage

    cluster, catalog_path, folder = archiving
    catalog = load_catalog(catalog_path)
    storage = replica_storage(catalog)
    write_rows(cluster, 5, "before", pause=0)
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 0  # and replicates
    write_rows(cluster, 10, "after")
    archive_now(cluster)
    client, bucket = storage.client, storage.bucket
    segments = sorted(k for k, _ in storage.list("wal/app/") if not k.endswith(".json") and ".history" not in k)
    bases = [k for k, _ in storage.list("base/app/")]
    assert segments and bases
    for key in [*segments, *bases]:
        assert client.head_object(Bucket=bucket, Key=storage._full(key))["ObjectLockMode"] == "GOVERNANCE", key
    client.put_object(Bucket=bucket, Key=storage._full(segments[-1]), Body=b"ransom")
    for key in bases:
        client.delete_object(Bucket=bucket, Key=storage._full(key))
    shutil.rmtree(pitr_base.base_dir(catalog, "app"))
    for p in list(folder.iterdir()):
        p.unlink()
    assert restored_ids(cluster, catalog_path, tmp_path, ["--latest", "--from", "s3"], capsys) == \
        {i for i, _ in commits(cluster)}


@pytest.mark.pitr(incremental=False)
def test_restore_to_an_lsn_starts_from_the_base_backup_before_it(archiving, tmp_path, capsys):
    """An LSN between two base backups restores from the older one (it used to start from the newest and fail
    after building the data directory); an LSN before the oldest is refused before anything is built."""
    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    with cluster.connect() as conn:
        early = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    write_rows(cluster, 5, "before the first base backup", pause=0)
    first = pitr_base.base_backup(catalog, "app")
    write_rows(cluster, 10, "between", pause=0)
    with cluster.connect() as conn:
        between = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        ids_then = {r[0] for r in conn.execute('SELECT id FROM "Stamped rows"')}
    write_rows(cluster, 10, "after", pause=0)
    second = pitr_base.base_backup(catalog, "app")
    write_rows(cluster, 3, "after the second", pause=0)
    archive_now(cluster)
    assert first["end_lsn"] and pitr_base.lsn_value(first["end_lsn"]) <= pitr_base.lsn_value(between) < pitr_base.lsn_value(
        second["end_lsn"])
    bases = pitr_base.base_backups(catalog, "app")
    chosen = pitr_base.pick_base(bases, "app", None, to_lsn=str(between),
                            end_lsn=lambda b: pitr_base.base_end_lsn(catalog, "app", b))
    assert chosen["artifact"] == first["artifact"]
    assert restored_ids(cluster, catalog_path, tmp_path, ["--to-lsn", str(between)], capsys) == ids_then
    # before the oldest base backup is consistent: refused, nothing built
    pgdata = tmp_path / "never"
    user = ["--run-as", SERVER_USER] if os.geteuid() == 0 else []
    assert cli(catalog_path, "restore", "--source", "app", "--to-lsn", str(early), "--pgdata", str(pgdata),
               "--port", str(free_port()), "--confirm", *user) == 1
    err = capsys.readouterr().err
    assert f"WAL location {early} is before every base backup of app is consistent" in err, err
    assert not pgdata.exists()
    # a base backup described before the end LSN was kept there: read from its stored backup_manifest
    assert pitr_base.base_end_lsn(catalog, "app", {k: v for k, v in first.items() if k != "end_lsn"}) == \
        pitr_base.lsn_value(first["end_lsn"])


@pytest.mark.pitr(incremental=False)
def test_a_failed_point_in_time_restore_removes_what_it_built(archiving, tmp_path, capsys, monkeypatch):
    cluster, catalog_path, _ = archiving
    catalog = load_catalog(catalog_path)
    write_rows(cluster, 3, "row", pause=0)
    pitr_base.base_backup(catalog, "app")
    monkeypatch.setattr(pitr, "_wait_recovered", lambda *a, **k: (_ for _ in ()).throw(
        pitr.BackupError("recovery did not finish within 1s")))
    pgdata = tmp_path / "built"
    pgdata.mkdir()
    with pytest.raises(pitr.BackupError, match=f"recovery did not finish within 1s; what the restore built in {pgdata} "
                                               "was removed"):
        pitr.restore_to_time(catalog, "app", str(pgdata), port=free_port(),
                             run_as=SERVER_USER if os.geteuid() == 0 else None)
    assert pgdata.is_dir() and not any(pgdata.iterdir())  # the folder it was given, empty again


@pytest.mark.pitr
def test_a_recovered_server_runs_as_the_catalogs_user_and_its_stop_command_works(archiving, tmp_path, capsys):
    """As root, `restore --to-time` runs the server as the catalog's pitr.run_as without --run-as; the stop command
    it prints works as printed; a server left running is stopped by `make stop` (stop_recovered)."""
    import subprocess

    cluster, catalog_path, _ = archiving
    write_rows(cluster, 5, "before")
    assert cli(catalog_path, "basebackup", "--source", "app") == 0
    out = capsys.readouterr().out
    assert "a point-in-time restore of app reaches any moment from " in out, out
    write_rows(cluster, 5, "after")
    archive_now(cluster)
    catalog = load_catalog(catalog_path)
    stops = []
    for n in range(2):
        pgdata, port = tmp_path / f"recovered-{n}", free_port()
        assert cli(catalog_path, "restore", "--source", "app", "--latest", "--pgdata", str(pgdata), "--port",
                   str(port), "--confirm", *(["--timings"] if n else [])) == 0
        printed = capsys.readouterr().out
        if n:  # each phase with its seconds, redo and promotion from the server's log
            [timings] = [ln for ln in printed.splitlines() if ln.startswith("timings: ")]
            for phase in ("choose the base backup", "unpack", "start the server", "recover until promoted",
                          "of which redo", "of which promotion", "total"):
                assert f"{phase} " in timings, timings
        [line] = [ln for ln in printed.splitlines() if "stop it with: " in ln]
        stops.append((pgdata, line.split("stop it with: ", 1)[1]))
        assert (pgdata / "postmaster.pid").exists()
        if os.geteuid() == 0:
            assert pgdata.stat().st_uid != 0 and line.split("stop it with: ", 1)[1].startswith("runuser -u ")
    pgdata, command = stops[0]
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (pgdata / "postmaster.pid").exists()
    said = pitr.stop_recovered(catalog)  # what `make stop` does for the demo: the one still running
    assert len(said) == 1 and said[0].startswith(f"the server recovered into {stops[1][0]} (port "), said
    assert said[0].endswith("stopped; its data directory is kept"), said
    assert not (stops[1][0] / "postmaster.pid").exists()
    assert pitr.stop_recovered(catalog) == []
