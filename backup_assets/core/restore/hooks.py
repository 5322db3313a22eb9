"""The runbooks' steps around a restore, as commands from the catalog (`sources.<name>.hooks`).

    pre_restore   stop the application; a failure aborts the restore before anything is touched
    post_restore  migrations, restart; run after the restore (also after a failed one, so the application
                  comes back on the data it had: BACKUP_ASSETS_RESTORE_OK says which)
    verify        a health check; run after a successful restore (and in drills against the scratch
                  database when `verify_in_drill` is set)

pre_restore and post_restore run only when the restore replaces the source's own database or file (they
manage the application that uses it); verify runs then, and against any other target when
`verify_in_drill` says the commands work on any target.

A command is a string (run by /bin/sh, so `cd /app && alembic upgrade head` works) or a list (run as
is). It gets the target in its environment: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD (never in
argv), PGSSLMODE, BACKUP_ASSETS_DATABASE_URL (without the password; libpq reads PGPASSWORD),
BACKUP_ASSETS_TARGET (database or file), BACKUP_ASSETS_SOURCE/_GROUP/_ENGINE/_ARTIFACT/_PARTITION,
BACKUP_ASSETS_HOOK (the stage), BACKUP_ASSETS_SAFETY_COPY, BACKUP_ASSETS_DRILL (1 in drills).
Each command has `timeout_s`; its output is logged line by line with secrets scrubbed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

from backup_assets.core.secrets import scrub

STAGES = ("pre_restore", "post_restore", "verify")
OUTPUT_TAIL_LINES = 20


@dataclass
class HookRun:
    stage: str
    command: str
    exit_code: int | None  # None: timed out or could not start
    seconds: float
    tail: list[str]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict:
        return {"stage": self.stage, "command": self.command, "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3), "ok": self.ok, "problem": self.problem}


def target_env(*, source: str, group: str, engine: str, artifact: str, partition: str, target: str,
               endpoint=None, safety_copy: str | None = None, drill: bool = False) -> dict[str, str]:
    """The environment a hook runs with (the process's own, minus any PG* settings, plus the target)."""
    if endpoint is not None:
        env = endpoint.child_env()
        env["BACKUP_ASSETS_DATABASE_URL"] = (
            f"postgresql://{quote(endpoint.user, safe='')}@{endpoint.host}:{endpoint.port}/{quote(endpoint.dbname, safe='')}")
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(BACKUP_ASSETS_SOURCE=source, BACKUP_ASSETS_GROUP=group, BACKUP_ASSETS_ENGINE=engine,
               BACKUP_ASSETS_ARTIFACT=artifact, BACKUP_ASSETS_PARTITION=partition, BACKUP_ASSETS_TARGET=target,
               BACKUP_ASSETS_SAFETY_COPY=safety_copy or "", BACKUP_ASSETS_DRILL="1" if drill else "0")
    return env


def _display(command) -> str:
    return command if isinstance(command, str) else " ".join(command)


def run_stage(stage: str, commands: list, env: dict[str, str], *, timeout_s: float, say,
              secrets: tuple[str | None, ...] = ()) -> list[HookRun]:
    """Run a stage's commands in order; stop at the first that fails. Returns what ran."""
    env = {**env, "BACKUP_ASSETS_HOOK": stage}
    hidden = tuple(s for s in (*secrets, env.get("PGPASSWORD")) if s)
    runs: list[HookRun] = []
    for command in commands:
        shown = scrub(_display(command), *hidden)
        say(f"{stage} hook: {shown}")
        run = _run_one(stage, command, shown, env, timeout_s=timeout_s, say=say, hidden=hidden)
        runs.append(run)
        if not run.ok:
            say(f"{stage} hook FAILED: {run.problem}")
            break
    return runs


def _run_one(stage: str, command, shown: str, env: dict[str, str], *, timeout_s: float, say,
             hidden: tuple[str, ...]) -> HookRun:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return HookRun(stage, shown, None, time.monotonic() - started, [],
                       f"{shown!r} could not start: {exc.strerror or exc}")
    tail: list[str] = []

    def pump() -> None:
        for raw in proc.stdout:
            line = scrub(raw.decode(errors="replace").rstrip("\n"), *hidden)
            say(f"{stage} | {line}")
            tail.append(line)
            del tail[:-OUTPUT_TAIL_LINES]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        return HookRun(stage, shown, None, time.monotonic() - started, tail,
                       f"{shown!r} did not finish within {timeout_s:g}s (killed)")
    reader.join(5)
    seconds = time.monotonic() - started
    if code != 0:
        last = f": {tail[-1]}" if tail else ""
        return HookRun(stage, shown, code, seconds, tail, f"{shown!r} exited with {code}{last}")
    return HookRun(stage, shown, code, seconds, tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the hook and whatever it started (it leads its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue
