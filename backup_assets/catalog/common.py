"""What every part of the catalog shares: the tiers, weekday and identifier rules, the error every problem
becomes, and the strict base model (unknown keys are errors)."""

from __future__ import annotations

import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict

from backup_assets.core.names import NameError_, TableName


TIER_NAMES = ("hourly", "daily", "weekly", "monthly")


# tiers a source has when it lists none: hourly is opt-in per source (`tiers: [hourly, daily, ...]`)
DEFAULT_TIERS = ("daily", "weekly", "monthly")


GLOBALS_GROUP = "globals"


IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# the hourly tier runs at this minute past every hour (the minute of its `time`) unless set
HOURLY_TIME = "00:15"


DEFAULT_RETENTION = {"hourly": 2, "daily": 7, "weekly": 28, "monthly": 180}


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names file, key and problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_timezone(value: str) -> None:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r}") from None


def _table_name(value: Any) -> str:
    """A table in the catalog: `table`, `schema.table`, a quoted form (`billing."Order Items"`) or a
    `{schema, table}` mapping; kept in the one canonical text form (see core.names)."""
    try:
        return str(TableName.of(value))
    except NameError_ as exc:
        raise ValueError(f"bad table name {value!r}: {exc}") from None
