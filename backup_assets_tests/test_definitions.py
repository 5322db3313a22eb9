"""The real definitions load, from the demo catalog, with the shape the UI shows."""

from __future__ import annotations

import importlib

import dagster as dg

from backup_assets.defs.keys import backup_key, parse_key


def load_demo_defs(monkeypatch, tmp_path) -> dg.Definitions:
    monkeypatch.delenv("BACKUP_ASSETS_CATALOG", raising=False)
    for name in ("BACKUP_ASSETS_DEMO_PG_PORT", "BACKUP_ASSETS_DEMO_S3_PORT", "BACKUP_ASSETS_DEMO_WEBHOOK_PORT"):
        monkeypatch.delenv(name, raising=False)  # the demo's defaults, whatever an earlier test left
    monkeypatch.setenv("BACKUP_ASSETS_DEMO_HOME", str(tmp_path))
    import backup_assets.definitions as module

    return importlib.reload(module).defs


def test_demo_definitions_have_one_asset_per_source_group_and_tier(monkeypatch, tmp_path):
    defs = load_demo_defs(monkeypatch, tmp_path)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    expected = {f"{s}/{g}_{t}" for s, g in [("myloware", "full"), ("myloware", "core"), ("myloware", "kb"),
                                             ("miyabi", "full"), ("miyabi_persistence", "full")]
                for t in ("daily", "weekly", "monthly")}
    assert expected <= keys

    core_daily = defs.resolve_assets_def(backup_key("myloware", "core", "daily"))
    spec = core_daily.specs_by_key[backup_key("myloware", "core", "daily")]
    assert spec.group_name == "myloware"
    assert spec.kinds == {"postgres"}
    assert "public.runs, public.artifacts, public.webhook_events, public.hitl_approvals" in spec.description
    assert core_daily.op.pool == "pg_127_0_0_1_54329"
    assert isinstance(core_daily.partitions_def, dg.DailyPartitionsDefinition)
    assert core_daily.partitions_def.timezone == "UTC"
    assert core_daily.backfill_policy.max_partitions_per_run == 1

    weekly = defs.resolve_assets_def(backup_key("myloware", "core", "weekly"))
    assert isinstance(weekly.partitions_def, dg.WeeklyPartitionsDefinition)
    # weeks start on Monday and the weekly depends on the daily, the monthly on the weekly
    assert weekly.partitions_def.get_first_partition_key() == "2026-11-02"
    assert graph.get(backup_key("myloware", "core", "weekly")).parent_keys == {backup_key("myloware", "core", "daily")}
    assert graph.get(backup_key("myloware", "core", "monthly")).parent_keys == {backup_key("myloware", "core", "weekly")}
    sqlite_daily = defs.resolve_assets_def(backup_key("miyabi", "full", "daily"))
    assert sqlite_daily.specs_by_key[backup_key("miyabi", "full", "daily")].kinds == {"sqlite"}
    assert sqlite_daily.op.pool == "sqlite_miyabi_db"


def test_sources_without_a_daily_tier_dump_weekly_on_their_own(write_catalog, tmp_path):
    from backup_assets.defs.build import build_definitions

    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(tmp_path / "m.db"), "tiers": ["weekly", "monthly"]}})
    graph = build_definitions(catalog).resolve_asset_graph()
    assert graph.get(backup_key("m", "full", "weekly")).parent_keys == set()
    key = backup_key("m", "full", "weekly")
    assert "Promoted" not in build_definitions(catalog).resolve_assets_def(key).specs_by_key[key].description


SNAPSHOT = __import__("pathlib").Path(__file__).parent / "snapshots" / "demo_definitions.json"


def definitions_outline(defs: dg.Definitions) -> dict:
    """What users see of the definitions: asset keys with their group, kinds, partitions and
    parents; checks with their blocking flag; jobs with their assets; schedules; sensors."""
    graph = defs.resolve_asset_graph()
    repo = defs.get_repository_def()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        spec = node.to_asset_spec() if hasattr(node, "to_asset_spec") else None
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(spec.kinds) if spec is not None else [],
            "partitions": type(node.partitions_def).__name__ if node.partitions_def else None,
            "parents": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": {c.name: graph.get(c).blocking for c in sorted(node.check_keys, key=lambda c: c.name)},
        }
    jobs = {}
    for job in sorted(repo.get_all_jobs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue
        jobs[job.name] = sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys) \
            if job.asset_layer else []
    return {
        "assets": assets,
        "jobs": jobs,
        "schedules": {s.name: s.cron_schedule for s in sorted(repo.schedule_defs, key=lambda s: s.name)},
        "sensors": sorted(s.name for s in repo.sensor_defs),
    }


def test_demo_definitions_match_their_snapshot(monkeypatch, tmp_path):
    """A refactor must keep what users see. After an intended change, regenerate the snapshot with
    `UPDATE_SNAPSHOTS=1 make test` and review its diff."""
    import json
    import os

    outline = definitions_outline(load_demo_defs(monkeypatch, tmp_path))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(outline, indent=1, sort_keys=True) + "\n")
    assert outline == json.loads(SNAPSHOT.read_text())


def test_a_fleet_of_100_sources_loads(tmp_path, monkeypatch):
    """100 PostgreSQL sources x 3 groups x 3 tiers with S3 (bench/fleet.py): the definitions and
    every job resolve, with one op per server and tier. How long it takes is `make bench`'s."""
    import yaml

    from backup_assets.catalog import load_catalog
    from backup_assets.defs.build import build_definitions
    from bench.fleet import fleet_catalog

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet_catalog(100, root=str(tmp_path / "repo"))))
    monkeypatch.setenv("FLEET_PG_PASSWORD", "x")
    defs = build_definitions(load_catalog(path))
    repo = defs.get_repository_def()
    jobs = {j.name: j for j in repo.get_all_jobs()}
    assert {"daily_backups", "weekly_backups", "monthly_backups", "maintenance", "restore"} <= set(jobs)
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    parsed = [parse_key(k) for k in keys]
    assert len([p for p in parsed if p and not p[3]]) == 900
    assert len([p for p in parsed if p and p[3]]) == 900
    ops = {graph.get(k).assets_def.op.name for k in keys if k.path[0].startswith("db")}
    assert len(ops) == 9, ops  # one op per server (3) and tier (3), named for what it backs up
    assert {o.split("_backups_of_")[0] for o in ops} == {"daily", "weekly", "monthly"}
    assert all(o.endswith("_more") for o in ops)  # 33 or 34 sources a server: the first two and how many more
    daily = jobs["daily_backups"]
    assert len(daily.asset_layer.executable_asset_keys) == 600  # 300 backups and their 300 replicas
    assert len(list(graph.asset_check_keys)) == 900 * 4 + 900  # 3 checks and a drill per backup, replica_intact


PRELOAD_PROBE = r"""
import json, sys, time
started = time.monotonic()
from backup_assets.defs import step_preload
print(json.dumps({"missing": step_preload.preload(), "seconds": time.monotonic() - started,
                  "loaded": [m for m in ("sqlalchemy", "psycopg2", "dagster_postgres", "psycopg", "backup_assets.definitions",
                                         "backup_assets.core.verify.checks", "backup_assets.core.replica")
                             if m in sys.modules]}))
"""


def test_the_tier_jobs_forkserver_imports_what_every_step_needs_and_connects_to_nothing(tmp_path, write_catalog):
    """The tier jobs' step processes are forked from a forkserver that preloads defs/step_preload.py: the
    definitions, the core a step runs, and the instance's storage classes named by dagster.yaml (here
    production's: PostgreSQL, at an address where nothing listens, so a connection attempt would fail), built
    by none. A module it cannot import (no catalog) is left to the step: the forkserver itself never fails."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from backup_assets.defs.build import PRELOAD, tier_jobs

    root = Path(__file__).resolve().parent.parent
    loaded = write_catalog({"m": {"engine": "sqlite", "path": str(tmp_path / "m.db")}})
    catalog = tmp_path / "catalog.yaml"
    assert tier_jobs(loaded)
    for job in tier_jobs(loaded):
        config = job.executor_def.apply_config_mapping({}).value["config"]
        assert config["start_method"] == {"forkserver": {"preload_modules": [PRELOAD]}}
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(root / "dagster.yaml", home / "dagster.yaml")
    env = {"PATH": "/usr/bin:/bin", "DAGSTER_HOME": str(home), "BACKUP_ASSETS_CATALOG": str(catalog),
           "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": "9", "DAGSTER_PG_DB": "nowhere",
           "DAGSTER_PG_USER": "nobody", "DAGSTER_PG_PASSWORD": "never-used"}
    probe = lambda env: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", PRELOAD_PROBE], env=env, cwd=root, check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    got = probe(env)
    assert got["missing"] == []
    assert got["loaded"] == ["sqlalchemy", "psycopg2", "dagster_postgres", "psycopg", "backup_assets.definitions",
                             "backup_assets.core.verify.checks", "backup_assets.core.replica"]
    without_catalog = probe(dict(env, BACKUP_ASSETS_CATALOG=str(tmp_path / "missing.yaml")))
    assert without_catalog["missing"] == ["backup_assets.definitions"]
    assert "backup_assets.core.replica" in without_catalog["loaded"]
