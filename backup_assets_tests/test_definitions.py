"""The real definitions load, from the demo catalog, with the shape the UI shows."""

from __future__ import annotations

import importlib

import dagster as dg


def load_demo_defs(monkeypatch, tmp_path) -> dg.Definitions:
    monkeypatch.delenv("BACKUP_ASSETS_CATALOG", raising=False)
    monkeypatch.setenv("BACKUP_ASSETS_DEMO_HOME", str(tmp_path))
    import backup_assets.definitions as module

    return importlib.reload(module).defs


def test_demo_definitions_have_one_asset_per_source_group_and_tier(monkeypatch, tmp_path):
    defs = load_demo_defs(monkeypatch, tmp_path)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    expected = {f"{s}/{g}/{t}" for s, g in [("myloware", "full"), ("myloware", "core"), ("myloware", "kb"),
                                             ("miyabi", "full"), ("miyabi_persistence", "full")]
                for t in ("daily", "weekly", "monthly")}
    assert expected <= keys

    core_daily = defs.resolve_assets_def(dg.AssetKey(['myloware', 'core', 'daily']))
    spec = next(iter(core_daily.specs))
    assert spec.group_name == "myloware"
    assert spec.kinds == {"postgres"}
    assert "public.runs, public.artifacts, public.webhook_events, public.hitl_approvals" in spec.description
    assert core_daily.op.pool == "pg_127_0_0_1_54329"
    assert isinstance(core_daily.partitions_def, dg.DailyPartitionsDefinition)
    assert core_daily.partitions_def.timezone == "UTC"
    assert core_daily.backfill_policy.max_partitions_per_run == 1

    weekly = defs.resolve_assets_def(dg.AssetKey(['myloware', 'core', 'weekly']))
    assert isinstance(weekly.partitions_def, dg.WeeklyPartitionsDefinition)
    # weeks start on Monday and the weekly depends on the daily, the monthly on the weekly
    assert weekly.partitions_def.get_first_partition_key() == "2026-11-02"
    assert graph.get(dg.AssetKey(["myloware", "core", "weekly"])).parent_keys == {dg.AssetKey(["myloware", "core", "daily"])}
    assert graph.get(dg.AssetKey(["myloware", "core", "monthly"])).parent_keys == {dg.AssetKey(["myloware", "core", "weekly"])}
    sqlite_daily = defs.resolve_assets_def(dg.AssetKey(['miyabi', 'full', 'daily']))
    assert next(iter(sqlite_daily.specs)).kinds == {"sqlite"}
    assert sqlite_daily.op.pool == "sqlite_miyabi_db"


def test_sources_without_a_daily_tier_dump_weekly_on_their_own(write_catalog, tmp_path):
    from backup_assets.defs.build import build_definitions

    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(tmp_path / "m.db"), "tiers": ["weekly", "monthly"]}})
    graph = build_definitions(catalog).resolve_asset_graph()
    assert graph.get(dg.AssetKey(["m", "full", "weekly"])).parent_keys == set()
    assert "Promoted" not in next(iter(build_definitions(catalog).resolve_assets_def(dg.AssetKey(['m', 'full', 'weekly'])).specs)).description
