"""Replicas on Google Cloud Storage and Azure Blob Storage (fake-gcs-server and Azurite on 127.0.0.1), beside S3:
several replicas at once, each its own asset; their own checksums proven; tampering, an endpoint killed mid-upload
and mid-download; restore from each; retention and the byte audit on each."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import sqlite3

import dagster as dg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_assets.cli import main
from backup_assets.core import BackupError, failpoints
from backup_assets.core.backup.take import run_backup
from backup_assets.core.replica import audit_replicas, fetch_from_replica, replica_intact, replicate, storage_for
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import find_backup
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key, parse_key, replica_key
from backup_assets.demo.seed import seed_miyabi

from .conftest import azure_replication, gcs_replication, s3_replication

P = "2026-11-20"


@pytest.fixture
def bigger_store(tmp_path):
    """About 9.6 MB compressed: above the 8 MB the GCS client sends in one request, three Azure ranges."""
    path = tmp_path / "data" / "bigger.db"
    seed_miyabi(path, runs=2600, checkpoints_per_run=3, payload_bytes=1024)
    return path


@pytest.fixture
def big_store(tmp_path):
    """A SQLite store whose compressed backup (about 4 MB of random blobs) spans several 1 MiB chunks and blocks."""
    path = tmp_path / "data" / "big.db"
    seed_miyabi(path, runs=1000, checkpoints_per_run=3, payload_bytes=1024)
    return path


def _dump(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def _catalog(write_catalog, path, fake_gcs, gcs_bucket, azurite, azure_container, **more):
    return write_catalog({"big": {"engine": "sqlite", "path": str(path)}},
                         replication={**gcs_replication(fake_gcs, gcs_bucket, part_size_mb=1),
                                      **azure_replication(azurite, azure_container, block_size_mb=1), **more})


def test_one_backup_three_replicas_each_its_asset_proven_listed_and_restorable(
        big_store, tmp_path, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, moto_s3, bucket, capsys):
    catalog = _catalog(write_catalog, big_store, fake_gcs, gcs_bucket, azurite, azure_container,
                       **s3_replication(moto_s3, bucket, part_size_mb=5))
    defs = build_definitions(catalog)
    keys = [replica_key("big", "full", "daily", r) for r in ("s3", "gcs", "azure")]
    assert [parse_key(k) for k in keys] == [("big", "full", "daily", r) for r in ("s3", "gcs", "azure")]
    job = defs.resolve_job_def("daily_backups")
    assert set(keys) <= set(job.asset_layer.executable_asset_keys)
    result = job.execute_in_process(partition_key=P, asset_selection=[backup_key("big", "full", "daily"), *keys],
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success
    made = {e.asset_key for e in result.all_events if e.is_step_materialization}
    assert set(keys) <= made
    evals = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    for r in ("s3", "gcs", "azure"):
        assert evals[(f"full_daily_{r}", "replica_intact")].passed, evals[(f"full_daily_{r}", "replica_intact")]
    backup = find_backup(catalog, "big", "full", "daily", P)
    assert backup.manifest.size_bytes > 3 * 1024 * 1024
    # what each check compared: GCS's own MD5 of the stored object; the Azure blob committed from blocks carries
    # an MD5 Azure never checked, so its bytes were downloaded
    gcs = replica_intact(catalog, backup, storage_for(catalog, replica="gcs"))
    assert gcs.passed and gcs.metadata["compared"] == "gcs-checksum" and "GCS's MD5 of the stored bytes" in gcs.message
    azure = replica_intact(catalog, backup, storage_for(catalog, replica="azure"))
    assert azure.passed and azure.metadata["compared"] == "bytes" and "committed from" in azure.message

    assert main(["--catalog", catalog.catalog_path, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["copies"] == {"local": "present", "s3": "present", "gcs": "present", "azure": "present"}
    assert rows[0]["where"] == "local+s3+gcs+azure"

    # loading the definitions imports neither SDK (every process that loads them would pay for it)
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from backup_assets.catalog import load_catalog; "
         "from backup_assets.defs.build import build_definitions; "
         f"build_definitions(load_catalog({catalog.catalog_path!r})); "
         "assert not [m for m in sys.modules if m.startswith(('google.cloud', 'azure'))], 'an SDK was imported'"],
        capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]

    # the local disk is lost: each replica restores the store exactly
    for path in LocalRepository(catalog.repository_root).root.rglob("*"):
        if path.is_file():
            path.unlink()
    for replica in ("gcs", "azure"):
        target = tmp_path / f"restored-{replica}.db"
        assert main(["--catalog", catalog.catalog_path, "restore", "--source", "big", "--group", "full", "--from",
                     replica, "--target-file", str(target), "--confirm"]) == 0
        assert _dump(target) == _dump(big_store)
        for path in LocalRepository(catalog.repository_root).root.rglob("*"):
            if path.is_file():
                path.unlink()


def test_a_forged_replica_fails_its_check_whatever_its_metadata_says(
        miyabi_db, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container):
    catalog = _catalog(write_catalog, miyabi_db, fake_gcs, gcs_bucket, azurite, azure_container)
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    for replica in ("gcs", "azure"):
        replicate(catalog, backup, storage_for(catalog, replica=replica))
    key = f"backups/sqlite/daily/{backup.artifact_path.name}"
    data = backup.artifact_path.read_bytes()
    forged = bytes(len(data))  # same size, other bytes, the right sha256 in the metadata

    fake_gcs.client().bucket(gcs_bucket).blob(key).upload_from_string(forged)
    blob = fake_gcs.client().bucket(gcs_bucket).blob(key)
    blob.metadata = {"sha256": backup.manifest.sha256}
    blob.patch()
    outcome = replica_intact(catalog, backup, storage_for(catalog, replica="gcs"))
    assert not outcome.passed and "GCS's MD5 of the stored bytes" in outcome.message and "differs" in outcome.message

    # Azure: a blob committed from blocks with the original's MD5 declared (Azure does not check that one)
    from azure.storage.blob import ContentSettings

    forger = azurite.service().get_container_client(azure_container).get_blob_client(key)
    forger.stage_block(base64.b64encode(b"forged-0").decode(), forged)
    forger.commit_block_list([base64.b64encode(b"forged-0").decode()], metadata={"sha256": backup.manifest.sha256},
                             content_settings=ContentSettings(content_md5=bytearray(hashlib.md5(data).digest())))
    outcome = replica_intact(catalog, backup, storage_for(catalog, replica="azure"))
    assert not outcome.passed and "downloaded, hash to sha256" in outcome.message
    # replicating again is never fooled by the forgery: both are uploaded again, and then proven
    for replica in ("gcs", "azure"):
        assert replicate(catalog, backup, storage_for(catalog, replica=replica)).mode == "upload"
        assert replica_intact(catalog, backup, storage_for(catalog, replica=replica)).passed
        assert replicate(catalog, backup, storage_for(catalog, replica=replica)).mode == "already-replicated"
    fake_gcs.client().bucket(gcs_bucket).blob(key).upload_from_string(forged)
    blob = fake_gcs.client().bucket(gcs_bucket).blob(key)
    blob.metadata = {"sha256": backup.manifest.sha256}
    blob.patch()
    # and without the local artifact, the bytes decide too
    backup.artifact_path.rename(backup.artifact_path.with_name("moved"))
    outcome = replica_intact(catalog, backup, storage_for(catalog, replica="gcs"))
    assert not outcome.passed and "downloaded, hash to sha256" in outcome.message


def _kill_at(monkeypatch, name: str, emulator, after: int = 1, process: bool = False):
    """Cut the emulator's endpoint off (`process`: and SIGKILL the emulator) the `after`-th time the code passes
    the failpoint `name`."""
    seen = []
    original = failpoints.point

    def point(at: str) -> None:
        if at == name:
            seen.append(at)
            if len(seen) == after:
                emulator.kill(process=process)
        original(at)

    monkeypatch.setattr(failpoints, "point", point)
    return seen


@pytest.mark.parametrize("replica,process", [("gcs", False), ("gcs", True), ("azure", False)],
                         ids=["gcs", "gcs-process-killed", "azure"])
def test_an_endpoint_killed_mid_upload_leaves_nothing_counted_and_the_next_run_completes(
        replica, process, bigger_store, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, monkeypatch):
    # GCS: a resumable upload in 1 MiB chunks (the client sends up to 8 MB in one request); Azure: 1 MiB blocks
    catalog = _catalog(write_catalog, bigger_store, fake_gcs, gcs_bucket, azurite, azure_container)
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    emulator = fake_gcs if replica == "gcs" else azurite
    seen = _kill_at(monkeypatch, "gcs.chunk_read" if replica == "gcs" else "azure.block_staged", emulator, after=2,
                    process=process)
    try:
        with pytest.raises(BackupError, match="unreachable|upload"):
            replicate(catalog, backup, storage_for(catalog, replica=replica))
        assert len(seen) >= 2
    finally:
        emulator.start()  # the same port and data: the endpoint comes back
    storage = storage_for(catalog, replica=replica)
    key = f"sqlite/daily/{backup.artifact_path.name}"
    assert storage.head(key) is None and storage.head(key + ".meta") is None  # nothing half-written is there
    assert not replica_intact(catalog, backup, storage).passed
    monkeypatch.undo()
    assert replicate(catalog, backup, storage).mode == "upload"
    assert replica_intact(catalog, backup, storage).passed


@pytest.mark.parametrize("replica", ["gcs", "azure"])
def test_an_endpoint_killed_mid_download_restores_nothing_and_the_next_attempt_does(
        replica, bigger_store, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, monkeypatch):
    catalog = _catalog(write_catalog, bigger_store, fake_gcs, gcs_bucket, azurite, azure_container)
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    replicate(catalog, backup, storage_for(catalog, replica=replica))
    local = LocalRepository(catalog.repository_root)
    for path in local.root.rglob("*"):
        if path.is_file():
            path.unlink()
    emulator = fake_gcs if replica == "gcs" else azurite
    seen = _kill_at(monkeypatch, f"{replica}.download_write", emulator, after=2)
    try:
        with pytest.raises(BackupError):
            fetch_from_replica(catalog, source="big", group="full", replica=replica)
        assert len(seen) >= 2  # it was cut off mid-way, after bytes had arrived
        assert local.refs(complete=False) == [] and not [p for p in local.root.rglob("*") if p.is_file()]
    finally:
        emulator.start()
    monkeypatch.undo()
    fetched = fetch_from_replica(catalog, source="big", group="full", replica=replica)
    assert fetched.manifest.sha256 == backup.manifest.sha256


def test_retention_and_the_byte_audit_reach_every_replica(
        miyabi_db, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, capsys):
    from backup_assets.core.retention.prune import prune

    catalog = _catalog(write_catalog, miyabi_db, fake_gcs, gcs_bucket, azurite, azure_container)
    old, new = "2026-11-19", "2026-11-20"
    for partition in (old, new):
        run_backup(catalog, "big", "full", "daily", partition)
        for replica in ("gcs", "azure"):
            replicate(catalog, find_backup(catalog, "big", "full", "daily", partition),
                      storage_for(catalog, replica=replica))
    assert main(["--catalog", catalog.catalog_path, "replicas", "verify", "--all", "--json"]) == 0
    proven = json.loads(capsys.readouterr().out)
    assert sorted((r["replica"], r["passed"]) for r in proven) == [("azure", True)] * 2 + [("gcs", True)] * 2
    # eight days on, a daily tier (7 days) keeps only the newest backup, locally and on each replica
    report = prune(catalog, dry_run=False, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8))
    for where in ("local", "gcs", "azure"):
        assert report[where]["backups"] == 1, report[where]
    for replica in ("gcs", "azure"):
        names = [k for k, _ in storage_for(catalog, replica=replica).list("sqlite/")]
        assert len(names) == 2 and all(f"big-full-{new}-" in n for n in names), names
    # a replica whose copy went missing while its retention keeps it: the audit fails, naming it
    storage = storage_for(catalog, replica="azure")
    kept = next(k for k, _ in storage.list("sqlite/") if not k.endswith(".meta"))
    storage.delete([kept])
    results = audit_replicas(catalog, storage, every=True)
    assert [r.outcome.passed for r in results] == [False] and "missing" in results[0].outcome.message
    # the metrics say so, per replica, from this host's records
    from backup_assets.core.monitoring.metrics import render

    text = render(catalog).decode()
    for replica in ("gcs", "azure"):
        labels = f'group="full",replica="{replica}",source="big",tier="daily"'
        assert f"backup_assets_replica_last_replicated_timestamp_seconds{{{labels}}}" in text
        assert f"backup_assets_replica_last_proven_timestamp_seconds{{{labels}}}" in text
    assert 'backup_assets_replica_audit_failures{replica="azure"} 1.0' in text
    assert 'backup_assets_replica_audit_failures{replica="gcs"} 0.0' in text


def test_bad_replica_settings_are_one_line(write_catalog, tmp_path, miyabi_db, capsys):
    from backup_assets.catalog import CatalogError

    with pytest.raises(CatalogError, match="account_key.*not allowed"):
        write_catalog({"m": {"engine": "sqlite", "path": str(miyabi_db)}},
                      replication={"azure": {"container": "c", "account_url": "https://a.blob.core.windows.net",
                                             "account_key": "secret"}})
    with pytest.raises(CatalogError, match="NAME of an environment variable"):
        write_catalog({"m": {"engine": "sqlite", "path": str(miyabi_db)}},
                      replication={"gcs": {"bucket": "b", "credentials_file_env": "/etc/key.json"}})
    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication={"azure": {"container": "c", "account_url": "http://127.0.0.1:9/acct",
                                                   "account_key_env": "BA_TEST_UNSET_AZURE_KEY"}})
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "m", "--from", "azure", "--confirm"]) != 0
    err = capsys.readouterr().err
    assert "BA_TEST_UNSET_AZURE_KEY" in err and "not set" in err and len(err.strip().splitlines()) == 1
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "m", "--from", "gcs", "--confirm"]) != 0
    assert "no replication.gcs section" in capsys.readouterr().err


def test_an_azure_refusal_is_one_line_with_the_service_s_code(miyabi_db, write_catalog, azurite, azure_container,
                                                              tmp_path):
    from backup_assets.core.storage.azure import AzureStorage

    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=azure_replication(azurite, azure_container))
    storage = storage_for(catalog, replica="azure")
    assert isinstance(storage, AzureStorage)
    src = tmp_path / "a"
    src.write_bytes(b"x" * 10)
    with pytest.raises(BackupError) as exc:  # metadata Azure refuses (a name that is no identifier)
        storage.put_file(src, "k/a", sha256=hashlib.sha256(b"x" * 10).hexdigest(), metadata={"1bad name": "v"})
    message = str(exc.value)
    assert "StorageErrorCode" not in message and "(400)" in message and len(message.splitlines()) == 1, message


@pytest.mark.replicas("gcs", "azure")
@pytest.mark.pitr(wal_push_s3=True, incremental=False)
def test_base_backups_and_wal_on_gcs_and_azure_restore_exactly_when_the_local_copies_are_gone(
        archiving, fake_gcs, gcs_bucket, tmp_path, capsys):
    import shutil

    from backup_assets.catalog import load_catalog
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import s3 as pitr_s3
    from backup_assets.core.pitr.locations import replica_storage
    from backup_assets.core.retention.prune import prune
    from backup_assets.defs.pitr import base_replica_key

    from .test_pitr import archive_now, cli, commits, forge_physical_copies, restored_ids, write_rows

    cluster, catalog_path, folder = archiving
    catalog = load_catalog(catalog_path)
    keys = build_definitions(catalog).resolve_asset_graph().get_all_asset_keys()
    assert {base_replica_key("app", "gcs"), base_replica_key("app", "azure")} <= set(keys)
    write_rows(cluster, 5, "before", pause=0)
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 0  # and replicates to both
    write_rows(cluster, 10, "first window")
    archive_now(cluster)
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 0
    write_rows(cluster, 10, "second window")
    archive_now(cluster)
    local_wal = {p.name for p in folder.glob("*.json")}
    for replica in ("gcs", "azure"):  # wal_push_s3: on every replica before PostgreSQL heard it was archived
        storage = replica_storage(catalog, replica=replica)
        assert local_wal <= {k.rsplit("/", 1)[-1] for k, _ in storage.list("wal/app/") if k.endswith(".json")}
        assert pitr_s3.replica_intact(catalog, "app", storage).passed
    gcs, azure = replica_storage(catalog, replica="gcs"), replica_storage(catalog, replica="azure")

    def gcs_put(key, data, meta):
        blob = fake_gcs.client().bucket(gcs_bucket).blob(gcs._full(key))
        blob.metadata = meta
        blob.upload_from_string(data)

    forge_physical_copies(catalog, gcs, gcs_put)
    forge_physical_copies(catalog, azure, lambda key, data, meta: azure._blob(key).upload_blob(
        data, overwrite=True, metadata=meta))
    bases = pitr_base.base_backups(catalog, "app")
    report = prune(catalog, dry_run=False, now=dt.datetime.fromisoformat(bases[-1]["finished_at"])
                   + dt.timedelta(days=15))["pitr"]["app"]
    assert report["gcs"]["deleted"] == report["azure"]["deleted"] == [bases[0]["artifact"]]
    expected = {i for i, _ in commits(cluster)}
    for replica in ("gcs", "azure"):  # the local base backups and WAL are lost: each replica alone restores
        shutil.rmtree(pitr_base.base_dir(catalog, "app"), ignore_errors=True)
        for p in list(folder.iterdir()):
            p.unlink()
        if replica == "azure":  # and the other replica is gone too: WAL comes from this one
            gcs = replica_storage(catalog, replica="gcs")
            gcs.delete([k for k, _ in gcs.list("")])
        assert restored_ids(cluster, catalog_path, tmp_path, ["--latest", "--from", replica], capsys) == expected


def test_rekey_reaches_every_replica_even_when_only_the_replicas_hold_the_backup(
        miyabi_db, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, monkeypatch, tmp_path, capsys):
    """The local disk was lost: the backup is re-encrypted in the first replica that holds it (GCS) and its new
    bytes reach the other (Azure) through this host; the old-key copies go from both."""
    import pyrage

    old_key, new_key = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    (tmp_path / "old.key").write_text(f"{old_key}\n")
    monkeypatch.setenv("BA_TEST_AGE_KEY", str(tmp_path / "old.key"))
    catalog = write_catalog({"big": {"engine": "sqlite", "path": str(miyabi_db)}},
                            encryption={"recipients": [str(old_key.to_public())], "identity_file_env": "BA_TEST_AGE_KEY"},
                            replication={**gcs_replication(fake_gcs, gcs_bucket),
                                         **azure_replication(azurite, azure_container)})
    run_backup(catalog, "big", "full", "daily", P)
    old = find_backup(catalog, "big", "full", "daily", P)
    for replica in ("gcs", "azure"):
        replicate(catalog, old, storage_for(catalog, replica=replica))
    for path in LocalRepository(catalog.repository_root).root.rglob("*"):
        if path.is_file():
            path.unlink()
    from backup_assets.core.repository import SCRATCH

    scratches = []  # the bytes pass through the local repository's scratch (owned, swept), not the system's temp
    real_scratch = LocalRepository.scratch

    def spy(self, what, **kwargs):
        scratches.append((what, kwargs.get("need_bytes")))
        return real_scratch(self, what, **kwargs)

    monkeypatch.setattr(LocalRepository, "scratch", spy)
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", str(new_key.to_public()),
                 "--apply"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert any(what == "relay" and need for what, need in scratches), scratches  # and its room checked first
    assert not list((catalog.repository_root / SCRATCH).glob("*")), "a scratch folder was left behind"
    for replica in ("gcs", "azure"):
        names = [k.rsplit("/", 1)[-1] for k, _ in storage_for(catalog, replica=replica).list("sqlite/")]
        assert old.artifact_path.name not in names and old.artifact_path.name + ".meta" not in names, names
        [new_name] = [n for n in names if n.endswith(".age")]
        assert new_name + ".meta" in names
    # the new key restores it from either replica, exactly
    (tmp_path / "new.key").write_text(f"{new_key}\n")
    monkeypatch.setenv("BA_TEST_AGE_KEY", str(tmp_path / "new.key"))
    for replica in ("azure", "gcs"):
        target = tmp_path / f"restored-{replica}.db"
        assert main(["--catalog", catalog.catalog_path, "restore", "--source", "big", "--group", "full", "--from",
                     replica, "--target-file", str(target), "--confirm"]) == 0, capsys.readouterr().err
        assert _dump(target) == _dump(miyabi_db)


def test_the_doctor_removes_an_artifact_left_without_its_manifest_on_every_replica(
        miyabi_db, write_catalog, fake_gcs, gcs_bucket, azurite, azure_container, monkeypatch, capsys):
    """An upload killed between an artifact and its manifest leaves an object that is never a backup: `list` does
    not show it, `doctor` removes it (once it is older than an upload in progress could be)."""
    from backup_assets.core import doctor

    catalog = _catalog(write_catalog, miyabi_db, fake_gcs, gcs_bucket, azurite, azure_container)
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    key = f"sqlite/daily/{backup.artifact_path.name}"
    for replica in ("gcs", "azure"):
        storage_for(catalog, replica=replica).put_file(backup.artifact_path, key, sha256=backup.manifest.sha256)
    assert main(["--catalog", catalog.catalog_path, "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["copies"] == {"local": "present"}  # an artifact without its manifest is no copy
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert "removed gs://" not in capsys.readouterr().out  # too young: it may be an upload in progress
    monkeypatch.setattr(doctor, "ORPHAN_AGE_S", 0)
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    out = capsys.readouterr().out
    assert f"removed gs://{gcs_bucket}/backups/{key}" in out and f"{azure_container}/backups/{key}" in out, out
    for replica in ("gcs", "azure"):
        assert storage_for(catalog, replica=replica).head(key) is None


@pytest.mark.replicas("gcs", "azure")
@pytest.mark.pitr(incremental=False)
def test_a_base_backup_reaches_the_replicas_that_are_up_and_says_which_is_not(
        archiving, fake_gcs, gcs_bucket, capfd):
    from backup_assets.catalog import load_catalog
    from backup_assets.core.pitr.locations import replica_storage

    from .test_pitr import cli

    _cluster, catalog_path, _folder = archiving
    fake_gcs.client().bucket(gcs_bucket).delete(force=True)  # the GCS bucket is gone
    assert cli(catalog_path, "basebackup", "--source", "app", "--kind", "full") == 1
    err = capfd.readouterr().err
    assert "the GCS replica" in err and "does not exist" in err, err
    azure = replica_storage(load_catalog(catalog_path), replica="azure")
    assert [k for k, _ in azure.list("base/app/") if k.endswith(".json")], "Azure got the base backup all the same"


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), steps=st.lists(st.tuples(st.integers(1, 900), st.integers(0, 5000)),
                                                                  max_size=30))
def test_an_upload_reader_hashes_what_it_hands_over_whatever_the_reads_and_rewinds(tmp_path_factory, data, steps):
    """The GCS upload's reader (read sizes and rewinds as a resumable upload retrying a chunk makes them) hands
    over the last bytes only when the whole file's SHA-256 is the manifest's; otherwise that read raises."""
    import io

    from backup_assets.core.storage.gcs import _Checked

    path = tmp_path_factory.mktemp("reader") / "artifact"
    path.write_bytes(data)
    for expected, good in ((hashlib.sha256(data).hexdigest(), True), ("0" * 64, False)):
        reader = _Checked(io.BytesIO(data), len(data), expected, path)
        try:
            for size, rewind in steps:  # reads, each followed by a rewind to an earlier point
                reader.read(size)
                reader.seek(min(rewind, reader.tell()))
            sent = reader.read(-1)
        except BackupError as exc:
            assert not good and "differs from the manifest's" in str(exc)
        else:
            assert good and data.endswith(sent)
