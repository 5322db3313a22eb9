"""S3 replicas through moto's server over real HTTP: multipart, checksums, SSE, copies, failures."""

from __future__ import annotations

import json
import time

import dagster as dg
import pytest

from backup_assets.cli import main
from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.replica import fetch_from_replica, replica_intact, replicate, storage_for
from backup_assets.core.storage.s3 import S3Storage
from backup_assets.core.verify.checks import find_backup
from backup_assets.defs.build import build_definitions
from backup_assets.demo.seed import seed_miyabi
from backup_assets.defs.keys import backup_key, replica_key

from .conftest import pg_source, s3_replication

P = "2026-11-20"


@pytest.fixture
def big_sqlite(tmp_path):
    """A store whose compressed backup (about 12 MB of random blobs) spans three 5 MB parts."""
    path = tmp_path / "data" / "big.db"
    seed_miyabi(path, runs=3000, checkpoints_per_run=3, payload_bytes=1024)
    return path


def materialize_with_replica(catalog, key: str, partition: str = P, instance=None):
    """Run the tier's job for one asset, its replica and their checks."""
    defs = build_definitions(catalog)
    parts = key.split("/")
    job = defs.resolve_job_def(f"{parts[2]}_backups")
    return job.execute_in_process(partition_key=partition, asset_selection=[backup_key(*parts), replica_key(*parts)],
                                  instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def test_multipart_replica_with_sse_checksum_and_idempotent_rerun(big_sqlite, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"big": {"engine": "sqlite", "path": str(big_sqlite)}},
                            replication=s3_replication(moto_s3, bucket, part_size_mb=5, storage_class="STANDARD_IA"))
    calls = []
    result = materialize_with_replica(catalog, "big/full/daily")
    assert result.success
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evals["replica_intact"].passed and evals["artifact_intact"].passed
    backup = find_backup(catalog, "big", "full", "daily", P)
    assert backup.manifest.size_bytes > 10 * 1024 * 1024
    client = moto_s3.client()
    key = f"backups/sqlite/daily/{backup.artifact_path.name}"
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == backup.manifest.size_bytes
    assert head["Metadata"]["sha256"] == backup.manifest.sha256
    assert head["ServerSideEncryption"] == "AES256"
    assert head.get("StorageClass") == "STANDARD_IA"
    assert "-" in head["ETag"], "a multipart upload has a composite ETag"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == backup.manifest.sha256
    assert client.head_object(Bucket=bucket, Key=key + ".meta")["Metadata"]["sha256"]

    # re-running the partition uploads nothing
    storage = storage_for(catalog, moto_s3.client())
    storage.client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.append(model.name))
    again = replicate(catalog, backup, storage)
    assert again.mode == "already-replicated"
    assert not {"PutObject", "UploadPart", "CreateMultipartUpload", "CopyObject"} & set(calls)


def test_only_good_backups_go_off_site(miyabi_db, write_catalog, moto_s3, bucket):
    from backup_assets.core.verify import records as verification

    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket))
    run_backup(catalog, "miyabi", "full", "daily", P)
    backup = find_backup(catalog, "miyabi", "full", "daily", P)
    storage = storage_for(catalog, moto_s3.client())
    verification.record(backup, "restore_drill", False, "counts differ")
    with pytest.raises(BackupError, match=r"not replicated, its check\(s\) restore_drill failed"):
        replicate(catalog, backup, storage)
    # a backup nobody checked is verified first; a damaged one is refused
    verification.checks_path(backup).unlink()
    data = bytearray(backup.artifact_path.read_bytes())
    data[100] ^= 0xFF
    backup.artifact_path.write_bytes(bytes(data))
    with pytest.raises(BackupError, match=r"artifact_intact failed"):
        replicate(catalog, backup, storage)
    assert "Contents" not in moto_s3.client().list_objects_v2(Bucket=bucket)


def test_replica_check_fails_on_a_tampered_object(miyabi_db, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket))
    assert materialize_with_replica(catalog, "miyabi/full/daily").success
    backup = find_backup(catalog, "miyabi", "full", "daily", P)
    key = f"backups/sqlite/daily/{backup.artifact_path.name}"
    moto_s3.client().put_object(Bucket=bucket, Key=key, Body=b"evil", Metadata={"sha256": backup.manifest.sha256})
    outcome = replica_intact(catalog, backup, storage_for(catalog, moto_s3.client()))
    assert not outcome.passed and "size 4 differs from the manifest's" in outcome.message
    moto_s3.client().delete_object(Bucket=bucket, Key=key)
    outcome = replica_intact(catalog, backup, storage_for(catalog, moto_s3.client()))
    assert not outcome.passed and "replica is missing" in outcome.message


def test_promotions_are_server_side_copies(pg18, myloware_db, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)}, replication=s3_replication(moto_s3, bucket))
    assert materialize_with_replica(catalog, "myloware/core/daily", "2026-11-15").success
    calls = []
    storage = storage_for(catalog, moto_s3.client())
    storage.client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.append(model.name))
    run_backup(catalog, "myloware", "core", "weekly", "2026-11-09")
    weekly = find_backup(catalog, "myloware", "core", "weekly", "2026-11-09")
    result = replicate(catalog, weekly, storage)
    assert result.mode == "copy"
    assert "CopyObject" in calls and "UploadPart" not in calls
    assert [c for c in calls if c == "PutObject"] == ["PutObject"], "only the weekly's own manifest is uploaded"
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"backups/postgres/weekly/{weekly.artifact_path.name}")
    assert head["Metadata"]["sha256"] == weekly.manifest.sha256 and head["ServerSideEncryption"] == "AES256"


def test_server_stopped_mid_upload_leaves_no_replica_and_the_retry_cleans_up(big_sqlite, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"big": {"engine": "sqlite", "path": str(big_sqlite)}},
                            replication=s3_replication(moto_s3, bucket, part_size_mb=5))
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    key = f"sqlite/daily/{backup.artifact_path.name}"  # a repository key: the storage adds the prefix
    parts = []

    def stop_on_second_part(**kwargs):
        parts.append(1)
        if len(parts) == 2:
            moto_s3.stop()

    client = moto_s3.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
    client.meta.events.register("before-call.s3.UploadPart", stop_on_second_part)
    storage = S3Storage(catalog.replication.s3, client)
    try:
        with pytest.raises(BackupError, match=r"uploading .* to s3://.*: S3 endpoint unreachable"):
            storage.put_file(backup.artifact_path, key, sha256=backup.manifest.sha256)
    finally:
        if moto_s3.server is None:
            moto_s3.start()
    s3 = moto_s3.client()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=f"backups/{key}"), "no object may look like a replica"
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the abort could not reach the stopped server"
    result = replicate(catalog, backup, storage_for(catalog, moto_s3.client()))
    assert result.mode == "upload"
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the stale upload was aborted"
    assert replica_intact(catalog, backup, storage_for(catalog, s3)).passed


@pytest.mark.parametrize("case", ["missing bucket", "access denied", "unreachable"])
def test_replica_failures_are_clear(case, miyabi_db, write_catalog, moto_s3, bucket, monkeypatch):
    from backup_assets.demo.cluster import free_port

    repl = s3_replication(moto_s3, bucket)
    if case == "missing bucket":
        repl["s3"]["bucket"] = "no-such-bucket-here"
        expected = "bucket does not exist"
    elif case == "unreachable":
        repl["s3"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
        expected = "S3 endpoint unreachable"
    else:
        expected = "access denied"
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}}, replication=repl)
    run_backup(catalog, "miyabi", "full", "daily", P)
    backup = find_backup(catalog, "miyabi", "full", "daily", P)
    client_kwargs = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    if case == "unreachable":
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=repl["s3"]["endpoint_url"], region_name="us-east-1",
                              aws_access_key_id="k", aws_secret_access_key="s", config=Config(**client_kwargs))
    else:
        client = moto_s3.client(**client_kwargs)
    if case == "access denied":
        from botocore.exceptions import ClientError

        def deny(**kwargs):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")

        client.meta.events.register("before-call.s3.PutObject", deny)
    storage = S3Storage(catalog.replication.s3, client)
    started = time.monotonic()
    with pytest.raises(BackupError, match=expected):
        replicate(catalog, backup, storage)
    assert time.monotonic() - started < 60


def test_restore_from_s3_downloads_verifies_and_restores(miyabi_db, write_catalog, moto_s3, bucket, tmp_path, capsys):
    import shutil
    import sqlite3

    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket))
    assert materialize_with_replica(catalog, "miyabi/full/daily").success
    assert main(["--catalog", catalog.catalog_path, "list", "--json"]) == 0
    assert [r["where"] for r in json.loads(capsys.readouterr().out)] == ["local+s3"]
    # the local repository is lost: list shows the S3 copy, and the restore comes from there
    shutil.rmtree(catalog.repository_root / "sqlite")
    assert main(["--catalog", catalog.catalog_path, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["where"], r["partition"], r["tier"]) for r in rows] == [("s3", P, "daily")]
    with sqlite3.connect(miyabi_db) as conn:
        conn.execute("DELETE FROM execution_runs")
    assert main(["--catalog", catalog.catalog_path, "restore", "--from", "s3", "--source", "miyabi",
                 "--group", "full", "--confirm"]) == 0
    with sqlite3.connect(miyabi_db) as conn:
        assert conn.execute("SELECT count(*) FROM execution_runs").fetchone()[0] == 300
    assert find_backup(catalog, "miyabi", "full", "daily", P).manifest.sha256

    # a replica whose bytes do not match its manifest is refused before anything changes
    backup = find_backup(catalog, "miyabi", "full", "daily", P)
    shutil.rmtree(catalog.repository_root / "sqlite")
    moto_s3.client().put_object(Bucket=bucket, Key=f"backups/sqlite/daily/{backup.artifact_path.name}", Body=b"x" * 10)
    with pytest.raises(BackupError, match="downloaded sha256 .* differs"):
        fetch_from_replica(catalog, source="miyabi", group="full", storage=storage_for(catalog, moto_s3.client()))
    assert not list((catalog.repository_root / "sqlite").rglob("*.zst"))


KILLABLE_REPLICA = r"""
import sys
from backup_assets.catalog import load_catalog
from backup_assets.core.replica import replicate, storage_for
from backup_assets.core.verify.checks import find_backup
catalog = load_catalog(sys.argv[1])
replicate(catalog, find_backup(catalog, "big", "full", "daily", sys.argv[2]), storage_for(catalog))
"""


def test_an_upload_killed_mid_way_never_counts_and_the_next_one_completes(big_sqlite, write_catalog, moto_s3, bucket):
    import os
    import subprocess
    import sys

    from backup_assets.core.failpoints import ENV

    catalog = write_catalog({"big": {"engine": "sqlite", "path": str(big_sqlite)}},
                            replication=s3_replication(moto_s3, bucket, part_size_mb=5))
    run_backup(catalog, "big", "full", "daily", P)
    backup = find_backup(catalog, "big", "full", "daily", P)
    proc = subprocess.run([sys.executable, "-c", KILLABLE_REPLICA, catalog.catalog_path, P],
                          env=dict(os.environ, **{ENV: "s3.part_uploaded"}), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    client = moto_s3.client()
    key = f"backups/sqlite/daily/{backup.artifact_path.name}"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the killed upload left its parts"
    assert "Contents" not in client.list_objects_v2(Bucket=bucket), "nothing partial looks like a replica"
    assert not replica_intact(catalog, backup, storage_for(catalog)).passed
    result = replicate(catalog, backup, storage_for(catalog))
    assert result.mode == "upload"
    assert replica_intact(catalog, backup, storage_for(catalog)).passed
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the stale upload was aborted"
    assert client.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == backup.manifest.sha256


def _overwrite(client, bucket, key, body: bytes, **extra):
    client.put_object(Bucket=bucket, Key=key, Body=body, **extra)


def test_a_replica_is_proven_by_s3_checksums_or_its_bytes_never_by_metadata(miyabi_db, big_sqlite, write_catalog,
                                                                             moto_s3, bucket, capsys):
    import hashlib

    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)},
                             "big": {"engine": "sqlite", "path": str(big_sqlite)}},
                            replication=s3_replication(moto_s3, bucket, part_size_mb=5))
    assert materialize_with_replica(catalog, "miyabi/full/daily").success
    assert materialize_with_replica(catalog, "big/full/daily").success
    client, storage = moto_s3.client(), storage_for(catalog, moto_s3.client())
    small, big = find_backup(catalog, "miyabi", "full", "daily", P), find_backup(catalog, "big", "full", "daily", P)
    skey = f"backups/sqlite/daily/{small.artifact_path.name}"
    bkey = f"backups/sqlite/daily/{big.artifact_path.name}"

    # uploaded with S3's own SHA-256: a single part's equals the manifest's, a multipart one is the composite
    assert client.head_object(Bucket=bucket, Key=skey, ChecksumMode="ENABLED")["ChecksumSHA256"]
    for backup in (small, big):
        outcome = replica_intact(catalog, backup, storage)
        assert outcome.passed and "S3's SHA-256 checksum of the stored bytes equals" in outcome.message, outcome
        assert outcome.metadata["compared"] == "s3-checksum"
    assert "in 3 parts" in replica_intact(catalog, big, storage).message

    # overwritten with other bytes of the same size, the uploader's metadata kept: caught by S3's checksum
    evil = bytearray(small.artifact_path.read_bytes())
    evil[len(evil) // 2] ^= 0x01
    _overwrite(client, bucket, skey, bytes(evil), Metadata={"sha256": small.manifest.sha256},
               ChecksumAlgorithm="SHA256")
    outcome = replica_intact(catalog, small, storage)
    assert not outcome.passed and "S3's SHA-256 checksum of the stored bytes" in outcome.message, outcome
    # ... and without any checksum or metadata: its bytes are downloaded, and they differ
    client.put_object(Bucket=bucket, Key=skey, Body=bytes(evil))
    head = client.head_object(Bucket=bucket, Key=skey, ChecksumMode="ENABLED")
    assert "ChecksumSHA256" not in head and "sha256" not in head["Metadata"]
    outcome = replica_intact(catalog, small, storage)
    assert not outcome.passed and "downloaded, hash to sha256" in outcome.message, outcome
    # the same bytes without checksum nor metadata: intact, and the message says it was the bytes
    client.put_object(Bucket=bucket, Key=skey, Body=small.artifact_path.read_bytes())
    outcome = replica_intact(catalog, small, storage)
    assert outcome.passed and "downloaded and hashed" in outcome.message and "no SHA-256 checksum" in outcome.message
    # replicate() does not take metadata for a replica either: the object above is uploaded again
    _overwrite(client, bucket, skey, bytes(evil), Metadata={"sha256": small.manifest.sha256},
               ChecksumAlgorithm="SHA256")
    assert replicate(catalog, small, storage).mode == "upload"
    assert hashlib.sha256(client.get_object(Bucket=bucket, Key=skey)["Body"].read()).hexdigest() == small.manifest.sha256

    # the audit downloads what is due (all, the first time), then nothing until deep_verify_days pass
    assert main(["--catalog", catalog.catalog_path, "replicas", "verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS ") == 2 and "downloaded and hashed" in out, out
    assert main(["--catalog", catalog.catalog_path, "replicas", "verify"]) == 0
    assert "PASS" not in capsys.readouterr().out
    # a replica deleted behind our back while its retention keeps it, and a damaged one: the audit names both
    client.delete_object(Bucket=bucket, Key=bkey)
    client.put_object(Bucket=bucket, Key=skey, Body=bytes(evil), Metadata={"sha256": small.manifest.sha256})
    assert main(["--catalog", catalog.catalog_path, "replicas", "verify", "--all"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL s3 {bkey.removeprefix('backups/')}: s3://{bucket}/{bkey}: replica is missing" in out, out
    assert f"FAIL s3 {skey.removeprefix('backups/')}" in out and "downloaded, hash to sha256" in out, out


def test_the_maintenance_job_audits_replicas_and_names_the_bad_one(miyabi_db, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket, deep_verify_per_run=1))
    assert materialize_with_replica(catalog, "miyabi/full/daily").success
    assert materialize_with_replica(catalog, "miyabi/full/daily", "2026-11-21").success
    defs = build_definitions(catalog)
    audit = dg.AssetKey(["operations", "replica_audit"])
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("maintenance")
        first = job.execute_in_process(instance=instance, asset_selection=[audit])
        assert first.success
        [mat] = first.asset_materializations_for_node("operations__replica_audit")
        assert mat.metadata["replicas_proven"].value == 1  # one a run: the sample rotates
        backup = find_backup(catalog, "miyabi", "full", "daily", "2026-11-21")
        key = f"backups/sqlite/daily/{backup.artifact_path.name}"
        moto_s3.client().put_object(Bucket=bucket, Key=key, Body=b"x" * backup.manifest.size_bytes,
                                    Metadata={"sha256": backup.manifest.sha256})
        second = job.execute_in_process(instance=instance, asset_selection=[audit], raise_on_error=False)
        assert not second.success
        [failure] = [e for e in second.all_events if e.is_step_failure]
        from backup_assets.defs.checks import failed_assets

        named = failed_assets(failure.event_specific_data.user_failure_data.metadata)
        assert list(named) == ["miyabi/full_daily_s3"] and "[2026-11-21]" in named["miyabi/full_daily_s3"], named
