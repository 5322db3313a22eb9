"""One `daily_backups` partition run launched through the queued run coordinator and executed by a real
`dagster-daemon` (shared by the daemon-run and fleet-run benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ProcessTree(threading.Thread):
    """Samples, every `interval` seconds, every process below `pid` (the daemon, its code server, the run
    worker, its step processes, their pg_dump and zstd): each one's own CPU seconds (not its children's) and
    when it started. A process's CPU after its last sample is missed (at most `interval` each)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.seen: dict[int, dict] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        entry = self.seen.setdefault(proc.pid, {"name": proc.name(), "cmdline": " ".join(proc.cmdline()),
                                                                "started": proc.create_time()})
                        entry["cpu_s"] = cpu.user + cpu.system
                except psutil.Error:
                    continue
            self._halt.wait(self.interval)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join()
        return list(self.seen.values())


def daemon_run(instance, env: dict, partition: str, *, job: str = "daily_backups", timeout_s: float = 1800,
               watch: bool = False):
    """Start dagster-daemon, submit the job's partition with `dagster job launch`, wait for the run to end.
    Returns (run record, seconds the submitting command took beyond the run itself); with `watch`, also
    the processes below the daemon while the run went (ProcessTree)."""
    bin_dir = Path(sys.executable).parent
    workspace = str(ROOT / "workspace.yaml")
    daemon = subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-w", workspace], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not instance.get_daemon_heartbeats() and time.monotonic() < deadline:
            time.sleep(0.5)
        run_id = str(uuid.uuid4())
        tree = ProcessTree(daemon.pid) if watch else None
        if tree:
            tree.start()
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
        try:
            processes = tree.stop() if tree else None
        finally:  # the daemon never outlives the bench
            os.killpg(daemon.pid, 15)
            daemon.wait()
    if not run.is_success:
        raise RuntimeError(f"daemon-launched run {run_id} ended {run.status}")
    record = instance.get_run_record_by_id(run_id)
    # from the moment the run is queued (what a schedule tick does inside the daemon) to its end; the
    # `dagster job launch` process that submits it here is not part of it
    wall = record.end_time - record.create_timestamp.timestamp()
    if watch:
        return record, time.perf_counter() - started - wall, processes
    return record, time.perf_counter() - started - wall
