"""What the forkserver of a tier job imports once, before it forks the run's step processes.

Dagster preloads the definitions' module there by itself. A step (one server's backups) then still
imported, in each forked process, everything its first backup needs: the instance's storage classes
(for PostgreSQL storage: dagster-postgres, SQLAlchemy, psycopg2; about 1 s of CPU on a small machine), the
core's backup, checks and replicas (the cloud SDKs), before its first dump. Imported here, it is done once
per run, while the forkserver starts, and every step process shares it (copy on write).

Only modules are imported: nothing is connected, opened or started here (the steps are forked from this
process). A module that cannot be imported (a job loaded from elsewhere, without the catalog's variable)
is left for the step to import, and fail on, itself: the forkserver never fails for it.
"""

from __future__ import annotations

import importlib
import os

# what every step imports before its first backup: the definitions' module (what Dagster preloads by
# itself when this is not set), then what defs/tier_op.py's run_tier and _follow_up_steps import
STEP_MODULES = (
    "backup_assets.definitions",
    "backup_assets.core.backup.take",
    "backup_assets.core.backup.head_start",
    "backup_assets.core.verify.checks",
    "backup_assets.core.replica",
    "psycopg",
)


def instance_modules(home: str | None) -> list[str]:
    """The modules of the storage, run launcher, coordinator... classes $DAGSTER_HOME/dagster.yaml names."""
    if not home:
        return []
    from dagster._core.instance.ref import InstanceRef  # read only: the names of the classes, none built

    ref = InstanceRef.from_dir(home)
    names = [getattr(ref, field) for field in ref._fields]
    found = [data.module_name for data in names if hasattr(data, "module_name")]
    if "dagster_postgres" in found:
        found.append("psycopg2")  # SQLAlchemy imports its driver when the first engine is built
    return list(dict.fromkeys(found))


def preload() -> list[str]:
    """Import what the steps will need; returns the modules that could not be imported."""
    missing = []
    try:
        wanted = [*STEP_MODULES, *instance_modules(os.environ.get("DAGSTER_HOME"))]
    except Exception:  # an instance the step cannot load either: it says so itself
        wanted = list(STEP_MODULES)
    for name in wanted:
        try:
            importlib.import_module(name)
        except Exception:
            missing.append(name)
    return missing


preload()
