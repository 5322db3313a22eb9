"""Partition keys from the command line, checked against the tier's partitions before anything runs.

A key is an hour (YYYY-MM-DDTHH) for hourly partitions, else a date (YYYY-MM-DD): for daily partitions any day, for weekly ones the first day of the
week (the weekly run day of the catalog), for monthly ones the 1st; never before the catalog's
start_date, never a window that has not ended yet. No key is a pattern: `*` is refused like any
other bad value.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

from backup_assets.catalog import WEEKDAYS, Catalog

KEY = re.compile(r"\d{4}-\d{2}-\d{2}")
HOUR_KEY = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}")


class BadPartition(ValueError):
    """A partition key that is not one of the tier's; the message names value and valid range."""


def first_day(catalog: Catalog, tier: str, day: dt.date) -> dt.date:
    if tier == "weekly":
        weekday = WEEKDAYS.index(catalog.tier("weekly").day_of_week)
        return day - dt.timedelta(days=(day.weekday() - weekday) % 7)
    if tier == "monthly":
        return day.replace(day=1)
    return day


def first_partition(catalog: Catalog, tier: str) -> dt.date:
    day = first_day(catalog, tier, catalog.start_date)
    if day < catalog.start_date:
        day = (day + dt.timedelta(days=7)) if tier == "weekly" else (day + dt.timedelta(days=32)).replace(day=1)
    return day


def last_complete(catalog: Catalog, tier: str, now: dt.datetime | None = None) -> dt.date:
    """The newest partition whose window has ended (what a schedule backs up now)."""
    today = (now or dt.datetime.now(dt.timezone.utc)).astimezone(ZoneInfo(catalog.tier_timezone(tier))).date()
    current = first_day(catalog, tier, today)
    if tier == "daily":
        return current - dt.timedelta(days=1)
    if tier == "weekly":
        return current - dt.timedelta(days=7)
    return (current - dt.timedelta(days=1)).replace(day=1)


def last_complete_hour(catalog: Catalog, now: dt.datetime | None = None) -> dt.datetime:
    """The newest hourly partition whose hour has ended (local to the tier's timezone, naive)."""
    local = (now or dt.datetime.now(dt.timezone.utc)).astimezone(ZoneInfo(catalog.tier_timezone("hourly")))
    return local.replace(minute=0, second=0, microsecond=0, tzinfo=None) - dt.timedelta(hours=1)


def _validate_hour(catalog: Catalog, key: str, now: dt.datetime | None) -> str:
    first, last = f"{catalog.start_date.isoformat()}T00", last_complete_hour(catalog, now).strftime("%Y-%m-%dT%H")
    ranges = f"hourly partitions run from {first} to {last}"
    if not isinstance(key, str) or not HOUR_KEY.fullmatch(key):
        raise BadPartition(f"partition {key!r} is not an hour (YYYY-MM-DDTHH); {ranges}")
    try:
        hour = dt.datetime.strptime(key, "%Y-%m-%dT%H")
    except ValueError:
        raise BadPartition(f"partition {key!r} is not a valid hour; {ranges}") from None
    if hour.date() < catalog.start_date:
        raise BadPartition(f"partition {key!r} is before the first hourly partition {first}; {ranges}")
    if hour > last_complete_hour(catalog, now):
        raise BadPartition(f"partition {key!r} is not an hourly partition (its hour has not ended yet); {ranges}")
    return key


def validate(catalog: Catalog, tier: str | None, key: str, *, now: dt.datetime | None = None) -> str:
    """The key when it is a partition of `tier` (of any tier when None); else BadPartition."""
    if tier == "hourly" or (tier is None and isinstance(key, str) and HOUR_KEY.fullmatch(key)):
        return _validate_hour(catalog, key, now)
    tiers = [tier] if tier else [t for t in catalog.tiers if t != "hourly"]
    ranges = "; ".join(f"{t} partitions run from {first_partition(catalog, t)} to {last_complete(catalog, t, now)}"
                       for t in tiers)
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise BadPartition(f"partition {key!r} is not a date (YYYY-MM-DD); {ranges}")
    try:
        day = dt.date.fromisoformat(key)
    except ValueError:
        raise BadPartition(f"partition {key!r} is not a valid date; {ranges}") from None
    problems = []
    for t in tiers:
        if day < first_partition(catalog, t):
            problems.append(f"before the first {t} partition {first_partition(catalog, t)}")
        elif first_day(catalog, t, day) != day:
            start = "the 1st of a month" if t == "monthly" else f"a {catalog.tier('weekly').day_of_week}"
            problems.append(f"{t} partitions start on {start}")
        elif day > last_complete(catalog, t, now):
            problems.append(f"its {t} window has not ended yet")
        else:
            return key
    raise BadPartition(f"partition {key!r} is not a {tier or 'backup'} partition ({'; '.join(sorted(set(problems)))}); "
                       f"{ranges}")
