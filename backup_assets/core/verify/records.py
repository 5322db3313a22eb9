"""The last outcome of each check, kept beside the artifact as `<artifact>.checks.json`.

The manifest is written once by the backup; check outcomes change over time, so they live in a
file of their own. The CLI's `list`, restore's choice of "the newest backup that verifies",
retention and table pruning read it without Dagster.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from backup_assets.core.artifact import write_json_atomic
from backup_assets.core.repository import CHECKS_SUFFIX, StoredBackup, verified_by


def checks_path(backup: StoredBackup) -> Path:
    return backup.artifact_path.with_name(backup.artifact_path.name + CHECKS_SUFFIX)


def read_status(backup: StoredBackup) -> dict[str, dict]:
    try:
        data = json.loads(checks_path(backup).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(backup: StoredBackup, check: str, passed: bool, message: str, metadata: dict | None = None) -> None:
    record_outcomes(backup, {check: (passed, message, metadata)})


def record_outcomes(backup: StoredBackup, outcomes: dict[str, tuple[bool, str, dict | None]]) -> None:
    """Record the outcomes of several checks of a backup ({check: (passed, message, metadata)})
    in one write of its `.checks.json`."""
    status = read_status(backup)
    at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for check, (passed, message, metadata) in outcomes.items():
        status[check] = {
            "passed": passed,
            "at": at,
            "message": message,
            # the drill's time and where it went (`backup --timings`, the metrics)
            **{k: metadata[k] for k in ("rto_s", "phases_s") if metadata and k in metadata},
        }
    write_json_atomic(checks_path(backup), status)


def summary(backup: StoredBackup) -> str:
    """'ok', 'FAILED: check', or 'unknown' for a backup nobody has checked yet."""
    status = read_status(backup)
    if not status:
        return "unknown"
    failed = sorted(name for name, s in status.items() if not s.get("passed") and name != "size_anomaly")
    if failed:
        return "FAILED: " + ", ".join(failed)
    return "drilled" if status.get("restore_drill", {}).get("passed") else "ok"


def is_verified(backup: StoredBackup) -> bool:
    """Intact and readable by its last checks, and no blocking check failed."""
    return verified_by(read_status(backup))


def passed_drill(backup: StoredBackup) -> bool:
    return bool(read_status(backup).get("restore_drill", {}).get("passed")) and is_verified(backup)
