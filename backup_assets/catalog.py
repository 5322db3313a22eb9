"""The catalog: what is backed up, where to, and on which tiers.

One YAML file, validated once into pydantic models. Every error names the file, the key and the
problem in one line, so a typo in production fails `dagster definitions validate` instead of a
3 a.m. backup.

Values may reference environment variables as ``${NAME}`` or ``${NAME:-default}``; the password
itself is never written here, only the *name* of the variable that holds it (``password_env``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class TierConfig(_Model):
    enabled: bool = True
    time: str = "03:00"
    timezone: str | None = None
    retention_days: Annotated[int, Field(ge=1)] = 7
    # weekly runs on this weekday, monthly on this day of the month
    day_of_week: Literal[WEEKDAYS] = "monday"  # type: ignore[valid-type]
    day_of_month: Annotated[int, Field(ge=1, le=28)] = 1
    # restore drills: run the `restore_drill` check on every partition of this tier
    drill: bool | None = None

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value)
        if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
            raise ValueError(f"bad time {value!r}: expected HH:MM between 00:00 and 23:59")
        return f"{int(match.group(1)):02d}:{match.group(2)}"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        if value is not None:
            _check_timezone(value)
        return value

    @property
    def hour(self) -> int:
        return int(self.time.split(":")[0])

    @property
    def minute(self) -> int:
        return int(self.time.split(":")[1])


def _check_timezone(value: str) -> None:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r}") from None


class PostgresConnection(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 5432
    dbname: str
    user: str = "postgres"
    password_env: str | None = None
    # TLS: up to verify-full (checks the server's certificate against sslrootcert and its name)
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: str | None = None  # CA bundle that signed the server's certificate

    @model_validator(mode="after")
    def _tls(self) -> "PostgresConnection":
        if self.sslmode in ("verify-ca", "verify-full") and not self.sslrootcert:
            raise ValueError(f"sslmode {self.sslmode} needs sslrootcert (the CA that signed the server's certificate)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("password", "passwd", "pass", "dsn", "url"):
                if key in data:
                    raise ValueError(
                        f"'{key}' is not allowed: write the password into an environment variable "
                        "and name that variable in password_env"
                    )
        return data

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(IDENT, value):
            raise ValueError(
                "password_env must be the NAME of an environment variable (letters, digits, _), "
                "not the password itself"
            )
        return value

    def password(self) -> str | None:
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise CatalogError(f"environment variable {self.password_env} (password_env) is not set")
        return value


def _table_name(value: Any) -> str:
    """A table in the catalog: `table`, `schema.table`, a quoted form (`billing."Order Items"`) or a
    `{schema, table}` mapping; kept in the one canonical text form (see core.names)."""
    try:
        return str(TableName.of(value))
    except NameError_ as exc:
        raise ValueError(f"bad table name {value!r}: {exc}") from None


class TableGroup(_Model):
    description: str | None = None
    # None: the whole database
    tables: list[str] | None = None

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, value: Any) -> list[str] | None:
        if value is not None:
            if not isinstance(value, list):
                raise ValueError("'tables' must be a list of table names")
            if not value:
                raise ValueError("a table group needs at least one table (leave 'tables' out for the whole database)")
            names = [_table_name(t) for t in value]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"table(s) listed twice: {', '.join(dupes)}")
            return names
        return value


class PruneRule(_Model):
    table: str
    timestamp_column: str
    days: Annotated[int, Field(ge=1)]
    # rows are pruned only once the backup of this group has passed a restore drill
    verified_by_group: str = "core"
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5_000

    @field_validator("table", mode="before")
    @classmethod
    def _table(cls, value: Any) -> str:
        return _table_name(value)

    @field_validator("timestamp_column")
    @classmethod
    def _column(cls, value: str) -> str:
        # a column name is used as one exact identifier (psycopg.sql.Identifier), whatever it holds
        if not value or "\x00" in value or len(value.encode()) > 63:
            raise ValueError(f"bad column name {value!r}")
        return value


class Encryption(_Model):
    """age encryption at rest: public recipients only; the identity (private key) is read from the
    file whose path is in the environment variable `identity_file_env`, when plaintext is needed."""

    recipients: list[str]
    identity_file_env: str | None = None

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        from backup_assets.core.crypto import parse_recipient

        if not value:
            raise ValueError("name at least one recipient (an age1... or ssh-ed25519 public key)")
        for i, r in enumerate(value):
            try:
                parse_recipient(r)
            except ValueError as exc:
                raise ValueError(f"recipient [{i}]: {exc}") from None  # never echoed: it may be a pasted secret
        return [r.strip() for r in value]

    @field_validator("identity_file_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(IDENT, value):
            raise ValueError("identity_file_env must be the NAME of an environment variable holding the path of "
                             "an identity file, not the key itself")
        return value


HookCommand = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class Hooks(_Model):
    """Commands around a restore (see core.restore.hooks): stop the application, migrate and restart it,
    check its health. The target's details come in the environment, the password never in argv."""

    pre_restore: list[HookCommand] = []
    post_restore: list[HookCommand] = []
    verify: list[HookCommand] = []
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 300
    # the verify commands work against any database or file (the drill's scratch target too)
    verify_in_drill: bool = False


class RestoreSettings(_Model):
    # the `restore` job (launchpad, schedules) may replace a source's own database or file only when this is set;
    # restores into another database or file stay available. The CLI asks for confirmation instead.
    allow_in_place_from_ui: bool = False
    # the `restore` job may restore without keeping the replaced data (safety_copy: false) only when this is set
    allow_no_safety_copy_from_ui: bool = False
    # parallel pg_restore jobs of restores and drills (the CLI's --jobs and the job's config override it); a
    # parallel restore that fails is tried once more serially (PostgreSQL itself races on some schemas)
    jobs: Annotated[int, Field(ge=1, le=64)] = 2


class Pitr(_Model):
    """The physical tier of a PostgreSQL server: base backups as a daily asset, the WAL archive
    (`wal-push`) between them, restore to any time in the window. One source per server enables it: a base
    backup and the WAL are the whole cluster's."""
    # a full base backup when the newest full one is this old; incremental ones in between where the server
    # can take them (PostgreSQL 17+ with summarize_wal = on); incremental: false takes a full one every day
    full_every_days: Annotated[int, Field(ge=1)] = 7
    incremental: bool = True
    # restore to any time in the last N days: the newest base backup older than that and everything after
    # it are kept (with the incremental ones' chains and the WAL from the oldest kept one); older ones go
    retention_days: Annotated[int, Field(ge=1)] = 14
    # the pitr_drill check: restore to a random committed time in the window into a scratch cluster
    drill: bool = True
    # the OS user the scratch cluster runs as when backup-assets runs as root (PostgreSQL refuses root)
    run_as: str | None = None
    # with replication.s3: base backups and WAL are replicated by the base_backup_s3 asset (daily, after the base
    # backup); wal_push_s3 also puts every segment on S3 before wal-push succeeds (an off-site recovery point of
    # archive_timeout; the server's environment then needs the S3 credentials)
    s3: bool = True
    wal_push_s3: bool = False

    @field_validator("run_as")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None  # "${SERVER_USER:-}" left empty


class Source(_Model):
    engine: Literal["postgres", "sqlite"]
    description: str | None = None
    owners: list[str] = []
    # PostgreSQL
    connection: PostgresConnection | None = None
    pg_bin_dir: str | None = None
    groups: dict[str, TableGroup] | None = None
    drill_server: PostgresConnection | None = None
    prune: list[PruneRule] = []
    # the server's roles, memberships and database grants, as the group `globals` (default: on)
    globals: bool | None = None
    # overrides the catalog's encryption for this source
    encryption: Encryption | None = None
    # SQLite
    path: str | None = None
    tables: list[str] | None = None
    # both
    tiers: list[Literal[TIER_NAMES]] | None = None  # type: ignore[valid-type]
    pool: str | None = None
    hooks: Hooks = Hooks()
    # point-in-time recovery (postgres): alert when the WAL archive's newest segment is older than this
    # (the recovery point objective; with archive_timeout = 60, 120 is a sensible value)
    wal_rpo_seconds: Annotated[int, Field(ge=1)] | None = None
    # base backups as assets and their checks (needs archive_command = wal-push on the server)
    pitr: Pitr | None = None

    @model_validator(mode="after")
    def _engine_fields(self) -> "Source":
        if self.engine == "postgres":
            if self.connection is None:
                raise ValueError("a postgres source needs 'connection'")
            if not self.groups:
                raise ValueError("missing table group: a postgres source needs 'groups' with at least one group")
            for name in self.groups:
                if not re.fullmatch(IDENT, name):
                    raise ValueError(f"bad group name {name!r}: letters, digits and _ only")
                if name == GLOBALS_GROUP:
                    raise ValueError(f"group name {name!r} is reserved for the roles backup (set globals: false "
                                     "to leave roles out)")
            for field in ("path", "tables"):
                if getattr(self, field) is not None:
                    raise ValueError(f"'{field}' belongs to sqlite sources; postgres sources use 'groups'")
            for rule in self.prune:
                if rule.verified_by_group not in self.groups:
                    raise ValueError(
                        f"prune rule for {rule.table!r} names unknown table group {rule.verified_by_group!r}"
                    )
        else:
            if not self.path:
                raise ValueError("a sqlite source needs 'path'")
            for field in ("connection", "groups", "pg_bin_dir", "drill_server", "globals", "wal_rpo_seconds", "pitr"):
                if getattr(self, field) is not None:
                    raise ValueError(f"'{field}' belongs to postgres sources")
            if self.prune:
                raise ValueError("'prune' rules are supported for postgres sources only")
        return self

    def group_names(self) -> list[str]:
        if self.engine == "sqlite":
            return ["full"]
        return list(self.groups) + ([GLOBALS_GROUP] if self.globals is not False else [])

    def group_tables(self, group: str) -> list[str] | None:
        """The tables of a group (None: the whole database; [] for the roles backup)."""
        if self.engine == "sqlite":
            return self.tables
        if group == GLOBALS_GROUP:
            return []
        return self.groups[group].tables

    def pool_name(self) -> str:
        if self.pool:
            return self.pool
        if self.engine == "postgres":
            return re.sub(r"[^A-Za-z0-9_]", "_", f"pg_{self.connection.host}_{self.connection.port}")
        return re.sub(r"[^A-Za-z0-9_]", "_", f"sqlite_{Path(self.path).name}")


class DrDrillConfig(_Model):
    enabled: bool = True
    # monthly by default: 05:00 on the 1st, after the night's backups
    cron: str = "0 5 1 * *"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9*/,\-]+|[A-Za-z]{3}(-[A-Za-z]{3})?", f) for f in fields):
            raise ValueError(f"bad cron schedule {value!r}: expected five fields like '0 5 1 * *'")
        return value


class Repository(_Model):
    root: str


class S3Replication(_Model):
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    # AWS, Cloudflare R2, MinIO... (None: AWS itself)
    endpoint_url: str | None = None
    # CA bundle to verify an https endpoint's certificate (default: the system's)
    ca_bundle: str | None = None
    # names of the environment variables with the credentials (None: boto3's default chain)
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    sse: Literal["AES256", "aws:kms", "none"] = "AES256"
    kms_key_id: str | None = None
    storage_class: str = "STANDARD"
    part_size_mb: Annotated[int, Field(ge=5, le=5120)] = 64
    # per tier; a tier left out keeps the tier's own retention_days
    retention_days: dict[Literal[TIER_NAMES], Annotated[int, Field(ge=1)]] = {}  # type: ignore[valid-type]
    # every replica is downloaded and hashed (proven by its bytes) at least this often, by the maintenance
    # job's replica_audit (0: never; the per-replication check then compares S3's own checksums only)
    deep_verify_days: Annotated[int, Field(ge=0)] = 7
    # at most this many replicas downloaded per audit run, the longest unproven first (None: all that are due)
    deep_verify_per_run: Annotated[int, Field(ge=1)] | None = None

    @field_validator("access_key_id_env", "secret_access_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(IDENT, value):
            raise ValueError("must be the NAME of an environment variable, not the secret itself")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("access_key_id", "secret_access_key", "aws_secret_access_key", "aws_access_key_id"):
                if key in data:
                    raise ValueError(f"'{key}' is not allowed: name an environment variable in {key}_env instead")
            if data.get("endpoint_url") == "":
                data = {**data, "endpoint_url": None}
        return data

    @model_validator(mode="after")
    def _kms(self) -> "S3Replication":
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("sse 'aws:kms' needs kms_key_id")
        return self

    def credentials(self) -> dict[str, str]:
        out = {}
        for env_field, arg in (("access_key_id_env", "aws_access_key_id"), ("secret_access_key_env", "aws_secret_access_key")):
            name = getattr(self, env_field)
            if name:
                value = os.environ.get(name)
                if value is None:
                    raise CatalogError(f"environment variable {name} ({env_field}) is not set")
                out[arg] = value
        return out


class SlackAlerts(_Model):
    token_env: str
    channel: str
    # a stand-in for https://slack.com/api/ (tests, proxies)
    base_url: str | None = None


class EmailAlerts(_Model):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    starttls: bool = True
    # CA bundle to verify the server's certificate (default: the system's)
    ca_file: str | None = None
    username: str | None = None
    password_env: str | None = None
    sender: str
    recipients: list[str]

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("'password' is not allowed: name an environment variable in password_env")
        return data


class WebhookAlerts(_Model):
    url: str
    # HMAC-SHA256 of the body in X-Backup-Assets-Signature, with the secret from this variable
    hmac_secret_env: str | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 10


class Alerts(_Model):
    dagster_url: str = "http://127.0.0.1:3000"
    # one alert per failing asset and cause per window
    window_minutes: Annotated[int, Field(ge=0)] = 60
    sensor_interval_seconds: Annotated[int, Field(ge=5)] = 30
    disk_free_min_gb: Annotated[float, Field(ge=0)] = 10
    disk_free_min_percent: Annotated[float, Field(ge=0, le=100)] | None = None
    slack: SlackAlerts | None = None
    email: EmailAlerts | None = None
    webhook: WebhookAlerts | None = None


class Metrics(_Model):
    # node_exporter textfile the backup_health asset writes (default: <repository>/metrics/backup_assets.prom)
    textfile: str | None = None


class Replication(_Model):
    s3: S3Replication | None = None


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
        if where == "s3" and self.replication.s3 and tier in self.replication.s3.retention_days:
            return self.replication.s3.retention_days[tier]
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


def _interpolate(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def repl(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise CatalogError(f"{where}: environment variable {name} is not set")

        return ENV_REF.sub(repl, value)
    return value


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith("function-") or item in ("literal['postgres','sqlite']",):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if kind == "literal_error":
        msg = f"{msg}, got {error.get('input')!r}"
    return msg


def parse_catalog(data: Any, *, source_name: str = "<catalog>", env: dict[str, str] | None = None) -> Catalog:
    environ = dict(os.environ)
    if env:
        environ = {**env, **environ}
    if not isinstance(data, dict):
        raise CatalogError(f"{source_name}: the catalog must be a mapping with 'repository' and 'sources'")
    try:
        data = _interpolate(data, environ, "")
    except CatalogError as exc:
        raise CatalogError(f"{source_name}: {exc}") from None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # the engine decides which fields apply: report a bad engine before anything it implies
        for err in exc.errors():
            if err["loc"][-1:] == ("engine",):
                first = err
                break
        key = _location(first["loc"])
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise CatalogError(f"{source_name}: {key}: {_message(first)}{more}") from None
    return catalog


def load_catalog(path: str | os.PathLike, *, env: dict[str, str] | None = None) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror}") from None
    try:
        # libyaml's loader when PyYAML has it: a fleet's catalog is read by every process that loads
        # the definitions (the pure-Python one took a tenth of that time for 100 sources)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CatalogError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    catalog = parse_catalog(data, source_name=str(path), env=env)
    return catalog.model_copy(update={"catalog_path": str(path.resolve())})


DEMO_CATALOG = Path(__file__).parent / "demo" / "catalog.yaml"


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def demo_home() -> Path:
    """BACKUP_ASSETS_DEMO_HOME, else the project's .demo (the same from any directory)."""
    return Path(os.environ.get("BACKUP_ASSETS_DEMO_HOME") or (PROJECT_ROOT / ".demo")).resolve()


def demo_env(home: Path | None = None) -> dict[str, str]:
    """The demo's settings kept in <demo home>/secrets.env (0600), e.g. its database password."""
    path = (home or demo_home()) / "secrets.env"
    env: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return env
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(IDENT, name.strip()):
            env[name.strip()] = value
    return env


def catalog_from_env() -> Catalog:
    """The catalog named by BACKUP_ASSETS_CATALOG, else the packaged demo catalog (whose settings,
    such as its database password, come from the demo's secrets.env when the environment lacks them)."""
    path = os.environ.get("BACKUP_ASSETS_CATALOG")
    if path:
        return load_catalog(path)
    home = demo_home()
    for name, value in demo_env(home).items():
        os.environ.setdefault(name, value)
    return load_catalog(DEMO_CATALOG, env={"BACKUP_ASSETS_DEMO_HOME": str(home)})
