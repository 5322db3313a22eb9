"""Asset checks on real backups: good ones pass, every kind of damage fails with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from backup_assets.core.verify.dr_drill import markdown_report, run_dr_drill
from backup_assets.core.verify.checks import find_backup
from backup_assets.core.verify.readable import archive_readable
from backup_assets.core.verify.restore_drill import cleanup_drill_leftovers, drill_name, restore_drill
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key

from .conftest import pg_source, reseal

PARTITION = "2026-11-20"


def run_with_checks(catalog, key: str, partition: str = PARTITION, instance=None):
    """Back up one asset with its checks: what its tier's run does for it."""
    defs = build_definitions(catalog)
    asset_key = backup_key(*key.split("/"))
    asset = defs.resolve_assets_def(asset_key)
    return dg.materialize([asset], selection=dg.AssetSelection.assets(asset_key), partition_key=partition,
                          instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def check_evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def run_checks_only(catalog, key: str, partition: str = PARTITION):
    """Run an asset's checks on an existing partition, as "Execute checks" does in the UI."""
    defs = build_definitions(catalog)
    asset_key = backup_key(*key.split("/"))
    asset = defs.resolve_assets_def(asset_key)
    job = dg.define_asset_job("checks_only", selection=dg.AssetSelection.checks_for_assets(asset_key),
                              partitions_def=asset.partitions_def)
    subset = dg.Definitions(assets=[asset], jobs=[job])
    result = subset.resolve_job_def("checks_only").execute_in_process(
        tags={"dagster/partition": partition}, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    return check_evaluations(result)


@pytest.fixture
def core_backup(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)}, tiers={"daily": {"drill": True}})
    result = run_with_checks(catalog, "myloware/full/daily")
    assert result.success
    return catalog, result


def test_good_postgres_backup_passes_every_check_and_the_drill_keeps_vectors_and_hnsw(core_backup, pg18):
    catalog, result = core_backup
    evals = check_evaluations(result)
    assert set(evals) == {"artifact_intact", "archive_readable", "size_anomaly", "restore_drill"}
    assert all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
    drill = evals["restore_drill"]
    assert drill.metadata["rto_s"].value > 0
    assert drill.metadata["row_counts"].value["public.runs"] == 300
    assert "nothing to compare" in evals["size_anomaly"].description
    with pg18.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'drill%'").fetchone()[0] == 0


def test_blocking_flags():
    from backup_assets.catalog import parse_catalog

    catalog = parse_catalog({"repository": {"root": "/tmp/x"},
                             "sources": {"m": {"engine": "sqlite", "path": "/tmp/m.db"}}})
    blocking = {}
    for assets_def in build_definitions(catalog).assets:
        for spec in getattr(assets_def, "check_specs", []):
            if spec.asset_key == backup_key("m", "full", "weekly"):
                blocking[spec.name] = spec.blocking
    assert blocking == {"artifact_intact": True, "archive_readable": True, "size_anomaly": False, "restore_drill": True}


def _damage(catalog, how: str):
    backup = find_backup(catalog, "myloware", "full", "daily", PARTITION)
    art, meta = backup.artifact_path, backup.manifest_path
    data = bytearray(art.read_bytes())
    manifest = json.loads(meta.read_text())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        art.write_bytes(bytes(data))
    elif how == "truncated":
        art.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "truncated, manifest edited to match":
        import hashlib

        cut = bytes(data[: len(data) - 100])
        art.write_bytes(cut)
        manifest.update(size_bytes=len(cut), sha256=hashlib.sha256(cut).hexdigest())
        meta.write_text(reseal(manifest))
    elif how == "manifest edited, checksum not updated":
        manifest["row_counts"]["public.runs"] += 1
        meta.write_text(json.dumps(manifest))
    elif how == "missing manifest":
        meta.unlink()
    elif how == "edited manifest":
        meta.write_text(meta.read_text()[:-20])
    elif how == "swapped artifact":
        other = catalog.repository_root / "other.zst"
        import zstandard

        other.write_bytes(zstandard.ZstdCompressor().compress(b"not the dump you are looking for"))
        os.replace(other, art)
    return backup


DAMAGE = {
    "flipped byte": ("artifact_intact", r"sha256 [0-9a-f]+ differs from the manifest's"),
    "truncated": ("artifact_intact", r"size \d+ bytes differs from the manifest's"),
    "truncated, manifest edited to match": ("artifact_intact", r"zstd stream (is corrupt|ends before)"),
    "missing manifest": ("artifact_intact", r"no backup of .* \(myloware-full-.* has no manifest: not a backup\)"),
    "edited manifest": ("artifact_intact", r"manifest .*\.meta cannot be read"),
    "manifest edited, checksum not updated": ("artifact_intact", r"does not match its manifest_sha256"),
    "swapped artifact": ("artifact_intact", r"size \d+ bytes differs"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_backup_fails_with_a_message_naming_artifact_and_difference(how, core_backup):
    catalog, _ = core_backup
    backup = _damage(catalog, how)
    check, pattern = DAMAGE[how]
    evals = run_checks_only(catalog, "myloware/full/daily")
    assert not evals[check].passed
    assert backup.artifact_path.name in evals[check].description
    import re

    assert re.search(pattern, evals[check].description), evals[check].description
    assert not evals["archive_readable"].passed and not evals["restore_drill"].passed


def test_tampered_counts_and_missing_table_fail(core_backup):
    catalog, _ = core_backup
    backup = find_backup(catalog, "myloware", "full", "daily", PARTITION)
    manifest = json.loads(backup.manifest_path.read_text())
    manifest["row_counts"]["public.runs"] += 1
    manifest["vectors"]["public.kb_embeddings"]["embedding"]["dims"] = 768
    manifest["indexes"].append({"table": "public.runs", "name": "runs_ghost_idx", "method": "btree", "definition": ""})
    backup.manifest_path.write_text(reseal(manifest))
    outcome = restore_drill(catalog, find_backup(catalog, "myloware", "full", "daily", PARTITION))
    assert not outcome.passed
    assert backup.artifact_path.name in outcome.message
    assert "public.runs has 300 rows, the manifest says 301" in outcome.message
    assert "public.kb_embeddings.embedding dims is 1536, the manifest says 768" in outcome.message
    assert "index runs_ghost_idx (btree) on public.runs is missing" in outcome.message

    outcome = archive_readable(catalog, find_backup(catalog, "myloware", "full", "daily", PARTITION))
    assert not outcome.passed and "archive holds 300 rows of public.runs, the manifest says 301" in outcome.message
    manifest["tables"].append("public.ghost")
    backup.manifest_path.write_text(reseal(manifest))
    outcome = archive_readable(catalog, find_backup(catalog, "myloware", "full", "daily", PARTITION))
    assert not outcome.passed and "archive lacks table public.ghost" in outcome.message


def test_drill_refuses_a_foreign_database_with_its_name(core_backup, pg18):
    catalog, _ = core_backup
    name = drill_name("myloware", "full", PARTITION, 1)
    pg18.create_database(name)
    try:
        outcome = restore_drill(catalog, find_backup(catalog, "myloware", "full", "daily", PARTITION))
        assert not outcome.passed and f"database {name} exists and is not a restore drill's" in outcome.message
        with pg18.connect() as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    finally:
        with pg18.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


KILLABLE_DRILL = r"""
import sys
from backup_assets.catalog import load_catalog
from backup_assets.core.verify.checks import find_backup, restore_drill
catalog = load_catalog(sys.argv[1])
restore_drill(catalog, find_backup(catalog, "myloware", "full", "daily", sys.argv[2]))
"""


def test_interrupted_drill_leaves_no_scratch_database_after_the_next_run(core_backup, pg18):
    catalog, _ = core_backup
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_DRILL, catalog.catalog_path, PARTITION],
                            start_new_session=True)
    leftover = None
    deadline = time.monotonic() + 60
    with pg18.connect() as conn:
        while time.monotonic() < deadline and leftover is None:
            row = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'drill\\_%'").fetchone()
            leftover = row[0] if row else None
            time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert leftover, "the drill never created its scratch database"
    with pg18.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (leftover,)).fetchone()
    outcome = restore_drill(catalog, find_backup(catalog, "myloware", "full", "daily", PARTITION))
    assert outcome.passed, outcome.message
    assert leftover in outcome.metadata["leftovers_dropped"]
    with pg18.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'drill%'").fetchone()[0] == 0
        assert cleanup_drill_leftovers(conn, protect=set()) == []


def test_size_anomaly_warns_without_blocking(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    assert run_with_checks(catalog, "myloware/core/daily", "2026-11-19").success
    with pg18.connect(myloware_db) as conn:
        conn.execute("INSERT INTO webhook_events (provider, event_type, signature, payload, raw_body) "
                     "SELECT 'x', 'y', md5(g::text), '{}', repeat(md5(random()::text), 40) FROM generate_series(1, 5000) g")
    result = run_with_checks(catalog, "myloware/core/daily", "2026-11-20")
    assert result.success, "a WARN check must not fail the run"
    evals = check_evaluations(result)
    anomaly = evals["size_anomaly"]
    assert not anomaly.passed and anomaly.severity == dg.AssetCheckSeverity.WARN
    assert "changed by +" in anomaly.description and "against partition 2026-11-19" in anomaly.description


def test_sqlite_checks_and_drill(miyabi_db, write_catalog):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db), "tables": ["execution_runs"]}},
                            tiers={"daily": {"drill": True}})
    result = run_with_checks(catalog, "miyabi/full/daily")
    evals = check_evaluations(result)
    assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
    backup = find_backup(catalog, "miyabi", "full", "daily", PARTITION)
    manifest = json.loads(backup.manifest_path.read_text())
    manifest["row_counts"]["checkpoints"] -= 1
    backup.manifest_path.write_text(reseal(manifest))
    outcome = restore_drill(catalog, find_backup(catalog, "miyabi", "full", "daily", PARTITION))
    assert not outcome.passed and "checkpoints has 900 rows, the manifest says 899" in outcome.message


def test_blocking_drill_failure_fails_the_run(pg18, myloware_db, write_catalog):
    from backup_assets.demo.cluster import free_port

    source = pg_source(pg18, myloware_db)
    source["drill_server"] = {**source["connection"], "port": free_port()}
    catalog = write_catalog({"myloware": source}, tiers={"daily": {"drill": True}})
    result = run_with_checks(catalog, "myloware/core/daily")
    evals = check_evaluations(result)
    assert evals["artifact_intact"].passed
    assert not evals["restore_drill"].passed and "cannot connect" in evals["restore_drill"].description
    assert not result.success


def test_dr_drill_report(pg18, myloware_db, write_catalog, miyabi_db):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db),
                             "miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    for key in ("myloware/core/daily", "myloware/kb/daily", "myloware/globals/daily", "miyabi/full/daily"):
        assert run_with_checks(catalog, key).success
    defs = build_definitions(catalog)
    drill = defs.resolve_assets_def(dg.AssetKey(["operations", "dr_drill"]))
    result = dg.materialize([drill], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    # myloware/full has no backup yet: the drill fails and says so
    assert not result.success
    results = run_dr_drill(catalog)
    report = markdown_report(results)
    assert "| myloware | full | — |" in report and "no backup to drill" in report
    assert "| myloware | core | myloware-core-2026-11-20-" in report and "PASS" in report
    assert "public.webhook_events:" in report
    assert run_with_checks(catalog, "myloware/full/daily").success
    result = dg.materialize([drill], instance=dg.DagsterInstance.ephemeral())
    md = result.asset_materializations_for_node(result.all_node_events[0].node_name)[0].metadata
    assert md["failed"].value == 0 and md["drilled"].value == 5  # myloware full, core, kb, globals; miyabi
    assert "| miyabi | full |" in md["report"].value
    schedule = defs.resolve_schedule_def("dr_drill_schedule")
    assert schedule.cron_schedule == "0 5 1 * *" and schedule.default_status == dg.DefaultScheduleStatus.RUNNING
