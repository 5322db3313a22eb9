"""The whole catalog as one validated model, with the questions every part asks of it (which tiers, which
retention, which encryption for a source, which sources have a physical tier)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from backup_assets.catalog.common import DEFAULT_RETENTION, DEFAULT_TIERS, HOURLY_TIME, IDENT, TIER_NAMES, _Model, _check_timezone
from backup_assets.catalog.settings import Alerts, DrDrillConfig, Metrics, Replication, Repository, TierConfig
from backup_assets.catalog.sources import Encryption, RestoreSettings, Source


AUTO_STREAM_CPUS = 4


class Catalog(_Model):
    repository: Repository
    timezone: str = "UTC"
    start_date: dt.date = dt.date(2026, 1, 1)
    tiers: dict[str, TierConfig] = Field(default_factory=dict, validate_default=True)
    sources: dict[str, Source]
    size_anomaly_threshold: Annotated[float, Field(gt=0)] = 0.5
    # read a PostgreSQL dump's checks from its stream while it is written (a process beside the
    # dump) instead of reading the artifact again afterwards; "auto": when this machine has at
    # least AUTO_STREAM_CPUS cores (on fewer, the dump itself needs them and afterwards is faster)
    checks_while_writing: Literal["auto"] | bool = "auto"
    dr_drill: DrDrillConfig = DrDrillConfig()
    replication: Replication = Replication()
    alerts: Alerts = Alerts()
    encryption: Encryption | None = None
    restore: RestoreSettings = RestoreSettings()
    metrics: Metrics = Metrics()
    # backup-health: how old the newest good backup of a tier may be (recovery point objective)
    rpo_hours: dict[Literal[TIER_NAMES], Annotated[float, Field(gt=0)]] = {  # type: ignore[valid-type]
        "hourly": 2, "daily": 26, "weekly": 7 * 24 + 2, "monthly": 31 * 24 + 2}
    # set by the loader, not by the file
    catalog_path: str | None = None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        _check_timezone(value)
        return value

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_defaults(cls, value: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {}
        for name, cfg in value.items():
            if name not in TIER_NAMES:
                raise ValueError(f"unknown tier {name!r} (expected one of {', '.join(TIER_NAMES)})")
            cfg = dict(cfg or {})
            cfg.setdefault("retention_days", DEFAULT_RETENTION[name])
            cfg.setdefault("drill", name in ("weekly", "monthly"))
            if name == "hourly":
                cfg.setdefault("time", HOURLY_TIME)
            merged[name] = cfg
        for name in TIER_NAMES:
            merged.setdefault(name, {"retention_days": DEFAULT_RETENTION[name], "drill": name in ("weekly", "monthly"),
                                     **({"time": HOURLY_TIME} if name == "hourly" else {})})
        return merged

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, Source]) -> dict[str, Source]:
        if not value:
            raise ValueError("at least one source is needed")
        for name in value:
            if not re.fullmatch(IDENT, name):
                raise ValueError(f"bad source name {name!r}: letters, digits and _ only")
        servers: dict[tuple, str] = {}
        for name, src in value.items():
            if src.pitr is None:
                continue
            server = (src.connection.host, src.connection.port)
            if server in servers:
                raise ValueError(f"sources {servers[server]!r} and {name!r} both enable pitr on "
                                 f"{server[0]}:{server[1]}: a base backup and the WAL archive are the whole "
                                 "server's, enable it on one source per server")
            servers[server] = name
        return value

    # -- derived views ------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return Path(self.catalog_path).parent if self.catalog_path else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def repository_root(self) -> Path:
        return self.resolve_path(self.repository.root)

    def encryption_for(self, source: str) -> Encryption | None:
        src = self.sources.get(source)
        return (src.encryption if src is not None and src.encryption is not None else None) or self.encryption

    def tier(self, name: str) -> TierConfig:
        return self.tiers[name]

    def retention_days(self, tier: str, where: str = "local") -> int:
        replica = self.replication.replicas().get(where)
        if replica is not None and tier in replica.retention_days:
            return replica.retention_days[tier]
        return self.tiers[tier].retention_days

    def tier_timezone(self, name: str) -> str:
        return self.tiers[name].timezone or self.timezone

    def source_tiers(self, source: str) -> list[str]:
        src = self.sources[source]
        wanted = src.tiers if src.tiers is not None else list(DEFAULT_TIERS)
        return [t for t in TIER_NAMES if t in wanted and self.tiers[t].enabled]

    def pitr_sources(self) -> list[str]:
        return [name for name, src in self.sources.items() if src.pitr is not None]

    def backup_targets(self) -> list[tuple[str, str, str]]:
        """Every (source, group, tier) that becomes a backup asset."""
        return [
            (source, group, tier)
            for source, src in self.sources.items()
            for group in src.group_names()
            for tier in self.source_tiers(source)
        ]
