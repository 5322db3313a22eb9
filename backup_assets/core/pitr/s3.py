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


def _copies(catalog: Catalog, source: str, *, since_oldest_base: bool) -> tuple[list[dict], list, list]:
    """What the replica must hold of a source's physical tier: (base backups, [(key, path, size, sha256)] of
    every stored file, [(key, path)] of every JSON description). With `since_oldest_base`, WAL from the oldest
    kept base backup's start (and every timeline history) only."""
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import wal

    bases = pitr_base.base_backups(catalog, source)
    local = catalog.repository_root / "base" / source
    files, described = [], []
    for meta in bases:
        for name, size, sha in _files_of_base(meta):
            files.append((base_prefix(source) + name, local / name, size, sha))
        described.append((f"{base_prefix(source)}{meta['artifact']}.json", local / f"{meta['artifact']}.json"))
    folder = wal.wal_dir(catalog, source)
    since = bases[0]["start_wal"][8:] if bases and since_oldest_base else ""
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = meta_path.name[:-5]
        if name[8:24] < since and not name.endswith(".history"):
            continue
        meta = wal.read_meta(folder, name)
        if meta is None:
            continue
        files.append((wal_prefix(source) + meta["stored"], folder / meta["stored"], meta["stored_size"],
                      meta["sha256"]))
        described.append((wal_prefix(source) + meta_path.name, meta_path))
    return bases, files, described


def _differences(storage, files: list, described: list) -> dict[str, str]:
    """{key: what differs} of the files the replica does not hold exactly: each stored file proven by the
    storage's checksum (or downloaded and hashed, `proven_copy`), each JSON description compared byte for byte.
    Requests go eight at a time (a WAL archive is thousands of objects)."""
    from concurrent.futures import ThreadPoolExecutor

    from backup_assets.core.storage import proven_copy

    prefixes = {key.rsplit("/", 1)[0] + "/" for key, _ in described}
    present = {key for prefix in prefixes for key, _ in storage.list(prefix)}

    def described_as_here(key: str, path: Path) -> str | None:
        if key not in present:
            return "is missing"
        return None if storage.get_bytes(key) == path.read_bytes() else "differs from the local description"

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda f: (f[0], proven_copy(storage, *f)), files))
        found += list(pool.map(lambda d: (d[0], described_as_here(*d)), described))
    return {key: problem for key, problem in found if problem is not None}


def replicate(catalog: Catalog, source: str, storage, *, say=lambda _m: None) -> dict:
    """Upload every kept base backup and every archived WAL file (and their descriptions) that the replica does
    not hold exactly, so a copy replaced behind our back is put right, not skipped for having the same size."""
    bases, files, described = _copies(catalog, source, since_oldest_base=False)
    differ = _differences(storage, files, described)
    uploaded = uploaded_bytes = 0
    for key, path, size, sha in files:
        if key in differ:
            storage.put_file(path, key, sha256=sha)
            uploaded += 1
            uploaded_bytes += size
    for key, path in described:
        if key in differ:
            storage.put_bytes(path.read_bytes(), key)
            uploaded += 1
    segments = sum(1 for key, _ in described if key.startswith(wal_prefix(source)))
    say(f"{source}: {len(bases)} base backups and {segments} WAL files on {storage.uri(base_prefix(source))[:-1]}"
        f" and …/wal; {uploaded} files uploaded ({uploaded_bytes} bytes)")
    return {"base_backups": len(bases), "wal_files": segments, "uploaded_files": uploaded,
            "uploaded_bytes": uploaded_bytes, "uri": storage.uri(base_prefix(source))}


def replica_intact(catalog: Catalog, source: str, storage):
    """Every kept base backup (artifact, manifest, JSON) and every WAL file from the oldest kept base backup's
    start is on the replica with the same bytes: the storage's own checksum of each stored file against ours
    (else the file downloaded and hashed), each JSON description equal byte for byte. Size and metadata alone,
    which whoever writes an object sets at will, prove nothing."""
    from backup_assets.core.outcome import Outcome

    bases, files, described = _copies(catalog, source, since_oldest_base=True)
    differ = _differences(storage, files, described)
    problems = [f"{key.rsplit('/', 1)[-1]} {problem}" for key, problem in differ.items()]
    segments = sum(1 for key, _ in described if key.startswith(wal_prefix(source)))
    md = {"base_backups": len(bases), "wal_files": segments, "problems": problems[:20]}
    if problems:
        return Outcome(False, f"{len(problems)} problem(s) on {storage.uri(base_prefix(source))}: {problems[0]}", md)
    return Outcome(True, f"{len(bases)} base backups and {segments} WAL files on the replica hold the same bytes "
                         f"(each stored file proven by {storage.where}'s checksum or downloaded and hashed)", md)


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
