"""The local filesystem as a storage: atomic writes (a partial name, fsync, rename, fsync of the
folder), owner-only modes, hard links for server-side copies."""

from __future__ import annotations

import datetime as dt

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from backup_assets.core import BackupError
from backup_assets.core.artifact import (CHUNK, FILE_MODE, PARTIAL_MARK, ensure_dir, fsync_dir, partial_path,
                                         sha256_file)
from backup_assets.core.storage import ObjectInfo

SCRATCH = ".tmp"


class LocalStorage:
    where = "local"

    def __init__(self, root: Path):
        self.root = Path(root)

    def local_path(self, key: str) -> Path:
        path = (self.root / key)
        if ".." in Path(key).parts or Path(key).is_absolute():
            raise BackupError(f"{key}: not a key inside the repository {self.root}")
        return path

    def uri(self, key: str) -> str:
        return str(self.local_path(key))

    # -- reads -----------------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Complete files under `prefix`, sorted; scratch folders and partial files are not listed."""
        # only the folder the prefix names is walked (the WAL archive is not walked to list base backups)
        start = self.local_path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not start.is_dir():
            return
        found = []
        for dirpath, dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root)
            if rel.parts[:1] == (SCRATCH,):
                dirs[:] = []
                continue
            for name in files:
                if name.startswith(".") or PARTIAL_MARK in name:
                    continue
                key = (rel / name).as_posix()
                if key.startswith(prefix):
                    try:
                        found.append((key, (Path(dirpath) / name).stat().st_size))
                    except FileNotFoundError:  # removed while listed
                        continue
        yield from sorted(found)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self.local_path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, None,
                          modified=dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc))

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")

    def get_file(self, key: str, dest: Path) -> None:
        shutil.copyfile(self.local_path(key), dest)

    def get_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    # -- writes ----------------------------------------------------------------------------
    def _commit(self, tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None,
                 move: bool = False) -> ObjectInfo:
        """Copy (or with `move`, rename) a file in, checking its SHA-256 on the way."""
        final = self.local_path(key)
        ensure_dir(final.parent)
        tmp = partial_path(final)
        try:
            if move:
                digest = sha256_file(path)
                os.replace(path, tmp)
            else:
                digest = hashlib.sha256()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                digest = digest.hexdigest()
            if digest != sha256:
                raise BackupError(f"{path}: sha256 {digest} differs from the manifest's {sha256}; not stored")
            os.chmod(tmp, FILE_MODE)
            self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key, final.stat().st_size, sha256)

    def put_bytes(self, data: bytes, key: str) -> None:
        final = self.local_path(key)
        ensure_dir(final.parent)
        tmp = partial_path(final)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str,
             metadata: dict[str, str] | None = None) -> ObjectInfo:
        """A hard link (a copy across filesystems): promotions cost no space."""
        src, final = self.local_path(src_key), self.local_path(dst_key)
        ensure_dir(final.parent)
        tmp = partial_path(final)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, FILE_MODE)
            self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(dst_key, final.stat().st_size, sha256)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.local_path(key).unlink(missing_ok=True)
        for parent in {self.local_path(k).parent for k in keys}:
            if parent.is_dir():
                fsync_dir(parent)

