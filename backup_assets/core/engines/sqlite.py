"""SQLite: consistent online copies, integrity checks and row counts.

The copy uses SQLite's online backup API in a single step, so it is one consistent snapshot even
while another process keeps writing (in WAL mode writers are not blocked). The copy must pass
`PRAGMA integrity_check` before it counts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from backup_assets.core import BackupError

BUSY_TIMEOUT_MS = 30_000


def open_readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)


def online_copy(source: Path, dest: Path, *, what: str = "") -> None:
    if not source.is_file():
        raise BackupError(f"{what}SQLite file {source} does not exist")
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            src.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst, pages=-1)
                # the copy is one self-contained file: no -wal/-shm beside it
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{what}cannot copy SQLite file {source}: {exc}") from None


# what a store's header says about it, beside its tables: an application may rely on each (WAL mode for
# concurrent readers, user_version for its schema migrations, application_id to recognise its file)
FILE_SETTINGS = ("journal_mode", "page_size", "auto_vacuum", "user_version", "application_id", "encoding")
# PRAGMA names cannot be bound as parameters: each statement is spelled out, values are integers
_READ_SETTING = {"journal_mode": "PRAGMA journal_mode", "page_size": "PRAGMA page_size",
                 "auto_vacuum": "PRAGMA auto_vacuum", "user_version": "PRAGMA user_version",
                 "application_id": "PRAGMA application_id", "encoding": "PRAGMA encoding"}
_WRITE_SETTING = {"user_version": "PRAGMA user_version = %d", "application_id": "PRAGMA application_id = %d"}


def file_settings(path: Path) -> dict:
    """The store's file settings. journal_mode says "wal" or the rollback mode a new connection gets
    (only WAL is kept in the file: "delete", "truncate" and "persist" are per connection)."""
    conn = open_readonly(path)
    try:
        conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        return {name: conn.execute(_READ_SETTING[name]).fetchone()[0] for name in FILE_SETTINGS}
    finally:
        conn.close()


def file_settings_or_none(path: Path) -> dict | None:
    """file_settings, or None for a file that is missing or unreadable (the copy then says what is wrong)."""
    try:
        return file_settings(path) if path.is_file() else None
    except sqlite3.DatabaseError:
        return None


def _kept(settings: dict) -> dict:
    """The settings a file keeps (journal mode: WAL or not)."""
    return {k: (v == "wal" if k == "journal_mode" else v) for k, v in settings.items() if k in FILE_SETTINGS}


def apply_file_settings(path: Path, settings: dict) -> list[str]:
    """Give a restored copy the store's settings (online_copy leaves the artifact in rollback-journal
    mode so it is one self-contained file); returns the settings that still differ, one line each."""
    if settings:
        conn = sqlite3.connect(path)
        try:
            if settings.get("journal_mode") == "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            for name, statement in _WRITE_SETTING.items():
                if name in settings:
                    conn.execute(statement % int(settings[name]))
            conn.commit()
        finally:
            conn.close()
    return settings_differences(path, settings)


def settings_differences(path: Path, settings: dict) -> list[str]:
    if not settings:
        return []
    want, got = _kept(settings), _kept(file_settings(path))
    return [f"SQLite {k} is {got.get(k)!r} after the restore, the store had {want[k]!r}"
            for k in sorted(want) if got.get(k) != want[k]]


def remove_with_sidecars(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def integrity_problems(path: Path) -> list[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if rows == ["ok"] else rows


def tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()]


def quote_ident(name: str) -> str:
    """A SQLite identifier, double-quoted with quotes doubled (the names come from the file)."""
    return '"' + name.replace('"', '""') + '"'


def row_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: conn.execute("SELECT count(*) FROM " + quote_ident(t)).fetchone()[0] for t in tables(conn)}
    finally:
        conn.close()


def indexes(path: Path) -> list[dict[str, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [{"table": t, "name": n, "method": "btree", "definition": s or ""}
                for n, t, s in conn.execute(
                    "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")]
    finally:
        conn.close()


def check_copy(path: Path, expected_tables: list[str] | None, *, what: str = "") -> dict[str, int]:
    """integrity_check, expected tables present; returns the per-table row counts."""
    try:
        problems = integrity_problems(path)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{what}{path} is not a readable SQLite database: {exc}") from None
    if problems:
        raise BackupError(f"{what}integrity_check failed on {path}: {'; '.join(problems[:5])}")
    counts = row_counts(path)
    missing = [t for t in (expected_tables or []) if t not in counts]
    if missing:
        raise BackupError(f"{what}table(s) missing in {path}: {', '.join(missing)}")
    return counts


def sqlite_version() -> str:
    return sqlite3.sqlite_version
