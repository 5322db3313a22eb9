"""Backup retention: which backups to delete, as a pure function over what the manifests say.

Rules, per (source, group, tier):
- a backup older than the tier's retention may go;
- the newest verified backup is kept whatever its age (so a run of failed backups never leaves
  nothing good behind), and so is the newest backup of all (its checks may not have run yet);
- an artifact goes together with its manifest and its check record.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable

from ..catalog import Catalog
from .backup import repository_for
from .manifest import MANIFEST_SUFFIX
from .verification import checks_path, is_verified


@dataclass(frozen=True)
class Entry:
    id: str
    source: str
    group: str
    tier: str
    partition: str
    created: dt.datetime
    verified: bool
    size: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.group, self.tier)


@dataclass
class Selection:
    delete: list[Entry] = field(default_factory=list)
    keep: list[Entry] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


def select(entries: Iterable[Entry], retention_days: dict[str, int], now: dt.datetime) -> Selection:
    by_key: dict[tuple, list[Entry]] = {}
    for e in entries:
        by_key.setdefault(e.key, []).append(e)
    sel = Selection()
    for key, group in sorted(by_key.items()):
        group.sort(key=lambda e: (e.created, e.partition, e.id))
        newest = group[-1]
        verified = [e for e in group if e.verified]
        newest_verified = verified[-1] if verified else None
        cutoff = now - dt.timedelta(days=retention_days[key[2]])
        for e in group:
            if e is newest_verified:
                sel.keep.append(e)
                sel.reasons[e.id] = "newest verified backup"
            elif e is newest:
                sel.keep.append(e)
                sel.reasons[e.id] = "newest backup"
            elif e.created >= cutoff:
                sel.keep.append(e)
                sel.reasons[e.id] = "within retention"
            else:
                sel.delete.append(e)
                sel.reasons[e.id] = f"older than {retention_days[key[2]]} days"
    return sel


def _created(timestamp: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(timestamp)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def local_entries(catalog: Catalog) -> list[tuple[Entry, object]]:
    out = []
    for b in repository_for(catalog).backups():
        m = b.manifest
        out.append((Entry(str(b.artifact_path), m.source, m.group, m.tier, m.partition, _created(m.timestamp),
                          is_verified(b), m.size_bytes), b))
    return out


def prune_local(catalog: Catalog, *, dry_run: bool, now: dt.datetime | None = None) -> dict:
    now = now or dt.datetime.now(dt.timezone.utc)
    pairs = local_entries(catalog)
    lookup = {e.id: b for e, b in pairs}
    days = {t: catalog.retention_days(t, "local") for t in catalog.tiers}
    sel = select([e for e, _ in pairs], days, now)
    files = freed = 0
    for e in sel.delete:
        b = lookup[e.id]
        paths = [b.manifest_path, b.artifact_path, checks_path(b)]  # manifest first: then it no longer counts
        for path in paths:
            if path.exists():
                files += 1
                if path == b.artifact_path and path.stat().st_nlink == 1:
                    freed += path.stat().st_size
                if not dry_run:
                    path.unlink()
    if not dry_run:
        repository_for(catalog).sweep()
    return {"files": files, "backups": len(sel.delete), "bytes_freed": freed, "kept": len(sel.keep),
            "deleted": sorted(e.id.rsplit("/", 1)[-1] for e in sel.delete)}


def prune_s3(catalog: Catalog, storage, *, dry_run: bool, now: dt.datetime | None = None) -> dict:
    from .replica import parse_artifact_name

    now = now or dt.datetime.now(dt.timezone.utc)
    listing = dict(storage.list(""))
    entries = []
    for key, size in listing.items():
        parsed = parse_artifact_name(key.rsplit("/", 1)[-1])
        tier = key.rsplit("/", 2)[-2] if key.count("/") >= 2 else None
        if not parsed or tier not in catalog.tiers:
            continue
        created = dt.datetime.strptime(parsed["stamp"], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
        # replicate() uploads only backups that verify, manifest last: an artifact with its manifest
        # beside it in the listing is a verified replica, and no request per object is needed to know it
        verified = key + MANIFEST_SUFFIX in listing
        entries.append(Entry(key, parsed["source"], parsed["group"], tier, parsed["partition"], created,
                             verified, size))
    days = {t: catalog.retention_days(t, "s3") for t in catalog.tiers}
    sel = select(entries, days, now)
    doomed = []
    for e in sel.delete:
        doomed += [k for k in (e.id + MANIFEST_SUFFIX, e.id) if k in listing]
    if doomed and not dry_run:
        storage.delete(doomed)
    return {"files": len(doomed), "backups": len(sel.delete), "bytes_freed": sum(e.size for e in sel.delete),
            "kept": len(sel.keep), "deleted": sorted(e.id.rsplit("/", 1)[-1] for e in sel.delete)}


def prune(catalog: Catalog, *, dry_run: bool, storage=None, now: dt.datetime | None = None) -> dict:
    report: dict = {"dry_run": dry_run, "local": prune_local(catalog, dry_run=dry_run, now=now)}
    if catalog.replication.s3 is not None:
        from .replica import storage_for

        report["s3"] = prune_s3(catalog, storage or storage_for(catalog), dry_run=dry_run, now=now)
    return report
