"""One `daily_backups` partition run launched through the queued run coordinator and executed by a real
`dagster-daemon` (shared by the daemon-run and fleet-run benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def daemon_run(instance, env: dict, partition: str, *, job: str = "daily_backups", timeout_s: float = 1800):
    """Start dagster-daemon, submit the job's partition with `dagster job launch`, wait for the run to end.
    Returns (run record, seconds the submitting command took beyond the run itself)."""
    bin_dir = Path(sys.executable).parent
    workspace = str(ROOT / "workspace.yaml")
    daemon = subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-w", workspace], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not instance.get_daemon_heartbeats() and time.monotonic() < deadline:
            time.sleep(0.5)
        run_id = str(uuid.uuid4())
        started = time.perf_counter()
        launch = subprocess.run([str(bin_dir / "dagster"), "job", "launch", "-w", workspace, "-j", job, "--run-id",
                                 run_id, "--tags", json.dumps({"dagster/partition": partition})],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        if launch.returncode != 0:
            raise RuntimeError(f"dagster job launch failed: {launch.stderr.strip()[-2000:]}")
        while True:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                break
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"the daemon-launched run did not finish in {timeout_s:g}s")
            if daemon.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited ({daemon.returncode}) before the run ended")
            time.sleep(0.2)
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait()
    if not run.is_success:
        raise RuntimeError(f"daemon-launched run {run_id} ended {run.status}")
    record = instance.get_run_record_by_id(run_id)
    # from the moment the run is queued (what a schedule tick does inside the daemon) to its end; the
    # `dagster job launch` process that submits it here is not part of it
    wall = record.end_time - record.create_timestamp.timestamp()
    return record, time.perf_counter() - started - wall
