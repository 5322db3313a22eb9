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

from backup_assets.core.repository import BackupRef, Repository


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


def entries(repo: Repository) -> list[tuple[Entry, BackupRef]]:
    """Every complete backup of a repository as retention sees it, from one listing (and, for the
    local repository, the check records beside the artifacts). Backups whose manifest cannot be
    trusted are left out: they are kept for an operator, never deleted."""
    untrusted = repo.untrusted()
    return [(Entry(ref.key, ref.source, ref.group, ref.tier, ref.partition, ref.created, repo.verified(ref), ref.size),
             ref) for ref in repo.refs() if ref.key not in untrusted]


def prune_repository(repo: Repository, retention_days: dict[str, int], *, dry_run: bool, now: dt.datetime) -> dict:
    """Delete what `select` lets go: each backup with its manifest (first) and its check record."""
    pairs = entries(repo)
    lookup = {e.id: ref for e, ref in pairs}
    sel = select([e for e, _ in pairs], retention_days, now)
    present = {key for key, _ in repo.storage.list("")}
    files = freed = 0
    deleted, locked = [], {}
    for e in sel.delete:
        ref = lookup[e.id]
        path = repo.storage.local_path(ref.key)
        frees = path is None or path.stat().st_nlink == 1  # a hard-linked promotion frees nothing yet
        held = [] if dry_run else repo.delete(ref)
        if held:  # S3 Object Lock keeps it a little longer than retention: pruned on a run after this date
            locked[e.id.rsplit("/", 1)[-1]] = max(until for _k, until in held).isoformat()
            continue
        files += sum(1 for k in (ref.manifest_key, ref.key, ref.checks_key) if k in present)
        freed += ref.size if frees else 0
        deleted.append(e.id.rsplit("/", 1)[-1])
    return {"files": files, "backups": len(deleted), "bytes_freed": freed, "kept": len(sel.keep),
            "deleted": sorted(deleted), **({"locked_until": locked} if locked else {})}
