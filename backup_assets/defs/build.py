"""Everything Dagster knows, built from one catalog."""

from __future__ import annotations

import dagster as dg

from ..catalog import Catalog
from .assets import build_backup_assets
from .checks import build_backup_checks, build_dr_drill
from .restore_job import build_restore_job


def build_definitions(catalog: Catalog) -> dg.Definitions:
    dr_drill, dr_drill_schedule = build_dr_drill(catalog)
    return dg.Definitions(
        assets=[*build_backup_assets(catalog), dr_drill],
        asset_checks=build_backup_checks(catalog),
        schedules=[dr_drill_schedule],
        jobs=[build_restore_job(catalog)],
    )
