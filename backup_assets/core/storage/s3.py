"""S3 (and R2, MinIO): the off-site copy of the repository, under the same relative keys.

Methods take repository keys (`postgres/daily/<artifact>`); the catalog's prefix is added here.

Uploads stream the file in parts of a fixed size (bounded memory whatever the artifact's size),
with server-side encryption and storage class from the catalog. Every object carries S3's own
SHA-256 checksum, which S3 computes over the bytes it receives and refuses the upload on a mismatch
(a multipart object's is the composite: one per part, and the SHA-256 of those); server-side copies
ask S3 for it too. The manifest's SHA-256 also travels as object metadata (`sha256`), which anyone
who can write the object can set to anything: `replica_intact` trusts S3's checksum or the bytes
themselves, never that metadata alone. An interrupted multipart upload is aborted, never left to
look like a replica.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from backup_assets.catalog import S3Replication
from backup_assets.core import BackupError, failpoints
from backup_assets.core.storage import ObjectInfo, Prefixed, same_digest as _same

MIB = 1024 * 1024
COPY_LIMIT = 5 * 1024 * MIB  # copy_object's limit; larger objects are copied in parts


def make_client(cfg: S3Replication):
    return boto3.client(
        "s3",
        region_name=cfg.region,
        endpoint_url=cfg.endpoint_url,
        verify=cfg.ca_bundle or None,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                      signature_version="s3v4"),
        **cfg.credentials(),
    )


def b64_digest(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _explain(exc: Exception, what: str) -> BackupError:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        text = {
            "NoSuchBucket": "bucket does not exist",
            "AccessDenied": "access denied",
            "InvalidAccessKeyId": "access key is not valid",
            "SignatureDoesNotMatch": "secret key does not match",
        }.get(code, exc.response.get("Error", {}).get("Message", code) or code)
        return BackupError(f"{what}: {text} ({code})")
    if isinstance(exc, EndpointConnectionError):
        return BackupError(f"{what}: S3 endpoint unreachable: {exc.kwargs.get('endpoint_url', '')}")
    return BackupError(f"{what}: {exc}")


class S3Storage(Prefixed):
    where = "s3"

    def __init__(self, cfg: S3Replication, client=None, lock_for=None):
        """`lock_for(key)`: until when an object written under `key` stays locked (None: not locked), when the
        catalog asks for Object Lock (replica.lock_policy)."""
        self.cfg = cfg
        self.client = client or make_client(cfg)
        self.bucket = cfg.bucket
        self.lock_for = lock_for if cfg.object_lock is not None else None
        self._lockable: bool | None = None
        # under Object Lock, the version of each key that reads use (None: the latest) and the keys whose latest
        # version is not that one (overwritten or deleted after replication)
        self._versions: dict[str, str | None] = {}
        self.replaced: set[str] = set()

    # -- keys ------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _check_lockable(self) -> None:
        """Object Lock is asked for: the bucket must have it enabled (checked once, before the first write)."""
        if self.lock_for is None or self._lockable:
            return
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket).get("ObjectLockConfiguration", {})
            enabled = conf.get("ObjectLockEnabled") == "Enabled"
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                raise _explain(exc, f"reading the Object Lock configuration of s3://{self.bucket}") from None
            enabled = False
        except BotoCoreError as exc:
            raise _explain(exc, f"reading the Object Lock configuration of s3://{self.bucket}") from None
        if not enabled:
            raise BackupError(f"s3://{self.bucket}: replication.s3.object_lock is set but the bucket has no Object Lock "
                              "(it can only be enabled when the bucket is created: --object-lock-enabled-for-bucket)")
        self._lockable = True

    def _lock_args(self, key: str) -> dict:
        until = self.lock_for(key) if self.lock_for is not None else None
        if until is None:
            return {}
        return {"ObjectLockMode": self.cfg.object_lock.mode.upper(), "ObjectLockRetainUntilDate": until}

    def _lock_after(self, key: str) -> None:
        """A multipart object is locked once complete (not every endpoint honours the headers on the upload)."""
        args = self._lock_args(key)
        if args:
            self.client.put_object_retention(Bucket=self.bucket, Key=self._full(key), ChecksumAlgorithm="SHA256",
                                             Retention={"Mode": args["ObjectLockMode"],
                                                        "RetainUntilDate": args["ObjectLockRetainUntilDate"]})

    def _put_args(self) -> dict:
        args = {"StorageClass": self.cfg.storage_class}
        if self.cfg.sse != "none":
            args["ServerSideEncryption"] = self.cfg.sse
            if self.cfg.sse == "aws:kms":
                args["SSEKMSKeyId"] = self.cfg.kms_key_id
        return args

    # -- reads -----------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _explain(exc, f"HEAD {self.uri(key)}") from None
        except BotoCoreError as exc:
            raise _explain(exc, f"HEAD {self.uri(key)}") from None
        meta = r.get("Metadata", {})
        # a multipart object's checksum is a composite ("<base64>-<parts>" on AWS; some endpoints leave out the
        # count), and its ETag is "<md5 of the part md5s>-<parts>"
        checksum, _, parts = (r.get("ChecksumSHA256") or "").partition("-")
        _, dash, etag_parts = r.get("ETag", "").strip('"').rpartition("-")
        etag_parts = etag_parts if dash else ""
        count = int(parts) if parts.isdigit() else int(etag_parts) if etag_parts.isdigit() else 1
        return ObjectInfo(key, r["ContentLength"], meta.get("sha256"), meta, r.get("ServerSideEncryption"),
                          r.get("StorageClass", "STANDARD"), checksum_sha256=checksum or None, parts=count,
                          modified=r.get("LastModified"), lock_mode=r.get("ObjectLockMode"),
                          lock_until=r.get("ObjectLockRetainUntilDate"), version_id=r.get("VersionId"))

    def part_size(self, key: str) -> int:
        """The size of a multipart object's first part (all but the last are that size)."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key), PartNumber=1)["ContentLength"]
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"HEAD {self.uri(key)} part 1") from None

    # -- under Object Lock: what the bucket still holds behind an overwrite or a delete ---------------------
    def _held_version(self, full: str, versions: list[dict], deleted: bool) -> dict | None:
        """The version of a key that reads use: the latest, unless the key was overwritten or deleted after it
        was replicated; then its oldest version still locked (what the backup host wrote: whoever holds its
        credentials can add versions and delete markers, never remove a locked version), else the latest."""
        if not versions:
            return None
        if len(versions) == 1 and not deleted:
            return versions[0]
        now = dt.datetime.now(dt.timezone.utc)
        for version in sorted(versions, key=lambda v: v["LastModified"]):  # oldest first
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=full, VersionId=version["VersionId"])
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc, f"HEAD s3://{self.bucket}/{full} version {version['VersionId']}") from None
            until = r.get("ObjectLockRetainUntilDate")
            if until is not None and until > now:
                return version
        return None if deleted else max(versions, key=lambda v: v["LastModified"])

    def _scan_versions(self, prefix_full: str, exact: str | None = None) -> Iterator[tuple[str, dict]]:
        keys: dict[str, tuple[list[dict], bool]] = {}
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket,
                                                                                  Prefix=prefix_full):
                for v in page.get("Versions", []):
                    keys.setdefault(v["Key"], ([], False))[0].append(v)
                for marker in page.get("DeleteMarkers", []):
                    if marker.get("IsLatest"):
                        found = keys.setdefault(marker["Key"], ([], False))
                        keys[marker["Key"]] = (found[0], True)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"listing the versions under s3://{self.bucket}/{prefix_full}") from None
        for full, (versions, deleted) in keys.items():
            if exact is not None and full != exact:
                continue
            held = self._held_version(full, versions, deleted)
            if held is None:
                continue
            key = self._rel(full)
            self._versions[key] = None if held.get("IsLatest") else held["VersionId"]
            if not held.get("IsLatest"):
                self.replaced.add(key)
            yield key, held

    def _read_args(self, key: str) -> dict:
        """The version reads take (see _held_version): nothing to add without Object Lock."""
        if self.cfg.object_lock is None:
            return {}
        if key not in self._versions:
            self._versions[key] = None
            list(self._scan_versions(self._full(key), exact=self._full(key)))
        version = self._versions[key]
        return {"VersionId": version} if version else {}

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        if self.cfg.object_lock is not None:  # what a delete marker hides is still there, and still restores
            for key, version in self._scan_versions(self._full(prefix)):
                yield key, version["Size"]
            return
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._full(prefix)):
                for obj in page.get("Contents", []):
                    yield self._rel(obj["Key"]), obj["Size"]
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"listing {self.uri(prefix)}") from None

    def open(self, key: str) -> BinaryIO:
        """The object as a stream (read in parts, never held whole)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key), **self._read_args(key))["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_file(self, key: str, dest: Path) -> None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key), **self._read_args(key))["Body"]
            with open(dest, "wb") as out:
                for chunk in body.iter_chunks(MIB):
                    out.write(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key), **self._read_args(key))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"downloading {self.uri(key)}") from None

    # -- writes ----------------------------------------------------------------------------
    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Upload a file (multipart above the part size) and verify it with a HEAD."""
        size = path.stat().st_size
        part_size = self.cfg.part_size_mb * MIB
        meta = {"sha256": sha256, **(metadata or {})}
        what = f"uploading {path.name} to {self.uri(key)}"
        self._check_lockable()
        self._abort_stale_uploads(key)
        try:
            if size <= part_size:
                with open(path, "rb") as fh:
                    data = fh.read()
                _same(path, hashlib.sha256(data).hexdigest(), sha256)
                self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, Metadata=meta,
                                       ChecksumAlgorithm="SHA256", ChecksumSHA256=b64_digest(hashlib.sha256(data).digest()),
                                       **self._put_args(), **self._lock_args(key))
            else:
                self._multipart(path, key, part_size, meta)
                self._lock_after(key)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, what) from None
        return self.verify(key, size=size, sha256=sha256)

    def put_bytes(self, data: bytes, key: str) -> None:
        self._check_lockable()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                   Metadata={"sha256": hashlib.sha256(data).hexdigest()}, ChecksumAlgorithm="SHA256",
                                   ChecksumSHA256=b64_digest(hashlib.sha256(data).digest()), **self._put_args(),
                                   **self._lock_args(key))
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"uploading {self.uri(key)}") from None

    def _multipart(self, path: Path, key: str, part_size: int, meta: dict[str, str]) -> None:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._full(key), Metadata=meta,
                                                        ChecksumAlgorithm="SHA256", **self._put_args())["UploadId"]
        try:
            parts = []
            whole = hashlib.sha256()
            with open(path, "rb") as fh:
                number = 1
                while chunk := fh.read(part_size):
                    whole.update(chunk)
                    checksum = b64_digest(hashlib.sha256(chunk).digest())
                    r = self.client.upload_part(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id, PartNumber=number,
                                                Body=chunk, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
                    parts.append({"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": checksum})
                    failpoints.point("s3.part_uploaded")
                    number += 1
                    del chunk
            _same(path, whole.hexdigest(), meta["sha256"])  # before the object exists
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id)
        except (ClientError, BotoCoreError):
            # the endpoint may be gone; _abort_stale_uploads clears it on the next attempt
            pass

    def _abort_stale_uploads(self, key: str) -> None:
        try:
            r = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"checking {self.uri(key)}") from None
        for upload in r.get("Uploads", []):
            if upload["Key"] == self._full(key):
                self._abort(key, upload["UploadId"])

    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """A server-side copy (promotions: daily → weekly/monthly), no second upload."""
        meta = {"sha256": sha256, **(metadata or {})}
        source = {"Bucket": self.bucket, "Key": self._full(src_key)}
        self._check_lockable()
        try:
            if size <= COPY_LIMIT:
                self.client.copy_object(Bucket=self.bucket, Key=self._full(dst_key), CopySource=source, Metadata=meta,
                                        MetadataDirective="REPLACE", ChecksumAlgorithm="SHA256", **self._put_args(),
                                        **self._lock_args(dst_key))
            else:
                upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._full(dst_key), Metadata=meta,
                                                                ChecksumAlgorithm="SHA256", **self._put_args())["UploadId"]
                try:
                    parts, start, number = [], 0, 1
                    step = max(self.cfg.part_size_mb * MIB, 64 * MIB)
                    while start < size:
                        end = min(start + step, size) - 1
                        r = self.client.upload_part_copy(Bucket=self.bucket, Key=self._full(dst_key), UploadId=upload_id,
                                                         PartNumber=number, CopySource=source,
                                                         CopySourceRange=f"bytes={start}-{end}")
                        parts.append({"PartNumber": number, "ETag": r["CopyPartResult"]["ETag"],
                                      **({"ChecksumSHA256": r["CopyPartResult"]["ChecksumSHA256"]}
                                         if r["CopyPartResult"].get("ChecksumSHA256") else {})})
                        start, number = end + 1, number + 1
                    self.client.complete_multipart_upload(Bucket=self.bucket, Key=self._full(dst_key), UploadId=upload_id,
                                                          MultipartUpload={"Parts": parts})
                    self._lock_after(dst_key)
                except BaseException:
                    self._abort(dst_key, upload_id)
                    raise
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, f"copying {self.uri(src_key)} to {dst_key}") from None
        return self.verify(dst_key, size=size, sha256=sha256)

    def proof(self, key: str, info: ObjectInfo, sha256: str, local: Path | None) -> tuple[bool | None, str]:
        """S3's own SHA-256 of the stored bytes against the backup's: (True, what was compared), (False, the
        difference), or (None, why it cannot be compared)."""
        if info.checksum_sha256 is None:
            return None, "the object has no SHA-256 checksum of S3's own"
        if info.parts <= 1:
            expected, basis = b64_digest(bytes.fromhex(sha256)), "the manifest's SHA-256"
        elif local is None or not local.exists():
            return None, f"the object's checksum is a composite of {info.parts} parts and the local artifact is gone"
        else:
            expected = composite_sha256(local, self.part_size(key))
            basis = f"the composite SHA-256 of the local artifact (sha256 as in the manifest) in {info.parts} parts"
        if info.checksum_sha256 != expected:
            return False, (f"S3's SHA-256 checksum of the stored bytes {info.checksum_sha256} differs from {basis} "
                           f"({expected})")
        return True, f"S3's SHA-256 checksum of the stored bytes equals {basis}"

    def delete(self, keys: list[str]) -> list[tuple[str, dt.datetime]]:
        """Delete objects. Under Object Lock the bucket is versioned: a delete without a version only hides the
        object behind a delete marker, so each object's current version is deleted by its id, and one still
        locked is left where it is and returned with its date (retention prunes it on a later run)."""
        if self.cfg.object_lock is not None:
            return self._delete_versions(keys)
        self._delete_objects([{"Key": self._full(k)} for k in keys])
        return []

    def _delete_objects(self, objects: list[dict]) -> None:
        """DeleteObjects in batches of 1000; the first object S3 would not delete is the error."""
        for start in range(0, len(objects), 1000):
            try:
                r = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects[start:start + 1000],
                                                                          "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc, f"deleting from s3://{self.bucket}") from None
            if r.get("Errors"):
                first = r["Errors"][0]
                raise BackupError(f"deleting {first['Key']} from s3://{self.bucket} failed: {first.get('Message')}")

    def _delete_versions(self, keys: list[str]) -> list[tuple[str, dt.datetime]]:
        """Every version of the keys and every delete marker over them (an overwrite's or a delete's), once none
        is locked any more; else nothing, and until when the locks hold."""
        now = dt.datetime.now(dt.timezone.utc)
        locked, versions = [], []
        for key in keys:
            full = self._full(key)
            try:
                listed = self.client.list_object_versions(Bucket=self.bucket, Prefix=full)
                held = None
                for v in listed.get("Versions", []):
                    if v["Key"] != full:
                        continue
                    r = self.client.head_object(Bucket=self.bucket, Key=full, VersionId=v["VersionId"])
                    until = r.get("ObjectLockRetainUntilDate")
                    if until is not None and until > now:
                        held = max(held or until, until)
                    versions.append({"Key": full, "VersionId": v["VersionId"]})
                versions += [{"Key": full, "VersionId": d["VersionId"]} for d in listed.get("DeleteMarkers", [])
                             if d["Key"] == full]
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc, f"listing the versions of {self.uri(key)}") from None
            if held is not None:
                locked.append((key, held))
        if locked:  # all or nothing: a backup's manifest never goes while its artifact stays locked
            return locked
        self._delete_objects(versions)
        return []


def composite_sha256(path, part_size: int) -> str:
    """S3's composite SHA-256 of a file uploaded in parts of `part_size`: the SHA-256 of the parts'
    SHA-256s, base64."""
    digests = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            digests += hashlib.sha256(chunk).digest()
    return b64_digest(hashlib.sha256(digests).digest())


def with_retries(fn, *, attempts: int = 3, first_delay: float = 1.0, retry_on=(BackupError,)):
    """Retry a whole step with backoff (botocore already retries single requests)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts or any(s in str(exc) for s in ("does not exist", "access denied", "differs from")):
                raise
            time.sleep(first_delay * 2 ** (attempt - 1))
