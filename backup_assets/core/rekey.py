"""Key rotation: re-encrypt existing backups to a new set of recipients.

The artifact's zstd stream is decrypted with the current identity and encrypted to the new
recipients as one stream (pipes, never plaintext on disk), hashed as it is written and read back
from disk to check the hash. Plain (unencrypted) backups are encrypted the same way.

A kill at any moment leaves a good backup: the new artifact gets a name of its own (its backup
time plus one microsecond) and its own manifest; only once both are on disk is the old manifest
removed, then the old artifact. A kill in between leaves two complete backups of the partition
(the newer is used) or an orphan artifact (swept), never a backup that does not verify.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, replace

from ..catalog import Catalog
from . import BackupError, crypto, failpoints
from .artifact import CHUNK, FILE_MODE, _HashingSink, fsync_dir, human_size, partial_path, sha256_file, write_json_atomic
from .backup import repository_for
from .manifest import manifest_path_for
from .repository import StoredBackup
from .verification import checks_path, read_status

STAMP = "%Y%m%dT%H%M%S%fZ"


@dataclass
class Rekeyed:
    old: str
    new: str
    size_bytes: int
    seconds: float


def _next_name(name: str) -> str:
    """The artifact's name with its backup time one microsecond later (and .age at the end)."""
    stem, sep, rest = name.rpartition("Z.")
    head, _, stamp = stem.rpartition("-")
    when = dt.datetime.strptime(stamp + "Z", STAMP) + dt.timedelta(microseconds=1)
    rest = rest if rest.endswith(crypto.SUFFIX) else rest + crypto.SUFFIX
    return f"{head}-{when.strftime(STAMP)}.{rest}"


def select(catalog: Catalog, *, source: str | None = None, group: str | None = None, tier: str | None = None,
           older_than_days: float | None = None, recipients: list[str]) -> list[StoredBackup]:
    """The backups to re-encrypt: matching the filters and not already encrypted to exactly `recipients`."""
    now = dt.datetime.now(dt.timezone.utc)
    wanted = sorted(crypto.fingerprint(r) for r in recipients)
    chosen = []
    for b in repository_for(catalog).backups(source=source, group=group, tier=tier):
        if older_than_days is not None:
            created = dt.datetime.fromisoformat(b.manifest.timestamp)
            if (now - created).total_seconds() < older_than_days * 86400:
                continue
        have = sorted(r["fingerprint"] for r in (b.manifest.encryption or {}).get("recipients", []))
        if have != wanted:
            chosen.append(b)
    return chosen


def rekey(catalog: Catalog, backup: StoredBackup, recipients: list[str], *, identity_env: str | None = None) -> Rekeyed:
    m, old = backup.manifest, backup.artifact_path
    started = time.monotonic()
    for r in recipients:
        try:
            crypto.parse_recipient(r)
        except ValueError as exc:
            raise BackupError(f"recipient {crypto.fingerprint(r) if r.strip() else '(empty)'}: {exc}") from None
    identities = crypto.identities_for(catalog, m, artifact=str(old)) if m.encryption else None
    new = old.with_name(_next_name(old.name))
    tmp = partial_path(new)
    source_hash = hashlib.sha256()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with open(old, "rb") as fh, os.fdopen(fd, "wb") as out:
            sink = _HashingSink(out)
            writer = crypto.EncryptingWriter(sink, recipients)

            class _Hashed:
                def read(self, size=CHUNK):
                    data = fh.read(size)
                    source_hash.update(data)
                    return data

            reader = crypto.DecryptingReader(_Hashed(), identities, what=str(old)) if identities else _Hashed()
            try:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    failpoints.point("rekey.streaming")
            finally:
                if identities:
                    reader.close()
            writer.close()
            out.flush()
            os.fsync(out.fileno())
        if source_hash.hexdigest() != m.sha256:
            raise BackupError(f"{old}: sha256 {source_hash.hexdigest()} differs from the manifest's {m.sha256}; "
                              "not re-encrypted")
        if sha256_file(tmp) != sink.sha256.hexdigest():
            raise BackupError(f"{new}: what was written does not read back the same; not re-encrypted")
        os.replace(tmp, new)
        fsync_dir(new.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    failpoints.point("rekey.new_artifact")
    manifest = replace(m, artifact=new.name, sha256=sink.sha256.hexdigest(), size_bytes=sink.size,
                       size_human=human_size(sink.size),
                       encryption={"format": "age", "recipients": crypto.describe(recipients),
                                   "identity_file_env": identity_env or (m.encryption or {}).get("identity_file_env")})
    try:
        write_json_atomic(manifest_path_for(new), manifest.to_json())
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    status = read_status(backup)
    if status:
        shutil.copyfile(checks_path(backup), checks_path(StoredBackup(manifest, manifest_path_for(new))))
    failpoints.point("rekey.new_manifest")
    # the new backup is complete: the old one goes, manifest first (then it no longer counts)
    backup.manifest_path.unlink(missing_ok=True)
    old.unlink(missing_ok=True)
    checks_path(backup).unlink(missing_ok=True)
    fsync_dir(new.parent)
    return Rekeyed(old.name, new.name, sink.size, round(time.monotonic() - started, 3))
