"""The one merge point: Dagster loads `defs` from here (see workspace.yaml)."""

from backup_assets.catalog import catalog_from_env
from backup_assets.defs.build import build_definitions

defs = build_definitions(catalog_from_env())
