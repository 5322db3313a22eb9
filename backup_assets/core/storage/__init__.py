"""Where backups are kept: one small interface, one implementation per kind of storage.

Every method speaks *repository keys*: paths relative to the repository's root
(`postgres/daily/<artifact>`), the same in every storage. A repository (`..repository`) is the
layout and the manifests on top of one storage; the local repository and the S3 replica are two
repositories of the same kind, and everything that walks backups (list, retention, rekey,
replication, restore from S3) goes through this interface.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol


@dataclass
class ObjectInfo:
    key: str
    size: int
    sha256: str | None  # known without reading the object (S3 metadata), else None
    metadata: dict[str, str] = field(default_factory=dict)
    server_side_encryption: str | None = None
    storage_class: str | None = None
    # the storage's own SHA-256 of the stored bytes (S3: computed and checked by S3 on upload, base64; a
    # multipart object's is the composite: the SHA-256 of its parts' SHA-256s) and its parts; None: none
    checksum_sha256: str | None = None
    parts: int = 1
    modified: "dt.datetime | None" = None  # when it was stored (UTC)
    # S3 Object Lock: the retention mode (GOVERNANCE, COMPLIANCE) and until when the stored version cannot be
    # deleted or overwritten; the version the key names now
    lock_mode: str | None = None
    lock_until: "dt.datetime | None" = None
    version_id: str | None = None


class Storage(Protocol):
    where: str  # "local", "s3": what `list` shows

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def open(self, key: str) -> BinaryIO: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None) -> ObjectInfo: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str,
             metadata: dict[str, str] | None = None) -> ObjectInfo: ...
    def delete(self, keys: list[str]) -> list[tuple[str, "dt.datetime"]]: ...  # what is locked: left, and until when
    def uri(self, key: str) -> str: ...
    def local_path(self, key: str) -> Path | None: ...
