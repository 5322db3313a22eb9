"""A run launcher that can tell when a run's worker process has died.

Dagster's DefaultRunLauncher cannot answer run monitoring's health check, so a run whose worker
is killed (kill -9, OOM, a reboot) stays STARTED forever and nobody is alerted. This launcher is
the default one plus that answer: the worker's pid is in the run's "Started process for run"
engine event; when the worker ran on this machine and that process is gone, the run is reported
FAILED, run monitoring marks it failed within its poll interval and the run-failure sensor alerts.
Workers on other machines (a remote code server) are left to their own launcher: UNKNOWN.
A run of `backup-assets backup` (in the command's process) is answered from its owner tag.
"""

from __future__ import annotations

import json
import os
import socket

from dagster import DagsterEventType, DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}


class LocalRunLauncher(DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        from backup_assets.defs import cli_runs

        alive = cli_runs.owner_alive(run)  # a `backup-assets backup` run: its command's process is the worker
        if alive is not None:
            return (CheckRunHealthResult(WorkerStatus.RUNNING) if alive else
                    CheckRunHealthResult(WorkerStatus.FAILED, cli_runs.dead_owner_message(run)))
        host = json.loads(run.tags.get(GRPC_INFO_TAG, "{}")).get("host")
        if host not in LOCAL_HOSTS and "socket" not in json.loads(run.tags.get(GRPC_INFO_TAG, "{}")):
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"run worker on another host ({host})")
        pid = None
        for record in self._instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
            data = record.dagster_event.event_specific_data if record.dagster_event else None
            value = (getattr(data, "metadata", None) or {}).get("pid")
            if value is not None and "Started process for run" in (record.dagster_event.message or ""):
                pid = int(value.value)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "the run worker has not reported its pid yet")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone (killed or crashed)")
        except PermissionError:
            pass
        return CheckRunHealthResult(WorkerStatus.RUNNING)
