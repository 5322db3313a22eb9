"""A source in the catalog: its connection (the password only by the name of its variable), table groups, pruning
rules, encryption, hooks, restore settings and physical tier."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from backup_assets.catalog.common import CatalogError, GLOBALS_GROUP, IDENT, TIER_NAMES, _Model, _table_name


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
    # parallel pg_restore jobs of restores and drills of archives of 64 MiB and more (smaller ones: one job); the
    # CLI's --jobs and the job's config override it. A parallel restore that fails is tried once more serially
    # (PostgreSQL itself races on some schemas)
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
    # when `connection` is a hot standby (backups read there, so the primary is not loaded): the primary,
    # for what a standby cannot do (restores, pruning old rows, switching and archiving the WAL a base
    # backup ends in)
    primary: PostgresConnection | None = None
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
            for field in ("connection", "primary", "groups", "pg_bin_dir", "drill_server", "globals", "wal_rpo_seconds",
                          "pitr"):
                if getattr(self, field) is not None:
                    raise ValueError(f"'{field}' belongs to postgres sources")
            if self.prune:
                raise ValueError("'prune' rules are supported for postgres sources only")
        return self

    def written(self) -> PostgresConnection:
        """The server this source's database is written on (restored into, pruned): its primary when its
        backups are read from a standby."""
        return self.primary or self.connection

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
