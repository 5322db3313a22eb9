"""Immutable replicas: with `replication.s3.object_lock` every replicated backup and manifest is written under S3
Object Lock until its tier's retention ends (plus a margin), so the backup host's own credentials cannot delete
or replace it; retention leaves a locked backup where it is and says until when; a bucket without Object Lock
is refused in one line. Through moto's server over HTTP (which honours retention on single uploads and refuses
a versioned delete of a locked version)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

import pytest
from botocore.exceptions import ClientError

from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.retention.prune import prune
from backup_assets.core.replica import replica_intact, replicate, storage_for
from backup_assets.core.storage.s3 import S3Storage
from backup_assets.core.verify.checks import find_backup

from .conftest import s3_replication

DAYS = 7  # the daily tier's retention, and so its S3 retention here


@pytest.fixture
def locked_bucket(moto_s3, request):
    name = "lock-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    moto_s3.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def _catalog(write_catalog, miyabi_db, moto_s3, bucket, **lock):
    return write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                         replication=s3_replication(moto_s3, bucket, object_lock={"mode": "governance", **lock}))


def test_a_bucket_without_object_lock_is_refused_in_one_line(miyabi_db, write_catalog, moto_s3, bucket):
    catalog = _catalog(write_catalog, miyabi_db, moto_s3, bucket)
    run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    backup = find_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    with pytest.raises(BackupError, match=r"object_lock is set but the bucket has no Object Lock") as err:
        replicate(catalog, backup, storage_for(catalog, moto_s3.client()))
    assert "\n" not in str(err.value)
    assert "Contents" not in moto_s3.client().list_objects_v2(Bucket=bucket)  # nothing went up unlocked


def test_replicas_are_locked_until_retention_ends_and_the_host_cannot_remove_them(miyabi_db, write_catalog, moto_s3,
                                                                                  locked_bucket):
    catalog = _catalog(write_catalog, miyabi_db, moto_s3, locked_bucket)
    client = moto_s3.client()
    storage = storage_for(catalog, client)
    backups = []
    for partition in ("2026-11-19", "2026-11-20"):
        run_backup(catalog, "miyabi", "full", "daily", partition)
        backups.append(find_backup(catalog, "miyabi", "full", "daily", partition))
        replicate(catalog, backups[-1], storage)
    old = backups[0]
    key = f"backups/sqlite/daily/{old.artifact_path.name}"
    head = client.head_object(Bucket=locked_bucket, Key=key)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    until = head["ObjectLockRetainUntilDate"]
    now = dt.datetime.now(dt.timezone.utc)  # the lock counts from the artifact's time stamp: a moment ago
    assert now + dt.timedelta(days=DAYS + 1) - dt.timedelta(minutes=5) < until <= now + dt.timedelta(days=DAYS + 1)
    assert client.head_object(Bucket=locked_bucket, Key=key + ".meta")["ObjectLockMode"] == "GOVERNANCE"

    # the proof says so, and a replica that is not locked as asked fails it
    outcome = replica_intact(catalog, old, storage)
    assert outcome.passed and "locked (GOVERNANCE) until" in outcome.message, outcome.message

    # the host's own credentials: a versioned delete is refused, a batch delete too
    version = head["VersionId"]
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(Bucket=locked_bucket, Key=key, VersionId=version)
    refused = client.delete_objects(Bucket=locked_bucket, Delete={"Objects": [{"Key": key, "VersionId": version}]})
    assert refused["Errors"][0]["Code"] == "AccessDenied"
    # an overwrite only adds a version: the locked one stays readable, and the proof sees the replaced bytes
    client.put_object(Bucket=locked_bucket, Key=key, Body=b"ransom", ChecksumAlgorithm="SHA256")
    assert client.get_object(Bucket=locked_bucket, Key=key, VersionId=version)["Body"].read() == \
        old.artifact_path.read_bytes()
    assert not replica_intact(catalog, old, storage).passed
    client.delete_object(Bucket=locked_bucket, Key=key, VersionId=client.head_object(Bucket=locked_bucket,
                                                                                       Key=key)["VersionId"])
    assert replica_intact(catalog, old, storage).passed  # the attacker's unlocked version went; the locked one is back

    # retention past the tier's days but inside the lock: the replica stays, and the report says until when
    report = prune(catalog, dry_run=False, storage=storage, now=now + dt.timedelta(days=DAYS, hours=12))
    assert old.artifact_path.name in report["s3"]["locked_until"], report
    assert old.artifact_path.name not in report["s3"]["deleted"]
    assert client.head_object(Bucket=locked_bucket, Key=key)["ContentLength"] == old.manifest.size_bytes


def test_a_lock_that_has_expired_lets_the_object_go_for_good(moto_s3, locked_bucket, tmp_path, write_catalog,
                                                              miyabi_db):
    catalog = _catalog(write_catalog, miyabi_db, moto_s3, locked_bucket)
    client = moto_s3.client()
    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
    storage = S3Storage(catalog.replication.s3, client, lock_for=lambda key: until)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # three parts of 5 MiB: locked once complete
    storage.put_file(big, "x/big.bin", sha256=hashlib.sha256(big.read_bytes()).hexdigest())
    storage.put_bytes(b"small", "x/small")
    for key in ("x/big.bin", "x/small"):
        assert storage.head(key).lock_mode == "GOVERNANCE"
    assert storage.delete(["x/big.bin", "x/small"]) and storage.head("x/small") is not None  # locked: both stay
    # an overwrite and a delete marker over them: when the locks end, those go too
    client.put_object(Bucket=locked_bucket, Key="backups/x/small", Body=b"ransom")
    client.delete_object(Bucket=locked_bucket, Key="backups/x/big.bin")
    assert storage.delete(["x/big.bin", "x/small"])
    time.sleep(max(0.0, (until - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1)
    assert storage.delete(["x/big.bin", "x/small"]) == []
    versions = client.list_object_versions(Bucket=locked_bucket, Prefix="backups/x/")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers"), versions  # gone, not hidden


def test_a_restore_from_the_replica_reads_the_locked_original_behind_an_overwrite_and_a_delete(
        miyabi_db, write_catalog, moto_s3, locked_bucket, tmp_path, capsys):
    """Whoever holds the backup host's credentials overwrites one backup (artifact and manifest) and deletes the
    other: the bucket keeps the locked versions, and with the host's disk gone a restore from S3 gives back exactly
    what was replicated, and says the newest versions were not it."""
    import shutil
    import sqlite3

    from backup_assets.cli import main

    catalog = _catalog(write_catalog, miyabi_db, moto_s3, locked_bucket)
    client = moto_s3.client()
    storage = storage_for(catalog, client)
    originals = {}
    for partition in ("2026-11-19", "2026-11-20"):
        run_backup(catalog, "miyabi", "full", "daily", partition)
        backup = find_backup(catalog, "miyabi", "full", "daily", partition)
        replicate(catalog, backup, storage)
        originals[partition] = f"backups/sqlite/daily/{backup.artifact_path.name}"
    expected = "\n".join(sqlite3.connect(miyabi_db).iterdump())
    overwritten, deleted = originals["2026-11-20"], originals["2026-11-19"]
    for key in (overwritten, overwritten + ".meta"):
        client.put_object(Bucket=locked_bucket, Key=key, Body=b"ransom", ChecksumAlgorithm="SHA256")
    for key in (deleted, deleted + ".meta"):
        client.delete_object(Bucket=locked_bucket, Key=key)  # a delete marker: the locked version stays
    assert "Contents" not in client.list_objects_v2(Bucket=locked_bucket, Prefix=deleted)
    # `list` shows both copies of each, the replica's state included
    import json

    assert main(["--catalog", catalog.catalog_path, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["copies"] for r in rows] == [
        {"local": "present", "s3": "replaced after replication (the locked original restores)"}] * 2, rows
    assert all(r["where"] == "local+s3!" for r in rows), rows
    shutil.rmtree(catalog.repository_root)  # the backup host's disk is gone
    for partition, key in (("2026-11-20", overwritten), ("2026-11-19", deleted)):
        target = tmp_path / f"restored-{partition}.db"
        code = main(["--catalog", catalog.catalog_path, "restore", "--source", "miyabi", "--group", "full", "--tier",
                     "daily", "--partition", partition, "--from", "s3", "--target-file", str(target), "--confirm"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"s3://{locked_bucket}/{key}" in err and "overwritten or deleted after replication" in err, err
        assert "\n".join(sqlite3.connect(target).iterdump()) == expected


def test_scheduled_backups_replicate_under_the_lock_through_dagster_aws(miyabi_db, write_catalog, moto_s3,
                                                                       locked_bucket, tmp_path, monkeypatch, capsys):
    """The Dagster run (here `backup-assets backup`, as the schedule's run) replicates through dagster-aws's S3
    client and writes every object locked; `replica_intact` in the run checks the lock. (The runs wrote unlocked
    objects: their storage was made without the catalog's lock policy.) Loading the definitions imports no
    dagster-aws."""
    import subprocess
    import sys

    from backup_assets.cli import main

    catalog = _catalog(write_catalog, miyabi_db, moto_s3, locked_bucket)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    assert main(["--catalog", catalog.catalog_path, "backup", "--partition", "2026-11-20", "--timings"]) == 0
    timings = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("timings: "))
    assert "miyabi/full_daily dumped" in timings and "miyabi/full_daily_s3 replicated" in timings, timings
    client = moto_s3.client()
    backup = find_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    key = f"backups/sqlite/daily/{backup.artifact_path.name}"
    for name in (key, key + ".meta"):
        assert client.head_object(Bucket=locked_bucket, Key=name)["ObjectLockMode"] == "GOVERNANCE", name
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from backup_assets.catalog import load_catalog; "
         "from backup_assets.defs.build import build_definitions; from backup_assets.defs.replication import s3_resource; "
         f"c = load_catalog({catalog.catalog_path!r}); build_definitions(c); assert 'dagster_aws' not in sys.modules; "
         "client = s3_resource(c).client(c.replication.s3); assert 'dagster_aws.s3' in sys.modules; "
         "print(client.meta.config.retries, client.meta.endpoint_url)"],
        capture_output=True, text=True, env={**os.environ})
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "'total_max_attempts': 6" in loaded.stdout and moto_s3.endpoint in loaded.stdout, loaded.stdout


def test_the_doctor_keeps_a_locked_orphan_and_says_until_when(miyabi_db, write_catalog, moto_s3, locked_bucket,
                                                              monkeypatch):
    """An artifact without its manifest in a locked bucket (an upload killed between its two objects) cannot go
    before its lock ends: the doctor says so instead of saying it removed it."""
    from backup_assets.core import doctor as doctor_module

    catalog = _catalog(write_catalog, miyabi_db, moto_s3, locked_bucket)
    storage = storage_for(catalog, moto_s3.client())
    run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    backup = find_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    orphan = f"sqlite/daily/{backup.artifact_path.name.replace('-2026-11-20-', '-2026-11-19-')}"
    storage.put_file(backup.artifact_path, orphan, sha256=backup.manifest.sha256)
    monkeypatch.setattr(doctor_module, "ORPHAN_AGE_S", 0)
    said = doctor_module.doctor(catalog)
    line = next(s for s in said if orphan in s)
    assert line.startswith("kept ") and "locked until" in line, said
    assert storage.head(orphan) is not None
