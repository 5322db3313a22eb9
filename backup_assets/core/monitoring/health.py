"""Backup health: per source, group and tier the newest good backup, its age against the RPO,
the last drill's RTO and the size trend; disk space and the storage forecast (the Miyabi
runbook's 30-day estimate)."""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, field
from typing import Any

from backup_assets.catalog import Catalog
from backup_assets.core.artifact import human_size
from backup_assets.core.backup.take import repository_for
from backup_assets.core.repository import verified_by
from backup_assets.core.verify.records import read_status


@dataclass
class TierHealth:
    source: str
    group: str
    tier: str
    newest_good: str | None
    age_h: float | None
    rpo_h: float
    rpo_ok: bool
    last_rto_s: float | None
    sizes: list[int]
    # the newest good backup's manifest, the checks of the newest backup (good or not), how many are kept
    newest: Any = None
    latest_checks: dict = field(default_factory=dict)
    count: int = 0
    snapshot_at: dt.datetime | None = None

    @property
    def trend(self) -> str:
        if len(self.sizes) < 2 or not self.sizes[-2]:
            return "—"
        return f"{(self.sizes[-1] - self.sizes[-2]) / self.sizes[-2]:+.0%}"


def disk_status(catalog: Catalog) -> dict:
    root = catalog.repository_root
    probe = root if root.exists() else next(p for p in root.parents if p.exists())
    usage = shutil.disk_usage(probe)
    free_pct = 100 * usage.free / usage.total if usage.total else 0.0
    low = usage.free < catalog.alerts.disk_free_min_gb * 1024**3 or (
        catalog.alerts.disk_free_min_percent is not None and free_pct < catalog.alerts.disk_free_min_percent)
    return {"path": str(probe), "free_bytes": usage.free, "total_bytes": usage.total,
            "free_percent": round(free_pct, 1), "low": low}


def report(catalog: Catalog, now: dt.datetime | None = None) -> tuple[list[TierHealth], dict]:
    now = now or dt.datetime.now(dt.timezone.utc)
    repo = repository_for(catalog)
    backups = repo.backups()
    rows = []
    for source, group, tier in catalog.backup_targets():
        mine = [b for b in backups if (b.manifest.source, b.manifest.group, b.manifest.tier) == (source, group, tier)]
        mine.sort(key=lambda b: b.manifest.timestamp)
        statuses = [read_status(b) for b in mine]
        good = [b for b, status in zip(mine, statuses) if verified_by(status)]
        newest = good[-1] if good else None
        snap = dt.datetime.fromisoformat(newest.manifest.snapshot_at or newest.manifest.timestamp) if newest else None
        age = (now - snap).total_seconds() / 3600 if snap else None
        rpo = catalog.rpo_hours.get(tier, 26)
        rtos = [s.get("restore_drill", {}).get("rto_s") for s in statuses]
        rtos = [r for r in rtos if r is not None]
        rows.append(TierHealth(source, group, tier, newest.manifest.partition if newest else None,
                               round(age, 1) if age is not None else None, rpo, age is not None and age <= rpo,
                               rtos[-1] if rtos else None, [b.manifest.size_bytes for b in mine[-7:]],
                               newest.manifest if newest else None, _latest_per_check(statuses), len(mine), snap))
    # the runbook's estimate: what the daily tier adds over 30 days at today's size
    daily_sizes = {}
    for b in backups:
        if b.manifest.tier == "daily":
            daily_sizes[(b.manifest.source, b.manifest.group)] = b.manifest.size_bytes
    disk = disk_status(catalog)
    on_disk = sum(p.stat().st_size for p in repo.root.rglob("*") if p.is_file()) if repo.root.exists() else 0
    forecast = {
        "safety_copies": _safety_copies(catalog),
        "repository_bytes": on_disk,
        "daily_bytes": sum(daily_sizes.values()),
        "estimated_30_day_bytes": sum(daily_sizes.values()) * 30,
        "days_until_full": round(disk["free_bytes"] / sum(daily_sizes.values()), 1) if daily_sizes and sum(daily_sizes.values()) else None,
        "disk": disk,
    }
    return rows, forecast


def _latest_per_check(statuses: list[dict]) -> dict:
    """Each check's outcome on the newest backup it ran on (statuses oldest first)."""
    latest: dict = {}
    for status in statuses:
        latest.update({name: outcome for name, outcome in status.items() if isinstance(outcome, dict)})
    return latest


def _safety_copies(catalog: Catalog) -> list[dict] | str:
    """The copies restores kept (databases, schemas, files): they hold old data and take space."""
    from backup_assets.core import BackupError
    from backup_assets.core.doctor import safety_copies

    try:
        return [{"kind": c.kind, "where": c.where, "name": c.name, "age_days": c.age_days}
                for c in safety_copies(catalog)]
    except BackupError as exc:
        return f"not checked: {exc}"


def markdown(rows: list[TierHealth], forecast: dict) -> str:
    lines = ["| source | group | tier | newest good | age (h) | RPO (h) | RPO met | last RTO (s) | size | trend |",
             "|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.source} | {r.group} | {r.tier} | {r.newest_good or '—'} | "
                     f"{r.age_h if r.age_h is not None else '—'} | {r.rpo_h:g} | {'yes' if r.rpo_ok else 'NO'} | "
                     f"{r.last_rto_s if r.last_rto_s is not None else '—'} | "
                     f"{human_size(r.sizes[-1]) if r.sizes else '—'} | {r.trend} |")
    disk = forecast["disk"]
    lines += ["", f"Repository: {human_size(forecast['repository_bytes'])}; daily backups add "
                  f"{human_size(forecast['daily_bytes'])} a day, about {human_size(forecast['estimated_30_day_bytes'])} "
                  f"in 30 days. Disk free: {human_size(disk['free_bytes'])} ({disk['free_percent']}%)"
                  + (f", full in about {forecast['days_until_full']} days." if forecast["days_until_full"] else ".")]
    copies = forecast.get("safety_copies")
    if isinstance(copies, str):
        lines += ["", f"Safety copies: {copies}"]
    elif copies:
        lines += ["", f"Safety copies kept by restores ({len(copies)}; drop with `backup-assets safety-copies drop`):"]
        lines += [f"- {c['kind']} {c['name']} on {c['where']}, {c['age_days']} days old" for c in copies]
    return "\n".join(lines)
