"""The scratch folder fills up: checks and drills fail as checks (recorded, named), a restore says in one
line where space ran out, and nothing else is harmed. The repository sits on a small tmpfs mounted here
(as root): a backup of highly compressible rows fits, its decoded copy for the checks does not."""

from __future__ import annotations

import json
import os
import subprocess

import dagster as dg
import pytest

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key

from .conftest import alert_config, pg_source

P = "2026-11-20"


@pytest.fixture
def small_volume(tmp_path):
    volume = tmp_path / "small"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(volume)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    yield volume
    subprocess.run(["umount", "-l", str(volume)], check=False)


@pytest.fixture
def roomy_db(pg18):
    """A database whose dump is small compressed (~100 KiB) and large decoded (~40 MiB), and a tiny table."""
    name = "roomy_" + os.urandom(4).hex()
    pg18.create_database(name)
    with pg18.connect(name) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO big SELECT g, repeat('backup ', 1000) FROM generate_series(1, 6000) g")
        conn.execute("CREATE TABLE small (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO small SELECT g, 'n' || g FROM generate_series(1, 50) g")
    yield name
    with pg18.connect() as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _catalog(write_catalog, pg18, db, volume, **top):
    return write_catalog({"roomy": pg_source(pg18, db, groups={"big": {"tables": ["big"]},
                                                               "small": {"tables": ["small"]}}, globals=False)},
                         repository={"root": str(volume / "backups")}, **top)


def test_a_full_scratch_folder_fails_the_checks_it_stops_and_says_where(pg18, roomy_db, write_catalog, small_volume,
                                                                       capsys):
    catalog = _catalog(write_catalog, pg18, roomy_db, small_volume)
    big = run_backup(catalog, "roomy", "big", "daily", P)
    assert big.size_bytes < 2 * 1024 * 1024
    code = main(["--catalog", catalog.catalog_path, "verify", "--source", "roomy", "--group", "big", "--partition", P,
                 "--drill"])
    out = capsys.readouterr()
    assert code == 1, out
    lines = out.out.splitlines()
    # the artifact is fine and readable (read as a stream): only the drill's decoded copy does not fit
    assert lines[0].startswith("PASS artifact_intact") and lines[1].startswith("PASS archive_readable"), lines
    [line] = [ln for ln in lines if ln.startswith("FAIL restore_drill: ")]
    assert f"no space left in the scratch folder {small_volume / 'backups' / '.tmp'} (" in line, line
    assert " free of 12.0M) for the drill's temporary copy: it needs " in line, line  # refused before filling it
    assert "Traceback" not in out.err
    # the results are recorded: list shows them failed, not unknown
    code = main(["--catalog", catalog.catalog_path, "list", "--json"])
    rows = json.loads(capsys.readouterr().out)
    [row] = [r for r in rows if r["group"] == "big"]
    assert "restore_drill" in json.dumps(row) and "unknown" not in json.dumps(row), row
    assert not list((small_volume / "backups" / ".tmp").iterdir())  # the scratch copy went away


def test_a_restore_whose_staging_fills_the_disk_says_where_and_touches_nothing(pg18, roomy_db, write_catalog,
                                                                               small_volume, capsys):
    catalog = _catalog(write_catalog, pg18, roomy_db, small_volume)
    run_backup(catalog, "roomy", "big", "daily", P)
    with pg18.connect(roomy_db) as conn:
        conn.execute("DELETE FROM big WHERE id > 10")
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "roomy", "--group", "big", "--partition", P,
                 "--confirm"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("backup-assets:")]
    assert code == 1
    assert len(err) == 1 and "no space left in the scratch folder" in err[0] and " free of " in err[0], err
    with pg18.connect(roomy_db) as conn:
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (10,)
        assert not conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'before_restore%'").fetchall()


def test_in_dagster_a_full_scratch_fails_only_its_own_checks(pg18, roomy_db, write_catalog, small_volume, smtp_sink,
                                                             http_sink):
    catalog = _catalog(write_catalog, pg18, roomy_db, small_volume,
                       alerts=alert_config(smtp_sink, http_sink, window_minutes=0), tiers={"daily": {"drill": True}})
    defs = build_definitions(catalog)
    big, small = backup_key("roomy", "big", "daily"), backup_key("roomy", "small", "daily")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            partition_key=P, instance=instance, raise_on_error=False, asset_selection=[big, small])
        # the step fails only because the drill (a blocking check) failed; both backups are made
        failures = [e for e in result.all_events if e.is_step_failure]
        assert [e.event_specific_data.error.cls_name for e in failures] == ["DagsterAssetCheckFailedError"]
        checks = {(e.asset_key, e.check_name): e for e in
                  (ev.event_specific_data for ev in result.all_events if ev.event_type_value == "ASSET_CHECK_EVALUATION")}
        assert checks[(big, "artifact_intact")].passed and checks[(big, "archive_readable")].passed
        evaluation = checks[(big, "restore_drill")]
        assert not evaluation.passed and "no space left in the scratch folder" in evaluation.description
        assert all(checks[(small, n)].passed for n in ("artifact_intact", "archive_readable", "restore_drill"))
        # the alerts name the failed checks of `big`, and no run failure is alerted for `small`
        sensor = defs.resolve_sensor_def("check_failure_alerts")
        sensor(dg.build_sensor_context(instance=instance))
        from .test_alerts import _failure_context

        defs.resolve_sensor_def("run_failure_alerts")(_failure_context(instance, result.run_id))
    hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
    assert sorted((h["group"], h["title"].split(": ")[-1]) for h in hooks) == [("big", "check restore_drill failed")], hooks
    repo = LocalRepository(catalog.repository_root)
    assert repo.latest("roomy", "small", "daily", P) is not None


def test_a_copy_that_fills_the_scratch_folder_midway_is_one_line_and_goes_away(small_volume):
    """When the free space was there at the start but ran out while writing (another writer took it): the write's
    ENOSPC becomes one line naming the folder, its free space and what had been written; the copy is removed."""
    from backup_assets.core import BackupError

    repo = LocalRepository(small_volume / "backups")
    with pytest.raises(BackupError) as info:
        with repo.scratch("drill") as tmp:
            with open(tmp / "archive.dump", "wb") as fh:
                while True:
                    fh.write(b"\0" * (1 << 20))
    text = str(info.value)
    assert text.startswith(f"no space left in the scratch folder {small_volume / 'backups' / '.tmp'} (")
    assert " free of 12.0M, after writing " in text and "for the drill's temporary copy" in text, text
    assert not list((small_volume / "backups" / ".tmp").iterdir())
