"""The storage interface: the local filesystem and S3 behave the same for what walks backups."""

from __future__ import annotations

import hashlib

import pytest

from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.replica import copy_backup, fetch_from_replica, replica_repository, replicate
from backup_assets.core.repository import LocalRepository
from backup_assets.core.storage.local import LocalStorage
from backup_assets.core.verify.checks import find_backup

from .conftest import azure_replication, gcs_replication, s3_replication

P = "2026-11-20"


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def storage(request, tmp_path, write_catalog):
    if request.param == "local":
        return LocalStorage(tmp_path / "repo")
    if request.param == "s3":
        moto_s3 = request.getfixturevalue("moto_s3")
        replication = s3_replication(moto_s3, request.getfixturevalue("bucket"))
    elif request.param == "gcs":
        replication = gcs_replication(request.getfixturevalue("fake_gcs"), request.getfixturevalue("gcs_bucket"),
                                      part_size_mb=1)
    else:
        replication = azure_replication(request.getfixturevalue("azurite"),
                                        request.getfixturevalue("azure_container"), block_size_mb=1)
    catalog = write_catalog({"app": {"engine": "sqlite", "path": str(tmp_path / "app.db")}}, replication=replication)
    return replica_repository(catalog, replica=request.param).storage


def test_both_storages_put_list_read_copy_and_delete_alike(storage, tmp_path):
    src = tmp_path / "artifact"
    data = b"backup bytes " * 1000
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    info = storage.put_file(src, "sqlite/daily/a.db.zst", sha256=digest)
    assert info.size == len(data)
    storage.put_bytes(b"{}", "sqlite/daily/a.db.zst.meta")
    storage.copy("sqlite/daily/a.db.zst", "sqlite/weekly/a.db.zst", size=len(data), sha256=digest)
    assert [k for k, _ in storage.list("sqlite/")] == ["sqlite/daily/a.db.zst", "sqlite/daily/a.db.zst.meta",
                                                      "sqlite/weekly/a.db.zst"]
    with storage.open("sqlite/weekly/a.db.zst") as fh:
        assert fh.read() == data
    assert storage.get_bytes("sqlite/daily/a.db.zst.meta") == b"{}"
    storage.delete(["sqlite/daily/a.db.zst", "sqlite/daily/a.db.zst.meta"])
    assert storage.head("sqlite/daily/a.db.zst") is None
    assert [k for k, _ in storage.list("")] == ["sqlite/weekly/a.db.zst"]


def test_a_file_that_does_not_match_its_hash_is_not_stored(storage, tmp_path):
    src = tmp_path / "artifact"
    src.write_bytes(b"x" * 100)
    with pytest.raises(BackupError, match="sha256"):
        storage.put_file(src, "sqlite/daily/b.db.zst", sha256="0" * 64)
    assert storage.head("sqlite/daily/b.db.zst") is None
    assert list(storage.list("")) == []


def test_local_keys_stay_inside_the_repository(tmp_path):
    storage = LocalStorage(tmp_path / "repo")
    for key in ("../outside", "/etc/passwd", "sqlite/../../x"):
        with pytest.raises(BackupError, match="not a key inside"):
            storage.head(key)


def test_a_damaged_replica_is_refused_on_download_and_nothing_counts_locally(miyabi_db, write_catalog, moto_s3, bucket):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket))
    run_backup(catalog, "miyabi", "full", "daily", P)
    backup = find_backup(catalog, "miyabi", "full", "daily", P)
    remote = replica_repository(catalog, moto_s3.client())
    replicate(catalog, backup, remote)
    local = LocalRepository(catalog.repository_root)
    key = local.key_of(backup.artifact_path)
    for path in local.root.rglob("*"):  # the local disk is lost
        if path.is_file():
            path.unlink()
    damaged = bytearray(remote.storage.get_bytes(key))
    damaged[len(damaged) // 2] ^= 0xFF
    moto_s3.client().put_object(Bucket=bucket, Key=f"backups/{key}", Body=bytes(damaged))
    with pytest.raises(BackupError, match="downloaded sha256 .* differs"):
        fetch_from_replica(catalog, source="miyabi", group="full", storage=remote.storage)
    assert local.refs(complete=False) == [] and not [p for p in local.root.rglob("*") if p.is_file()]


def test_copy_backup_between_two_local_repositories(miyabi_db, write_catalog, tmp_path):
    """A second local repository (a mounted disk, NFS) is a replica like S3."""
    from backup_assets.core.repository import Repository

    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    run_backup(catalog, "miyabi", "full", "daily", P)
    local = LocalRepository(catalog.repository_root)
    [ref] = local.refs()
    other = Repository(LocalStorage(tmp_path / "second"), name="disk2", replica=True)
    assert copy_backup(local.manifest(ref), ref.key, local, other) == "upload"
    assert copy_backup(local.manifest(ref), ref.key, local, other) == "already-replicated"
    [copied] = other.refs()
    assert copied.key == ref.key and other.verified(copied) and other.manifest(copied) == local.manifest(ref)
