"""Runs started by `backup-assets backup`: in the command's own process, outside any code location.

Such a run carries who runs it (host, pid, process start time: the owner marker the scratch files
carry) and which repository it backs up. When that process dies (kill -9, OOM, a closed terminal)
the run would stay STARTED forever: nothing launched it, so no launcher knows its worker. The run
launcher's health check (run monitoring in the daemon), `backup-assets doctor` and the next
`backup-assets backup` read the owner tag and mark a dead owner's run FAILURE; the
`cli_run_failure_alerts` sensor and the command itself alert it.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from backup_assets.catalog import Catalog
from backup_assets.core.owner import Owner

TRIGGER_TAG = "backup_assets/trigger"
OWNER_TAG = "backup_assets/owner"
REPOSITORY_TAG = "backup_assets/repository"


def repository_id(catalog: Catalog) -> str:
    """The repository a run backs up into, as a tag value: a digest of its real path."""
    return hashlib.sha256(str(catalog.repository_root.resolve()).encode()).hexdigest()[:16]


def run_tags(catalog: Catalog) -> dict[str, str]:
    return {TRIGGER_TAG: "cli", OWNER_TAG: json.dumps(Owner.me().to_json(), sort_keys=True),
            REPOSITORY_TAG: repository_id(catalog)}


def owner_alive(run) -> bool | None:
    """Whether the process that runs this command-line run is alive; None: not a command-line run."""
    raw = run.tags.get(OWNER_TAG)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    from backup_assets.core.engines.pg_databases import marker_owner_alive

    return marker_owner_alive(data)


def dead_owner_message(run) -> str:
    data = json.loads(run.tags[OWNER_TAG])
    return (f"the backup-assets command that ran it (pid {data.get('pid')}, started {data.get('created')}) is gone: "
            "killed or crashed mid-run; nothing it wrote counts as a backup")


def fail_dead_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Mark FAILURE every unfinished command-line run whose process is gone; returns them."""
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
            tags={TRIGGER_TAG: "cli"})):
        if owner_alive(run) is False:
            current = instance.get_run_by_id(run.run_id)
            if current is not None and not current.is_finished:
                instance.report_run_failed(current, dead_owner_message(current))
                failed.append(current)
    return failed
