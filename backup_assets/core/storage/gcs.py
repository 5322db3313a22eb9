"""Google Cloud Storage: an off-site copy of the repository under the same relative keys (`google-cloud-storage`,
imported only by the processes that use it).

An artifact goes up as one resumable upload in chunks of `part_size_mb` (bounded memory): GCS creates the
object only when the last chunk arrives, so an upload cut off anywhere leaves nothing that looks like a replica,
and the bytes are hashed as they are read: the last chunk is never sent when their SHA-256 is not the manifest's.
GCS computes the stored object's MD5 (and CRC32C) itself; the client compares it with its own on arrival, and
`replica_intact` compares it with the local artifact's. The manifest's SHA-256 also travels as metadata
(`sha256`), which whoever can write the object can set at will: it never proves a replica alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Iterator

from backup_assets.catalog import GCSReplication
from backup_assets.core import BackupError, failpoints
from backup_assets.core.storage import ObjectInfo, Prefixed, Watched

MIB = 1024 * 1024
TIMEOUT = (5, 60)  # connect, read (seconds)


def make_client(cfg: GCSReplication):
    from google.cloud import storage

    options = {"api_endpoint": cfg.endpoint_url} if cfg.endpoint_url else None
    if cfg.anonymous:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=cfg.project or "anonymous", credentials=AnonymousCredentials(),
                              client_options=options)
    path = cfg.credentials_file()
    if path is not None:
        from google.oauth2 import service_account

        try:
            credentials = service_account.Credentials.from_service_account_file(path)
        except (OSError, ValueError) as exc:
            raise BackupError(f"{cfg.credentials_file_env}: the service-account key file cannot be read "
                              f"({type(exc).__name__})") from None
        return storage.Client(project=cfg.project or credentials.project_id, credentials=credentials,
                              client_options=options)
    return storage.Client(project=cfg.project, client_options=options)  # Application Default Credentials


def _retry(cfg: GCSReplication):
    """GCS's retry of transient failures (connection errors, 429, 5xx), for the catalog's `retry_s` at most."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(cfg.retry_s)


def _errors() -> tuple:
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from google.resumable_media import common

    return (api.GoogleAPIError, auth.GoogleAuthError, requests.RequestException, common.InvalidResponse,
            common.DataCorruption, ConnectionError)


def _explain(exc: Exception, what: str) -> BackupError:
    from google.api_core import exceptions as api

    if isinstance(exc, api.NotFound):
        return BackupError(f"{what}: the bucket or object does not exist")
    if isinstance(exc, (api.Forbidden, api.Unauthorized)):
        return BackupError(f"{what}: access denied ({exc.code})")
    if isinstance(exc, api.GoogleAPICallError):
        return BackupError(f"{what}: {exc.message} ({exc.code})")
    name = type(exc).__name__
    if "Connection" in name or "RetryError" in name or "Timeout" in name:
        return BackupError(f"{what}: GCS endpoint unreachable ({name})")
    if "DataCorruption" in name:
        return BackupError(f"{what}: the stored object's checksum differs from the bytes sent or received")
    return BackupError(f"{what}: {name}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


class _Checked:
    """A file read for an upload, hashed as it goes; the read that would hand over the last bytes raises instead
    when the whole file's SHA-256 is not `sha256` (the object is then never completed)."""

    def __init__(self, fh, size: int, sha256: str, path: Path):
        self.fh, self.size, self.sha256, self.path = fh, size, sha256, path
        self.digest, self.done = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.digest.update(data)
        self.done += len(data)
        if data:
            failpoints.point("gcs.chunk_read")
        if self.done >= self.size and data:
            if self.digest.hexdigest() != self.sha256:
                raise BackupError(f"{self.path}: sha256 {self.digest.hexdigest()} differs from the manifest's "
                                  f"{self.sha256}; not uploaded")
        return data

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, *args):
        """A rewind (a retried chunk): the digest is taken again up to the new position."""
        position = self.fh.seek(*args)
        if position != self.done:
            self.fh.seek(0)
            self.digest, self.done = hashlib.sha256(), 0
            while self.done < position:
                data = self.fh.read(min(MIB, position - self.done))
                if not data:
                    break
                self.digest.update(data)
                self.done += len(data)
        return position


class GCSStorage(Prefixed):
    where = "gcs"

    def __init__(self, cfg: GCSReplication, client=None):
        self.cfg = cfg
        self.client = client or make_client(cfg)
        self.bucket = self.client.bucket(cfg.bucket)
        self.lock_for = None
        self.replaced: set[str] = set()

    def uri(self, key: str) -> str:
        return f"gs://{self.cfg.bucket}/{self._full(key)}"

    # -- reads -----------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        try:
            blob = self.bucket.get_blob(self._full(key), timeout=TIMEOUT, retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"reading {self.uri(key)}") from None
        if blob is None:
            return None
        meta = dict(blob.metadata or {})
        # a composed object's MD5 is not kept by GCS (only its CRC32C): nothing to compare then
        return ObjectInfo(key, blob.size, meta.get("sha256"), meta, None, blob.storage_class,
                          modified=blob.updated, md5=blob.md5_hash if not blob.component_count else None,
                          version_id=str(blob.generation))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        try:
            for blob in self.client.list_blobs(self.cfg.bucket, prefix=self._full(prefix), timeout=TIMEOUT,
                                               retry=_retry(self.cfg)):
                yield self._rel(blob.name), blob.size
        except _errors() as exc:
            raise _explain(exc, f"listing {self.uri(prefix)}") from None

    def open(self, key: str) -> BinaryIO:
        try:
            return self.bucket.blob(self._full(key)).open("rb", chunk_size=8 * MIB, timeout=TIMEOUT, retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_file(self, key: str, dest: Path) -> None:
        """Downloaded with its MD5 checked against GCS's."""
        try:
            with open(dest, "wb") as out:
                self.bucket.blob(self._full(key)).download_to_file(Watched(out, "gcs.download_write"),
                                                                   checksum="md5", timeout=TIMEOUT, retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.bucket.blob(self._full(key)).download_as_bytes(checksum="md5", timeout=TIMEOUT,
                                                                       retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    # -- writes ----------------------------------------------------------------------------
    def _blob(self, key: str, meta: dict[str, str], *, chunked: bool = False):
        blob = self.bucket.blob(self._full(key), chunk_size=self.cfg.part_size_mb * MIB if chunked else None)
        blob.metadata = meta
        if self.cfg.storage_class:
            blob.storage_class = self.cfg.storage_class
        return blob

    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None) -> ObjectInfo:
        size = path.stat().st_size
        meta = {"sha256": sha256, **(metadata or {})}
        try:
            with open(path, "rb") as fh:
                blob = self._blob(key, meta, chunked=size > self.cfg.part_size_mb * MIB)
                # GCS's MD5 of what it stored is compared with the client's on completion (a mismatch deletes it)
                # (retried: a resumable upload resumes from what GCS has; a one-request upload is sent again)
                blob.upload_from_file(_Checked(fh, size, sha256, path), size=size, checksum="md5", timeout=TIMEOUT,
                                      retry=_retry(self.cfg))
        except BackupError:
            raise
        except _errors() as exc:
            raise _explain(exc, f"uploading {path.name} to {self.uri(key)}") from None
        return self.verify(key, size=size, sha256=sha256)

    def put_bytes(self, data: bytes, key: str) -> None:
        try:
            self._blob(key, {"sha256": hashlib.sha256(data).hexdigest()}).upload_from_string(
                data, checksum="md5", timeout=TIMEOUT, retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"uploading {self.uri(key)}") from None

    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str,
             metadata: dict[str, str] | None = None) -> ObjectInfo:
        """A server-side rewrite (promotions: daily → weekly/monthly), no second upload."""
        try:
            source = self.bucket.blob(self._full(src_key))
            dest = self._blob(dst_key, {"sha256": sha256, **(metadata or {})})
            token, _, _ = dest.rewrite(source, timeout=TIMEOUT, retry=_retry(self.cfg))
            while token is not None:
                token, _, _ = dest.rewrite(source, token=token, timeout=TIMEOUT, retry=_retry(self.cfg))
        except _errors() as exc:
            raise _explain(exc, f"copying {self.uri(src_key)} to {dst_key}") from None
        return self.verify(dst_key, size=size, sha256=sha256)

    def delete(self, keys: list[str]) -> list:
        from google.api_core.exceptions import NotFound

        for key in keys:
            try:
                self.bucket.delete_blob(self._full(key), timeout=TIMEOUT, retry=_retry(self.cfg))
            except NotFound:
                continue
            except _errors() as exc:
                raise _explain(exc, f"deleting {self.uri(key)}") from None
        return []

    def proof(self, key: str, info: ObjectInfo, sha256: str, local: Path | None) -> tuple[bool | None, str]:
        return self.md5_proof(info, sha256, local, "GCS")
