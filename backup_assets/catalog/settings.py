"""The catalog's settings beside its sources: tiers, the DR drill, the repository, S3 replication, alert channels
and metrics."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from backup_assets.catalog.common import CatalogError, IDENT, TIER_NAMES, WEEKDAYS, _Model, _check_timezone


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


class ObjectLock(_Model):
    """S3 Object Lock on every replicated object: it cannot be deleted or overwritten, with the backup host's own
    credentials, before its tier's retention would prune it anyway (plus a margin). The bucket must have Object
    Lock enabled. governance: an account with s3:BypassGovernanceRetention can still remove it; compliance: nobody
    can, not even the root account, until the date."""
    mode: Literal["governance", "compliance"]
    margin_days: Annotated[float, Field(ge=0)] = 1


def refuse_inline(data: Any, keys: dict[str, str]) -> Any:
    """A secret written into the catalog (each key, with the setting that names its environment variable instead)
    is refused in one line, before anything else is read."""
    if isinstance(data, dict):
        for key, instead in keys.items():
            if key in data:
                raise ValueError(f"'{key}' is not allowed: name an environment variable in {instead} instead")
    return data


def _env_name_only(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(IDENT, value):
        raise ValueError("must be the NAME of an environment variable, not the secret itself")
    return value


def _from_env(name: str | None, field: str) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if value is None:
        raise CatalogError(f"environment variable {name} ({field}) is not set")
    return value


class ReplicaSettings(_Model):
    """What every replica (S3, Google Cloud Storage, Azure Blob Storage) has: where under its bucket or container
    the repository's keys go, how long each tier is kept there, and how often its copies are proven by their bytes."""
    prefix: str = ""
    # per tier; a tier left out keeps the tier's own retention_days
    retention_days: dict[Literal[TIER_NAMES], Annotated[int, Field(ge=1)]] = {}  # type: ignore[valid-type]
    # every replica is downloaded and hashed (proven by its bytes) at least this often, by the maintenance
    # job's replica_audit (0: never; the per-replication check then compares the storage's own checksums only)
    deep_verify_days: Annotated[int, Field(ge=0)] = 7
    # at most this many replicas downloaded per audit run, the longest unproven first (None: all that are due)
    deep_verify_per_run: Annotated[int, Field(ge=1)] | None = None


class _Retrying(ReplicaSettings):
    # how long a failing request (an endpoint that is gone, a throttled one) is retried before the step fails
    retry_s: Annotated[float, Field(gt=0, le=3600)] = 30


class S3Replication(ReplicaSettings):
    bucket: str
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
    # immutable replicas (S3 Object Lock); None: objects can be deleted by whoever holds the credentials
    object_lock: ObjectLock | None = None

    @field_validator("access_key_id_env", "secret_access_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return _env_name_only(value)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        data = refuse_inline(data, {"access_key_id": "access_key_id_env", "aws_access_key_id": "access_key_id_env",
                                    "secret_access_key": "secret_access_key_env",
                                    "aws_secret_access_key": "secret_access_key_env"})
        if isinstance(data, dict):
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
            value = _from_env(getattr(self, env_field), env_field)
            if value is not None:
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
        return refuse_inline(data, {"password": "password_env"})


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


class GCSReplication(_Retrying):
    """Google Cloud Storage. Credentials: the service-account key file whose PATH is in the environment variable
    `credentials_file_env`, else Application Default Credentials; `anonymous` only for an emulator."""
    bucket: str
    project: str | None = None
    # a private endpoint or an emulator (None: https://storage.googleapis.com)
    endpoint_url: str | None = None
    credentials_file_env: str | None = None
    anonymous: bool = False
    storage_class: str | None = None
    # resumable uploads send the object in chunks of this size (a multiple of 256 KiB)
    part_size_mb: Annotated[int, Field(ge=1, le=1024)] = 32

    @field_validator("credentials_file_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return _env_name_only(value)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        return refuse_inline(data, dict.fromkeys(("credentials", "credentials_file", "private_key",
                                                  "service_account_json"), "credentials_file_env"))

    def credentials_file(self) -> str | None:
        return _from_env(self.credentials_file_env, "credentials_file_env")


class AzureReplication(_Retrying):
    """Azure Blob Storage. Credentials, by environment variable name: a connection string, or the account key (the
    account is the first label of `account_url`, or the path's first part on an emulator), or a SAS token."""
    container: str
    # https://<account>.blob.core.windows.net, or an emulator's http://127.0.0.1:10000/<account>
    account_url: str | None = None
    connection_string_env: str | None = None
    account_key_env: str | None = None
    sas_token_env: str | None = None
    access_tier: Literal["Hot", "Cool", "Cold", "Archive"] | None = None
    # uploads go in blocks of this size, each checked by its MD5 on arrival; an object up to it in one request
    block_size_mb: Annotated[int, Field(ge=1, le=4000)] = 32

    @field_validator("connection_string_env", "account_key_env", "sas_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return _env_name_only(value)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        return refuse_inline(data, {"connection_string": "connection_string_env", "account_key": "account_key_env",
                                    "sas_token": "sas_token_env", "credential": "account_key_env or sas_token_env"})

    @model_validator(mode="after")
    def _how(self) -> "AzureReplication":
        if self.connection_string_env is None and self.account_url is None:
            raise ValueError("needs account_url (with account_key_env or sas_token_env) or connection_string_env")
        if self.connection_string_env is None and self.account_key_env is None and self.sas_token_env is None:
            raise ValueError("needs one of connection_string_env, account_key_env, sas_token_env")
        return self

    def account_name(self) -> str:
        from urllib.parse import urlsplit

        url = urlsplit(self.account_url or "")
        host = url.hostname or ""
        if host in ("127.0.0.1", "localhost") or host.replace(".", "").isdigit():
            return url.path.strip("/").split("/")[0]
        return host.split(".")[0]


REPLICA_KINDS = ("s3", "gcs", "azure")
REPLICA_LABELS = {"s3": "S3", "gcs": "GCS", "azure": "Azure"}  # as messages name them


class Replication(_Model):
    s3: S3Replication | None = None
    gcs: GCSReplication | None = None
    azure: AzureReplication | None = None

    def replicas(self) -> dict[str, ReplicaSettings]:
        """Every configured replica by its name (its kind), in a fixed order: s3, gcs, azure."""
        return {name: getattr(self, name) for name in REPLICA_KINDS if getattr(self, name) is not None}
