"""Everything Dagster knows, built from one catalog."""

from __future__ import annotations

import dagster as dg

from ..catalog import Catalog
from .assets import build_backup_assets


def build_definitions(catalog: Catalog) -> dg.Definitions:
    return dg.Definitions(assets=build_backup_assets(catalog))
