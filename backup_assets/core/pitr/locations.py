"""Where the physical tier's files are kept: the keys of base backups and archived WAL (`base/<source>/…`,
`wal/<source>/…`, the same on disk and on every replica), and one WAL file pushed to or fetched from a
replica. Below pitr.py, wal.py and pitr_s3.py, which all use it."""

from __future__ import annotations

import json
from pathlib import Path

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.storage.local import LocalStorage


def replica_storage(catalog: Catalog, client=None, *, replica: str | None = None):
    """A replica's storage (`replica`; None: the first the catalog has, S3 before GCS before Azure), else None."""
    replicas = list(catalog.replication.replicas())
    if not replicas or (replica is not None and replica not in replicas):
        return None
    from backup_assets.core.replica import storage_for

    return storage_for(catalog, client, replica=replica or replicas[0])


def replica_storages(catalog: Catalog) -> list:
    """Every replica's storage, in the catalog's order (s3, gcs, azure)."""
    from backup_assets.core.replica import storage_for

    return [storage_for(catalog, replica=name) for name in catalog.replication.replicas()]


def base_prefix(source: str) -> str:
    return f"base/{source}/"


def wal_prefix(source: str) -> str:
    return f"wal/{source}/"


def fetch_wal(catalog: Catalog, source: str, name: str, storage, scratch: Path) -> tuple[Path, dict] | None:
    """An archived WAL file from the replica: (its stored file downloaded into `scratch`, its JSON), or None."""
    from backup_assets.core.artifact import sha256_file

    key = f"{wal_prefix(source)}{name}.json"
    if storage.head(key) is None:  # not there (an unreachable replica raises instead: not a missing segment)
        return None
    meta = json.loads(storage.get_bytes(key))
    path = scratch / meta["stored"]
    storage.get_file(wal_prefix(source) + meta["stored"], path)
    if path.stat().st_size != meta["stored_size"] or sha256_file(path) != meta["sha256"]:
        raise BackupError(f"{name}: the replica's copy does not match its checksum; not restored")
    return path, meta


def push_wal(catalog: Catalog, source: str, folder: Path, name: str, meta: dict, storage) -> None:
    """wal-push's second copy (pitr.wal_push_s3): the segment and its JSON on the replica before PostgreSQL is
    told it is archived; the same name with other content is refused there too."""
    key = f"{wal_prefix(source)}{name}.json"
    if storage.head(key) is not None:
        there = json.loads(storage.get_bytes(key))
        if there.get("raw_sha256") != meta["raw_sha256"]:
            raise BackupError(f"{name} is on the replica already with different content: refusing to overwrite it")
        if storage.head(wal_prefix(source) + there["stored"]) is not None:
            return
    storage.put_file(folder / meta["stored"], wal_prefix(source) + meta["stored"], sha256=meta["sha256"])
    storage.put_bytes((folder / f"{name}.json").read_bytes(), key)


def local_storage(catalog: Catalog) -> LocalStorage:
    return LocalStorage(catalog.repository_root)
