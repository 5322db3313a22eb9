"""SQLite backups: consistent online copies while another process writes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from backup_assets.core import BackupError
from backup_assets.core.artifact import open_decompressed, sha256_file
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository

from .test_backup_postgres import materialize

WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30)
conn.execute("PRAGMA journal_mode=WAL")
print("ready", flush=True)
n = 0
deadline = time.time() + 60
while time.time() < deadline:
    with conn:
        conn.execute("INSERT INTO execution_runs (agent, status, started_at, output) VALUES ('W', 'running', datetime('now'), hex(randomblob(200)))")
        rid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        conn.execute("INSERT INTO checkpoints (run_id, step, state, created_at) VALUES (?, 1, randomblob(300), datetime('now'))", (rid,))
    n += 1
"""


def sqlite_catalog(write_catalog, path, tables=("execution_runs", "checkpoints", "worktrees")):
    return write_catalog({"miyabi": {"engine": "sqlite", "path": str(path), "tables": list(tables)}})


def decompress(artifact, dest):
    with open_decompressed(artifact) as reader, open(dest, "wb") as out:
        while chunk := reader.read(1 << 20):
            out.write(chunk)
    return dest


def test_sqlite_backup_is_consistent_under_a_concurrent_writer(miyabi_db, write_catalog, tmp_path):
    catalog = sqlite_catalog(write_catalog, miyabi_db)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(miyabi_db)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        result = materialize(catalog, "miyabi/full/daily", "2026-11-20")
        assert result.success
        time.sleep(0.3)
        assert writer.poll() is None, "the writer must still be running: the backup must not block it"
    finally:
        writer.kill()
        writer.wait()
    backup = LocalRepository(catalog.repository_root).latest("miyabi", "full", "daily")
    m = backup.manifest
    assert backup.artifact_path.parent == catalog.repository_root / "sqlite" / "daily"
    assert backup.artifact_path.name.startswith("miyabi-full-2026-11-20-") and backup.artifact_path.name.endswith(".db.zst")
    assert m.sha256 == sha256_file(backup.artifact_path) and m.format == "sqlite"
    copy = decompress(backup.artifact_path, tmp_path / "copy.db")
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    got = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in m.row_counts}
    assert got == m.row_counts
    # one snapshot: every checkpoint's run is in the copy, and the writer got further afterwards
    assert conn.execute("SELECT count(*) FROM checkpoints c LEFT JOIN execution_runs r ON r.id = c.run_id "
                        "WHERE r.id IS NULL").fetchone()[0] == 0
    assert m.row_counts["execution_runs"] > 300
    live = sqlite3.connect(miyabi_db).execute("SELECT count(*) FROM execution_runs").fetchone()[0]
    assert live > m.row_counts["execution_runs"]
    assert any(i["name"] == "execution_runs_started_at" for i in m.indexes)


def test_missing_sqlite_file_is_a_clear_error(write_catalog, tmp_path):
    catalog = sqlite_catalog(write_catalog, tmp_path / "data" / "absent.db")
    with pytest.raises(BackupError, match=r"source 'miyabi' group 'full': SQLite file .*absent.db does not exist"):
        run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    assert not list(catalog.repository_root.rglob("*.zst"))
    assert not (tmp_path / "data" / "absent.db").exists()


def test_missing_expected_table_fails_and_leaves_nothing(miyabi_db, write_catalog):
    catalog = sqlite_catalog(write_catalog, miyabi_db, tables=("execution_runs", "sessions"))
    with pytest.raises(BackupError, match=r"table\(s\) missing in .*: sessions"):
        run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    assert not [p for p in catalog.repository_root.rglob("*") if p.is_file()]


def test_corrupt_sqlite_file_never_counts(write_catalog, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 1000)
    catalog = sqlite_catalog(write_catalog, bad, tables=())
    with pytest.raises(BackupError, match="source 'miyabi'"):
        run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    assert not list(catalog.repository_root.rglob("*.meta"))


def test_weekly_sqlite_promotes_the_sunday_daily(miyabi_db, write_catalog):
    catalog = sqlite_catalog(write_catalog, miyabi_db)
    assert materialize(catalog, "miyabi/full/daily", "2026-11-15").success
    assert materialize(catalog, "miyabi/full/weekly", "2026-11-09").success
    repo = LocalRepository(catalog.repository_root)
    weekly = repo.latest("miyabi", "full", "weekly")
    assert weekly.manifest.promoted_from.startswith("sqlite/daily/miyabi-full-2026-11-15-")
