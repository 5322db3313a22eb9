"""The catalog: what is backed up, where to, and on which tiers.

One YAML file, validated once into pydantic models. Every error names the file, the key and the
problem in one line, so a typo in production fails `dagster definitions validate` instead of a
3 a.m. backup.

Values may reference environment variables as ``${NAME}`` or ``${NAME:-default}``; the password
itself is never written here, only the *name* of the variable that holds it (``password_env``).

The parts: common.py (rules and the base model), sources.py, settings.py, model.py (the whole catalog),
load.py (reading it)."""

from backup_assets.catalog.common import (TIER_NAMES, DEFAULT_TIERS, GLOBALS_GROUP, IDENT, WEEKDAYS, HOURLY_TIME,
                                          DEFAULT_RETENTION, ENV_REF, CatalogError)  # noqa: F401
from backup_assets.catalog.sources import (PostgresConnection, TableGroup, PruneRule, Encryption, HookCommand, Hooks,
                                           RestoreSettings, Pitr, Source)  # noqa: F401
from backup_assets.catalog.settings import (ObjectLock, TierConfig, DrDrillConfig, Repository, S3Replication, GCSReplication, AzureReplication,
                                            REPLICA_KINDS, REPLICA_LABELS, ReplicaSettings, SlackAlerts,
                                            EmailAlerts, WebhookAlerts, Alerts, Metrics, Replication)  # noqa: F401
from backup_assets.catalog.model import AUTO_STREAM_CPUS, Catalog  # noqa: F401
from backup_assets.catalog.load import (parse_catalog, load_catalog, DEMO_CATALOG, PROJECT_ROOT, demo_home, demo_env,
                                        catalog_from_env)  # noqa: F401
