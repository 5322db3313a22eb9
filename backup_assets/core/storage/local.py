"""The local filesystem as a storage: atomic writes (a partial name, fsync, rename, fsync of the
folder), owner-only modes, hard links for server-side copies."""

from __future__ import annotations

import datetime as dt

import contextlib
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

    @contextlib.contextmanager
    def _staged(self, key: str):
        """(partial path, final path) of `key`: what the block writes at the partial path is committed (renamed
        into place, the folder fsynced) when it ends, and removed when it raises."""
        final = self.local_path(key)
        ensure_dir(final.parent)
        tmp = partial_path(final)
        try:
            yield tmp, final
            self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _private(tmp: Path):
        return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")

    def put_file(self, path: Path, key: str, *, sha256: str, metadata: dict[str, str] | None = None,
                 move: bool = False) -> ObjectInfo:
        """Copy (or with `move`, rename) a file in, checking its SHA-256 on the way."""
        with self._staged(key) as (tmp, final):
            if move:
                digest = sha256_file(path)
                os.replace(path, tmp)
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as src, self._private(tmp) as out:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                digest = digest.hexdigest()
            if digest != sha256:
                raise BackupError(f"{path}: sha256 {digest} differs from the manifest's {sha256}; not stored")
            os.chmod(tmp, FILE_MODE)
        return ObjectInfo(key, final.stat().st_size, sha256)

    def put_bytes(self, data: bytes, key: str) -> None:
        with self._staged(key) as (tmp, _final), self._private(tmp) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())

    def copy(self, src_key: str, dst_key: str, *, size: int, sha256: str,
             metadata: dict[str, str] | None = None) -> ObjectInfo:
        """A hard link (a copy across filesystems): promotions cost no space."""
        src = self.local_path(src_key)
        with self._staged(dst_key) as (tmp, final):
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, FILE_MODE)
        return ObjectInfo(dst_key, final.stat().st_size, sha256)

    def delete(self, keys: list[str]) -> list:
        for key in keys:
            self.local_path(key).unlink(missing_ok=True)
        for parent in {self.local_path(k).parent for k in keys}:
            if parent.is_dir():
                fsync_dir(parent)
        return []  # nothing on disk is locked

