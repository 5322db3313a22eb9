"""The restore log: an append-only record of every restore, in the repository, whoever started it.

`<repository>/restores.jsonl` gets a line when a restore starts (before anything is touched: a restore
whose start cannot be recorded does not run) and one when it ends: when, who and from where (the CLI's
user and host, or the Dagster run), source, backup, target, tables, safety copy, outcome. Pruning Dagster's
run history never touches it; `backup-assets restores` shows it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from pathlib import Path

from backup_assets.core import BackupError
from backup_assets.core.secrets import scrub

LOG_NAME = "restores.jsonl"


def cli_origin() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"via": "cli", "user": user, "host": socket.gethostname(), "pid": os.getpid()}


def run_origin(run_id: str) -> dict:
    return {"via": "dagster", "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}


def log_path(root: Path) -> Path:
    return Path(root) / LOG_NAME


def record(root: Path, entry: dict) -> None:
    """Append one line (whole, in one write, fsynced). Raises BackupError naming the file when it cannot."""
    path = log_path(root)
    line = json.dumps({"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry},
                      sort_keys=True, default=str) + "\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a host restoring from S3 may have no repository yet
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BackupError(f"the restore log {path} cannot be written: {exc.strerror or exc}") from None


def read(root: Path) -> list[dict]:
    """Every entry, oldest first (a torn last line, from a crash mid-write, is skipped)."""
    try:
        text = log_path(root).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class RestoreAudit:
    """The two lines of one restore: `start()` before anything is touched, `end()` afterwards."""

    def __init__(self, root: Path, origin: dict | None, **what):
        self.root = root
        self.base = {**(origin or cli_origin()), **what}

    def start(self) -> None:
        record(self.root, {**self.base, "event": "started"})

    def end(self, *, outcome: str, error: str | None = None, **extra) -> str | None:
        """Record how it ended; returns a warning when that line cannot be written (the restore is done)."""
        try:
            record(self.root, {**self.base, **extra, "event": "finished", "outcome": outcome,
                               **({"error": scrub(error)} if error else {})})
        except BackupError as exc:
            return str(exc)
        return None
