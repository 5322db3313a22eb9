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
    # GCS, Azure: the service's MD5 of the stored bytes (base64) when the service computed or checked it on upload
    md5: str | None = None


class Storage(Protocol):
    where: str  # "local", "s3", "gcs", "azure": what `list` shows

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


class Prefixed:
    """Repository keys under a replica's prefix (`cfg.prefix`), and what every replica checks after a write."""

    cfg = None
    where = ""

    def _full(self, key: str) -> str:
        prefix = self.cfg.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    def _rel(self, full: str) -> str:
        prefix = self.cfg.prefix.strip("/")
        return full[len(prefix) + 1:] if prefix and full.startswith(prefix + "/") else full

    def local_path(self, key: str) -> None:
        return None

    def verify(self, key: str, *, size: int, sha256: str) -> ObjectInfo:
        from backup_assets.core import BackupError

        info = self.head(key)
        if info is None:
            raise BackupError(f"{self.uri(key)}: object is missing after upload")
        if info.size != size:
            raise BackupError(f"{self.uri(key)}: size {info.size} differs from the manifest's {size}")
        if info.sha256 != sha256:
            raise BackupError(f"{self.uri(key)}: sha256 {info.sha256} differs from the manifest's {sha256}")
        return info

    def md5_proof(self, info: ObjectInfo, sha256: str, local: Path | None, service: str) -> tuple[bool | None, str]:
        """The storage's own MD5 of the stored bytes (`info.md5`, base64: computed or checked by the service on
        upload) against the local artifact's, read once for both its SHA-256 (which must be the manifest's) and
        its MD5: (True, what was compared), (False, the difference), (None, why it cannot be compared)."""
        import base64

        if info.md5 is None:
            return None, f"the object has no MD5 that {service} computed or checked"
        if local is None or not local.exists():
            return None, "the local artifact is gone, so there is no MD5 to compare the stored one with"
        digest, md5 = local_digests(local)
        if digest != sha256:
            return None, f"the local artifact's sha256 {digest} is not the manifest's"
        expected = base64.b64encode(md5).decode()
        if info.md5 != expected:
            return False, (f"{service}'s MD5 of the stored bytes {info.md5} differs from the local artifact's "
                           f"({expected}, sha256 as in the manifest)")
        return True, f"{service}'s MD5 of the stored bytes equals the local artifact's (sha256 as in the manifest)"


def same_digest(path: Path, actual: str, expected: str) -> None:
    """An upload's bytes hashed as they were read: refused before the object exists unless they are the manifest's."""
    from backup_assets.core import BackupError

    if actual != expected:
        raise BackupError(f"{path}: sha256 {actual} differs from the manifest's {expected}; not uploaded")


def download_sha256(storage: Storage, key: str) -> str:
    """The SHA-256 of an object's bytes, downloaded (streamed, never held whole)."""
    import hashlib

    digest = hashlib.sha256()
    body = storage.open(key)
    try:
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
    return digest.hexdigest()


def proven_copy(storage: Storage, key: str, local: Path, size: int, sha256: str) -> str | None:
    """None when the object under `key` is the bytes of `local` (its size, then the storage's own checksum of the
    stored bytes against them: `proof`, or, where there is none to compare, the object downloaded and hashed);
    else what differs, in words. Object metadata alone never proves a copy."""
    info = storage.head(key)
    if info is None:
        return "is missing"
    if info.size != size:
        return f"has size {info.size}, not {size}"
    proven, compared = storage.proof(key, info, sha256, local)
    if proven:
        return None
    if proven is False:
        return compared
    digest = download_sha256(storage, key)
    return None if digest == sha256 else f"downloaded, hashes to sha256 {digest}, not {sha256} ({compared})"


def local_digests(path: Path) -> tuple[str, bytes]:
    """(SHA-256 hex, MD5 digest) of a file, one read."""
    import hashlib

    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.digest()


class Watched:
    """A file being written by a download, with a fault-injection point at each write (core/failpoints.py)."""

    def __init__(self, out, point: str):
        self.out, self.point = out, point

    def write(self, data) -> int:
        from backup_assets.core import failpoints

        failpoints.point(self.point)
        return self.out.write(data)

    def __getattr__(self, name):
        return getattr(self.out, name)
