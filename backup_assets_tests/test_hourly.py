"""The hourly tier (a shorter recovery point for SQLite stores, which have no WAL archive here): opt-in per
source, partitions by the hour (keys like 2026-12-02T03), its own job and schedule, backed up, listed, restored
and pruned like the other tiers; the other sources and tiers are unchanged."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
import yaml

from backup_assets.catalog import load_catalog
from backup_assets.cli import main
from backup_assets.core.partition_keys import BadPartition, last_complete_hour, validate
from backup_assets.core.repository import parse_artifact_name
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key


@pytest.fixture
def hourly_catalog(tmp_path, monkeypatch):
    db = tmp_path / "store.db"
    with sqlite3.connect(db) as conn:
        conn.execute('CREATE TABLE "Execution runs" (id INTEGER PRIMARY KEY, note TEXT)')
        conn.executemany('INSERT INTO "Execution runs" (note) VALUES (?)', [(f"run {i}",) for i in range(500)])
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"root": str(tmp_path / "repo")}, "start_date": "2026-11-01",
        "tiers": {"hourly": {"time": "00:20", "retention_days": 1}},
        "sources": {"store": {"engine": "sqlite", "path": str(db), "tiers": ["hourly", "daily"]},
                    "other": {"engine": "sqlite", "path": str(other)}}}))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return path, db


def test_hourly_is_opt_in_with_its_own_job_schedule_and_partitions(hourly_catalog):
    path, _ = hourly_catalog
    catalog = load_catalog(path)
    assert catalog.source_tiers("store") == ["hourly", "daily"]
    assert "hourly" not in catalog.source_tiers("other")  # a source that lists no tiers keeps daily/weekly/monthly
    defs = build_definitions(catalog)
    job = defs.resolve_job_def("hourly_backups")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"store/full_hourly"}
    repo = defs.get_repository_def()
    schedule = {s.name: s for s in repo.schedule_defs}["hourly_backup_schedule"]
    assert schedule.cron_schedule == "20 * * * *"
    hourly = defs.resolve_assets_def(backup_key("store", "full", "hourly"))
    assert hourly.partitions_def.get_partition_keys()[:2] == ["2026-11-01T00", "2026-11-01T01"]
    daily = defs.resolve_assets_def(backup_key("store", "full", "daily"))
    assert not daily.asset_deps[backup_key("store", "full", "daily")]  # no line from the hourly copies


def test_hourly_keys_are_checked_before_anything_runs(hourly_catalog):
    catalog = load_catalog(hourly_catalog[0])
    now = dt.datetime(2026, 12, 2, 10, 30, tzinfo=dt.timezone.utc)
    assert validate(catalog, "hourly", "2026-12-02T09", now=now) == "2026-12-02T09"
    assert validate(catalog, None, "2026-12-02T09", now=now) == "2026-12-02T09"
    for bad, why in [("2026-12-02T10", "has not ended"), ("2026-12-02", "not an hour"), ("2026-12-02T25", "valid"),
                     ("2026-10-31T23", "before the first"), ("*", "not an hour")]:
        with pytest.raises(BadPartition, match=why):
            validate(catalog, "hourly", bad, now=now)
    assert last_complete_hour(catalog, now) == dt.datetime(2026, 12, 2, 9)


def test_an_hourly_backup_is_taken_listed_restored_and_pruned(hourly_catalog, tmp_path, capsys):
    path, db = hourly_catalog
    hour = last_complete_hour(load_catalog(path)).strftime("%Y-%m-%dT%H")
    assert main(["--catalog", str(path), "backup", "--tier", "hourly", "--partition", hour]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"store/full_hourly {hour}" in out and "other" not in out
    artifact = next((tmp_path / "repo" / "sqlite" / "hourly").glob("store-full-*.db.zst"))
    assert parse_artifact_name(artifact.name)["partition"] == hour
    with sqlite3.connect(db) as conn:
        conn.execute('DELETE FROM "Execution runs" WHERE id > 100')
    target = tmp_path / "restored.db"
    assert main(["--catalog", str(path), "restore", "--source", "store", "--group", "full", "--tier", "hourly",
                 "--partition", hour, "--target-file", str(target), "--confirm"]) == 0, capsys.readouterr().err
    with sqlite3.connect(target) as conn:
        assert conn.execute('SELECT count(*), sum(id) FROM "Execution runs"').fetchone() == (500, 500 * 501 // 2)
    # retention: hourly keeps retention_days (1 here), never the newest verified copy
    # retention: an earlier hour backed up too; two days on, past the hourly retention (1 day), the older copy
    # goes and the newest verified one stays
    earlier = (dt.datetime.strptime(hour, "%Y-%m-%dT%H") - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H")
    assert main(["--catalog", str(path), "backup", "--tier", "hourly", "--partition", earlier]) == 0
    capsys.readouterr()
    assert main(["--catalog", str(path), "list", "--source", "store"]) == 0
    listed = capsys.readouterr().out
    assert earlier in listed and hour in listed
    from backup_assets.core.retention.prune import prune

    report = prune(load_catalog(path), dry_run=False, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2))
    assert report["local"]["backups"] == 1
    left = [parse_artifact_name(p.name)["partition"] for p in (tmp_path / "repo" / "sqlite" / "hourly").glob("*.zst")]
    assert left == [earlier]  # the newest backup (taken last) stays
