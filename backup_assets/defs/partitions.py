"""Partitions per tier, in the catalog's timezone."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from backup_assets.catalog import WEEKDAYS, Catalog

HOURLY_FMT = "%Y-%m-%dT%H"

# dagster counts weekdays from Sunday = 0
DAGSTER_WEEKDAY = {day: (i + 1) % 7 for i, day in enumerate(WEEKDAYS)}


def partitions_for(catalog: Catalog, tier: str) -> dg.TimeWindowPartitionsDefinition:
    start = catalog.start_date.isoformat()
    tz = catalog.tier_timezone(tier)
    if tier == "hourly":
        # keys like 2026-12-02T03 (no colon: they are part of file and object names)
        return dg.HourlyPartitionsDefinition(start_date=f"{start}T00", fmt=HOURLY_FMT, timezone=tz)
    if tier == "daily":
        return dg.DailyPartitionsDefinition(start_date=start, timezone=tz)
    if tier == "weekly":
        # a week ends the day before the weekly run day: Monday runs back up Monday..Sunday
        day = DAGSTER_WEEKDAY[catalog.tier("weekly").day_of_week]
        return dg.WeeklyPartitionsDefinition(start_date=start, timezone=tz, day_offset=day)
    if tier == "monthly":
        return dg.MonthlyPartitionsDefinition(start_date=start, timezone=tz)
    raise ValueError(f"unknown tier {tier!r}")


# freshness per tier: (warn after, fail after)
FRESHNESS = {
    "hourly": (dt.timedelta(hours=2), dt.timedelta(hours=3)),
    "daily": (dt.timedelta(hours=26), dt.timedelta(hours=30)),
    "weekly": (dt.timedelta(days=7, hours=2), dt.timedelta(days=7, hours=6)),
    "monthly": (dt.timedelta(days=31, hours=2), dt.timedelta(days=32)),
}


def freshness_policy(tier: str) -> dg.FreshnessPolicy:
    warn, fail = FRESHNESS[tier]
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=warn)
