"""Who owns a temporary thing, and whether that owner is still alive.

Every temporary thing we make (a partial artifact, a scratch folder, a scratch database, the
swap state of a restore) carries an owner marker: host, process id and the process's start time.
The next operation of any kind removes the things whose owner is dead, at once, and never one
whose owner is alive: a pid alone is not enough (pids are reused), the start time tells a reused
pid apart. A thing made on another host is only removed once it is older than `FOREIGN_AGE_S`,
since we cannot see that host's processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import time
from dataclasses import dataclass

FOREIGN_AGE_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: fields start after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: int

    @classmethod
    def me(cls) -> "Owner":
        return cls(_host_tag(), os.getpid(), _start_ticks(os.getpid()) or 0)

    @property
    def token(self) -> str:
        """The marker as a file-name part: host-pid-start."""
        return f"{self.host}-{self.pid}-{self.start}"

    @classmethod
    def from_token(cls, token: str) -> "Owner | None":
        parts = token.split("-")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def to_json(self) -> dict:
        return {"host": self.host, "pid": self.pid, "start": self.start,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    @classmethod
    def from_json(cls, data: dict) -> "Owner | None":
        try:
            return cls(str(data["host"]), int(data["pid"]), int(data.get("start", 0)))
        except (KeyError, TypeError, ValueError):
            return None

    def is_alive(self, *, age_s: float | None = None) -> bool:
        """Alive: same host and the same process still runs. On another host, alive until the
        thing is older than FOREIGN_AGE_S (or when its age is unknown)."""
        if self.host != _host_tag():
            return age_s is None or age_s < FOREIGN_AGE_S
        start = _start_ticks(self.pid)
        if start is None:
            return False
        return self.start == 0 or start == self.start


def age_of(path) -> float | None:
    try:
        return time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
