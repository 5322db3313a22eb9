"""The physical tier on S3: base backups and the WAL archive replicated to the catalog's S3 replica
with the same keys as on disk (`base/<source>/…`, `wal/<source>/…`), checked there, pruned there, and fetched
back for a restore when the local repository is gone.

Every file goes up before the JSON that describes it (and is verified by its SHA-256 on arrival), so an object
without its JSON is never taken for a base backup or an archived segment, as on disk.
"""

from __future__ import annotations

from pathlib import Path

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.artifact import ensure_dir, partial_path, write_json_atomic
from backup_assets.core.pitr.locations import base_prefix, wal_prefix


def _files_of_base(meta: dict) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of a base backup's stored files, the artifact and its manifest."""
    files = [(meta["artifact"], meta["size_bytes"], meta["sha256"])]
    if meta.get("manifest"):
        m = meta["manifest"]
        files.append((m["artifact"], m["size_bytes"], m["sha256"]))
    return files


def replicate(catalog: Catalog, source: str, storage, *, say=lambda _m: None) -> dict:
    """Upload every kept base backup and every archived WAL file that the replica lacks (one listing each)."""
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import wal

    local = catalog.repository_root
    present = dict(storage.list(base_prefix(source))) | dict(storage.list(wal_prefix(source)))
    uploaded = uploaded_bytes = 0

    def ensure(key: str, path: Path, size: int, sha256: str) -> None:
        nonlocal uploaded, uploaded_bytes
        if present.get(key) == size:
            return
        storage.put_file(path, key, sha256=sha256)
        uploaded += 1
        uploaded_bytes += size

    bases = pitr_base.base_backups(catalog, source)
    for meta in bases:
        for name, size, sha in _files_of_base(meta):
            ensure(base_prefix(source) + name, local / "base" / source / name, size, sha)
        key = f"{base_prefix(source)}{meta['artifact']}.json"
        if key not in present:
            storage.put_bytes((local / "base" / source / f"{meta['artifact']}.json").read_bytes(), key)
            uploaded += 1
    folder = wal.wal_dir(catalog, source)
    segments = 0
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        meta = wal.read_meta(folder, meta_path.name[:-5])
        if meta is None:
            continue
        segments += 1
        ensure(wal_prefix(source) + meta["stored"], folder / meta["stored"], meta["stored_size"], meta["sha256"])
        key = wal_prefix(source) + meta_path.name
        if key not in present:
            storage.put_bytes(meta_path.read_bytes(), key)
            uploaded += 1
    say(f"{source}: {len(bases)} base backups and {segments} WAL files on {storage.uri(base_prefix(source))[:-1]}"
        f" and …/wal; {uploaded} files uploaded ({uploaded_bytes} bytes)")
    return {"base_backups": len(bases), "wal_files": segments, "uploaded_files": uploaded,
            "uploaded_bytes": uploaded_bytes, "uri": storage.uri(base_prefix(source))}


def replica_intact(catalog: Catalog, source: str, storage):
    """Every kept base backup (artifact, manifest, JSON) is on the replica with its size and SHA-256, and every
    WAL file from the oldest kept base backup's start with its size (each was verified on upload)."""
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import wal
    from backup_assets.core.outcome import Outcome

    bases = pitr_base.base_backups(catalog, source)
    present = dict(storage.list(base_prefix(source))) | dict(storage.list(wal_prefix(source)))
    problems = []
    for meta in bases:
        for name, size, sha in _files_of_base(meta):
            info = storage.head(base_prefix(source) + name)
            if info is None:
                problems.append(f"{name} is missing")
            elif info.size != size or (info.sha256 and info.sha256 != sha):
                problems.append(f"{name} differs (size {info.size}, expected {size})")
        if f"{base_prefix(source)}{meta['artifact']}.json" not in present:
            problems.append(f"{meta['artifact']}.json is missing")
    folder = wal.wal_dir(catalog, source)
    since = bases[0]["start_wal"][8:] if bases else ""
    checked = 0
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = meta_path.name[:-5]
        if name[8:24] < since and not name.endswith(".history"):
            continue
        meta = wal.read_meta(folder, name)
        if meta is None:
            continue
        checked += 1
        if present.get(wal_prefix(source) + meta["stored"]) != meta["stored_size"] or \
                wal_prefix(source) + meta_path.name not in present:
            problems.append(f"WAL {name} is missing or differs")
    md = {"base_backups": len(bases), "wal_files": checked, "problems": problems[:20]}
    if problems:
        return Outcome(False, f"{len(problems)} problem(s) on {storage.uri(base_prefix(source))}: {problems[0]}", md)
    return Outcome(True, f"{len(bases)} base backups and {checked} WAL files on the replica match", md)


def download_bases(catalog: Catalog, source: str, storage, *, say=lambda _m: None) -> int:
    """Bring the replica's base backups that the local repository lacks back into it (verified), for a restore
    when the local copies are gone. WAL comes back one segment at a time through wal-fetch."""
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.artifact import sha256_file

    folder = ensure_dir(pitr_base.base_dir(catalog, source))
    local = {m["artifact"] for m in pitr_base.base_backups(catalog, source)}
    fetched = 0
    for meta in pitr_base.base_backups(catalog, source, storage):
        if meta["artifact"] in local:
            continue
        for name, size, sha in _files_of_base(meta):
            tmp = partial_path(folder / name)
            try:
                storage.get_file(base_prefix(source) + name, tmp)
                if tmp.stat().st_size != size or sha256_file(tmp) != sha:
                    raise BackupError(f"{storage.uri(base_prefix(source) + name)} does not match its description; "
                                      "not used")
                tmp.replace(folder / name)
            finally:
                tmp.unlink(missing_ok=True)
        write_json_atomic(folder / f"{meta['artifact']}.json", meta)
        say(f"fetched {meta['artifact']} from {storage.uri(base_prefix(source) + meta['artifact'])}")
        fetched += 1
    return fetched
