"""Azure Blob Storage: an off-site copy of the repository under the same relative keys (`azure-storage-blob`,
imported only by the processes that use it).

An artifact up to `block_size_mb` goes up in one request whose MD5 the service checks and keeps as the blob's
Content-MD5. A larger one is staged in blocks, each checked by its MD5 on arrival, and committed as a list only
once the whole file's SHA-256 is the manifest's: staged blocks are never a blob, so an upload cut off anywhere
leaves nothing that looks like a replica. A blob committed from blocks carries the MD5 its writer declared, which
Azure does not check: `replica_intact` trusts the Content-MD5 only of a blob put whole (no committed blocks) and
downloads and hashes the others, as it does whenever the local artifact is gone. The manifest's SHA-256 travels as
metadata (`sha256`) and never proves a replica alone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from backup_assets.catalog import AzureReplication
from backup_assets.core import BackupError, failpoints
from backup_assets.core.storage import ObjectInfo, Prefixed, Watched, same_digest as _same

MIB = 1024 * 1024
def make_client(cfg: AzureReplication):
    from azure.storage.blob import BlobServiceClient, LinearRetry

    from backup_assets.catalog.settings import _from_env

    # a failing request is retried three times over the catalog's retry_s (the SDK's default waits 15 s, then
    # 18 s, then 42 s)
    # downloads come in 4 MiB ranges (the SDK's default first request takes 32 MiB in one response)
    args = {"connection_timeout": 5, "read_timeout": 60, "max_single_get_size": 4 * MIB, "max_chunk_get_size": 4 * MIB,
                   "retry_policy": LinearRetry(backoff=cfg.retry_s / 3, random_jitter_range=0, retry_total=3)}

    if cfg.connection_string_env:
        try:
            return BlobServiceClient.from_connection_string(_from_env(cfg.connection_string_env,
                                                                      "connection_string_env"), **args)
        except ValueError:
            raise BackupError(f"{cfg.connection_string_env}: not an Azure Storage connection string") from None
    if cfg.account_key_env:
        credential = {"account_name": cfg.account_name(), "account_key": _from_env(cfg.account_key_env,
                                                                                      "account_key_env")}
    else:
        credential = _from_env(cfg.sas_token_env, "sas_token_env")
    return BlobServiceClient(cfg.account_url, credential=credential, **args)


def _errors() -> tuple:
    from azure.core.exceptions import AzureError

    return (AzureError, ConnectionError)


def _explain(exc: Exception, what: str) -> BackupError:
    from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceNotFoundError,
                                       ServiceRequestError, ServiceResponseError)

    code = getattr(exc, "error_code", None) or ""
    code = getattr(code, "value", code)  # the SDK's StorageErrorCode enum: the service's own name
    if isinstance(exc, ResourceNotFoundError):
        text = "container does not exist" if "Container" in str(code) else "blob does not exist"
        return BackupError(f"{what}: {text} ({code or 404})")
    if isinstance(exc, ClientAuthenticationError):
        return BackupError(f"{what}: access denied ({code or 'authentication failed'})")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return BackupError(f"{what}: Azure endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, HttpResponseError):
        return BackupError(f"{what}: {code or exc.status_code} ({exc.status_code})")
    return BackupError(f"{what}: {type(exc).__name__}")


def _names(meta: dict[str, str]) -> dict[str, str]:
    """Azure metadata names are C# identifiers: `asset-key` is kept as `asset_key`."""
    return {k.replace("-", "_"): v for k, v in meta.items()}


def _md5_b64(value) -> str | None:
    return base64.b64encode(bytes(value)).decode() if value else None


class AzureStorage(Prefixed):
    where = "azure"

    def __init__(self, cfg: AzureReplication, client=None):
        self.cfg = cfg
        self.client = client or make_client(cfg)
        self.container = self.client.get_container_client(cfg.container)
        self.lock_for = None
        self.replaced: set[str] = set()

    def uri(self, key: str) -> str:
        account = self.client.account_name or ""
        return f"azure://{account}/{self.cfg.container}/{self._full(key)}"

    def _blob(self, key: str):
        return self.container.get_blob_client(self._full(key))

    # -- reads -----------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            p = self._blob(key).get_blob_properties()
        except ResourceNotFoundError as exc:
            if "Container" in str(getattr(exc, "error_code", "")):
                raise _explain(exc, f"reading {self.uri(key)}") from None
            return None
        except _errors() as exc:
            raise _explain(exc, f"reading {self.uri(key)}") from None
        meta = dict(p.metadata or {})
        return ObjectInfo(key, p.size, meta.get("sha256"), meta, "service" if p.server_encrypted else None,
                          str(p.blob_tier) if p.blob_tier else None, modified=p.last_modified,
                          md5=_md5_b64(p.content_settings.content_md5), version_id=p.etag)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        try:
            for blob in self.container.list_blobs(name_starts_with=self._full(prefix)):
                yield self._rel(blob.name), blob.size
        except _errors() as exc:
            raise _explain(exc, f"listing {self.uri(prefix)}") from None

    def open(self, key: str) -> BinaryIO:
        """The blob as a stream (downloaded in chunks, never held whole)."""
        try:
            return _Reader(self._blob(key).download_blob(max_concurrency=1), f"downloading {self.uri(key)}")
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_file(self, key: str, dest: Path) -> None:
        try:
            with open(dest, "wb") as out:
                self._blob(key).download_blob(max_concurrency=1).readinto(Watched(out, "azure.download_write"))
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._blob(key).download_blob().readall()
        except _errors() as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    # -- writes ----------------------------------------------------------------------------
    def _settings(self, md5: bytes):
        from azure.storage.blob import ContentSettings

        return ContentSettings(content_type="application/octet-stream", content_md5=bytearray(md5))

    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None) -> ObjectInfo:
        size = path.stat().st_size
        meta = _names({"sha256": sha256, **(metadata or {})})
        block = self.cfg.block_size_mb * MIB
        try:
            if size <= block:
                with open(path, "rb") as fh:
                    data = fh.read()
                _same(path, hashlib.sha256(data).hexdigest(), sha256)
                self._put_whole(key, data, meta)
            else:
                self._put_blocks(path, key, block, meta)
        except _errors() as exc:
            raise _explain(exc, f"uploading {path.name} to {self.uri(key)}") from None
        return self.verify(key, size=size, sha256=sha256)

    def _put_whole(self, key: str, data: bytes, meta: dict[str, str]) -> None:
        """One Put Blob with the body's MD5, which Azure checks and keeps (what replica_intact compares)."""
        self._blob(key).upload_blob(data, overwrite=True, metadata=meta, validate_content=True,
                                    standard_blob_tier=self.cfg.access_tier, max_concurrency=1)

    def _put_blocks(self, path: Path, key: str, block: int, meta: dict[str, str]) -> None:
        blob = self._blob(key)
        attempt = uuid.uuid4().hex[:12]  # a retried upload never commits another attempt's staged blocks
        ids, whole, md5 = [], hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                whole.update(chunk)
                md5.update(chunk)
                block_id = base64.b64encode(f"{attempt}-{len(ids):08d}".encode()).decode()
                blob.stage_block(block_id, chunk, validate_content=True)  # the block's MD5, checked by Azure
                ids.append(block_id)
                failpoints.point("azure.block_staged")
                del chunk
        _same(path, whole.hexdigest(), meta["sha256"])  # before the blob exists
        blob.commit_block_list(ids, content_settings=self._settings(md5.digest()), metadata=meta,
                               standard_blob_tier=self.cfg.access_tier)

    def put_bytes(self, data: bytes, key: str) -> None:
        try:
            self._put_whole(key, data, {"sha256": hashlib.sha256(data).hexdigest()})
        except _errors() as exc:
            raise _explain(exc, f"uploading {self.uri(key)}") from None

    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str,
             metadata: dict[str, str] | None = None) -> ObjectInfo:
        """A server-side copy (promotions: daily → weekly/monthly), waited for, no second upload."""
        meta = _names({"sha256": sha256, **(metadata or {})})
        dest = self._blob(dst_key)
        try:
            dest.start_copy_from_url(self._blob(src_key).url, metadata=meta, standard_blob_tier=self.cfg.access_tier)
            deadline = time.monotonic() + 3600
            while (copy := dest.get_blob_properties().copy).status == "pending":
                if time.monotonic() > deadline:
                    dest.abort_copy(copy.id)
                    raise BackupError(f"copying {self.uri(src_key)} to {dst_key}: not finished after an hour")
                time.sleep(1)
            if copy.status != "success":
                raise BackupError(f"copying {self.uri(src_key)} to {dst_key}: {copy.status} "
                                  f"({copy.status_description or 'no reason given'})")
        except _errors() as exc:
            raise _explain(exc, f"copying {self.uri(src_key)} to {dst_key}") from None
        return self.verify(dst_key, size=size, sha256=sha256)

    def delete(self, keys: list[str]) -> list:
        from azure.core.exceptions import ResourceNotFoundError

        for key in keys:
            try:
                self._blob(key).delete_blob(delete_snapshots="include")
            except ResourceNotFoundError:
                continue
            except _errors() as exc:
                raise _explain(exc, f"deleting {self.uri(key)}") from None
        return []

    def proof(self, key: str, info: ObjectInfo, sha256: str, local: Path | None) -> tuple[bool | None, str]:
        """The Content-MD5 proves the stored bytes only for a blob put whole (Azure checked it then); a blob
        committed from blocks carries whatever MD5 its writer declared."""
        try:
            committed, _ = self._blob(key).get_block_list("committed")
        except _errors() as exc:
            raise _explain(exc, f"reading the block list of {self.uri(key)}") from None
        if committed:
            return None, f"the blob was committed from {len(committed)} blocks, whose Content-MD5 Azure does not check"
        return self.md5_proof(info, sha256, local, "Azure")


class _Reader(io.RawIOBase):
    """A download as a file object; a failure mid-way is one BackupError line."""

    def __init__(self, downloader, what: str):
        self.downloader, self.what = downloader, what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self.downloader.read(n if n is not None and n >= 0 else -1)
        except _errors() as exc:
            raise _explain(exc, self.what) from None

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
