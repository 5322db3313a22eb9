"""The restore job destroys only what the catalog allows (the webserver has no login).

A run of the `restore` job may not replace any catalog source's database or file (not only the restored
backup's own), compared as the server and the file system see them (a symlinked folder or `..` names the
same file), nor restore without a safety copy, unless the catalog opts in. The CLI sees a restore through a
symlinked path as in place too, so its hooks run.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import dagster as dg

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.definitions import build_definitions

from .conftest import clone_db, pg_source

P = "2026-11-20"


def _run(catalog, config: dict):
    job = build_definitions(catalog).resolve_job_def("restore")
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    failures = [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
    return result.success, failures[0] if failures else ""


def _store(path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])


def _rows(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM t").fetchone()[0]


def test_the_job_replaces_no_source_of_the_catalog_and_keeps_safety_copies(pg18, myloware_db, write_catalog, tmp_path):
    crm = clone_db(pg18, f"{myloware_db[:40]}_crm")
    real = tmp_path / "real" / "stores"
    _store(real / "a.db", 3)
    _store(real / "b.db", 5)
    (tmp_path / "link").symlink_to(real)
    catalog = write_catalog({
        "app": pg_source(pg18, myloware_db, groups={"full": {}}),
        "crm": pg_source(pg18, crm, groups={"full": {}}),
        "a": {"engine": "sqlite", "path": str(tmp_path / "link" / "a.db"), "tables": ["t"]},
        "b": {"engine": "sqlite", "path": str(real / "b.db"), "tables": ["t"]},
    }, start_date="2026-10-01")
    run_backup(catalog, "app", "full", "daily", P)
    run_backup(catalog, "a", "full", "daily", P)
    with pg18.connect(crm) as conn:
        conn.execute("CREATE TABLE crm_only (id int)")
    # another source's database on the same server
    ok, why = _run(catalog, {"source": "app", "group": "full", "target_database": crm, "confirm": True,
                             "terminate_connections": True})
    assert not ok and f"refusing to replace database {crm}, source crm's database in the catalog" in why, why
    with pg18.connect(crm) as conn:
        assert conn.execute("SELECT to_regclass('crm_only') IS NOT NULL").fetchone()[0]
    # no safety copy from the UI
    ok, why = _run(catalog, {"source": "app", "group": "full", "target_database": f"{myloware_db[:40]}_new",
                             "confirm": True, "safety_copy": False})
    assert not ok and "refusing safety_copy: false" in why, why
    # another source's file, named through `..`, and the own file named by its real path (the catalog's goes
    # through a symlinked folder)
    for target, owner in ((str(real / "x" / ".." / "b.db"), "source b's"), (str(real / "a.db"), "its own")):
        ok, why = _run(catalog, {"source": "a", "group": "full", "target_file": target, "confirm": True})
        assert not ok and f"{owner} file in the catalog" in why, (target, why)
    assert _rows(real / "b.db") == 5 and _rows(real / "a.db") == 3
    # a file no source backs up is allowed
    ok, why = _run(catalog, {"source": "a", "group": "full", "target_file": str(tmp_path / "copy.db"), "confirm": True})
    assert ok, why
    assert _rows(tmp_path / "copy.db") == 3


def test_the_cli_sees_a_restore_through_a_symlinked_path_as_in_place(write_catalog, tmp_path):
    real = tmp_path / "real"
    _store(real / "a.db", 3)
    (tmp_path / "link").symlink_to(real)
    marker = tmp_path / "pre_restore_ran"
    catalog = write_catalog({"a": {"engine": "sqlite", "path": str(tmp_path / "link" / "a.db"), "tables": ["t"],
                                   "hooks": {"pre_restore": [f"touch {marker}"]}}})
    run_backup(catalog, "a", "full", "daily", P)
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "a", "--group", "full",
                 "--target-file", str(real / "a.db"), "--confirm"]) == 0
    assert marker.exists()  # in place: the hook that stops the application ran
    assert (tmp_path / "link").is_symlink() and _rows(tmp_path / "link" / "a.db") == 3


def test_every_restore_is_in_the_restore_log_and_run_pruning_keeps_restore_runs(write_catalog, tmp_path, capsys):
    import json
    import socket

    from backup_assets.defs.hygiene import prune_runs

    _store(tmp_path / "a.db", 3)
    catalog = write_catalog({"a": {"engine": "sqlite", "path": str(tmp_path / "a.db"), "tables": ["t"]}})
    run_backup(catalog, "a", "full", "daily", P)
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "a", "--group", "full", "--confirm"]) == 0
    instance = dg.DagsterInstance.ephemeral()
    job = build_definitions(catalog).resolve_job_def("restore")
    for config in ({"source": "a", "group": "full", "target_file": str(tmp_path / "copy.db"), "confirm": True},
                   {"source": "a", "group": "full", "confirm": True}):  # the second: its own file, refused
        job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}}, instance=instance,
                               raise_on_error=False)
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "restores", "--json"]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [(e["via"], e["event"], e.get("outcome")) for e in log] == [
        ("cli", "started", None), ("cli", "finished", "ok"),
        ("dagster", "started", None), ("dagster", "finished", "ok"), ("dagster", "refused", "refused")]
    assert log[0]["host"] == socket.gethostname() and log[0]["target"] == f"file {tmp_path / 'a.db'}"
    assert log[1]["safety_copy_kept"].startswith(str(tmp_path / "a.db.before-restore-"))
    runs = {r.run_id for r in instance.get_runs()}
    assert {e["run_id"] for e in log if e["via"] == "dagster"} == runs
    # pruning everything (older than 0 days) keeps the restore runs unless asked
    tomorrow = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    report = prune_runs(instance, older_than_days=0, dry_run=False, now=tomorrow)
    assert report["deleted"] == 0 and report["kept_restore_runs"] == 2
    assert {r.run_id for r in instance.get_runs()} == runs
    report = prune_runs(instance, older_than_days=0, dry_run=False, include_restores=True, now=tomorrow)
    assert report["deleted"] == 2 and not instance.get_runs()
    assert main(["--catalog", catalog.catalog_path, "restores"]) == 0
    assert "refused" in capsys.readouterr().out  # the log outlives the runs
