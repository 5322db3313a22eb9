"""Prometheus metrics: printed by the CLI, served over HTTP, written as a node_exporter textfile by the
health asset; values read from the repository, no secret in any of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import dagster as dg
from prometheus_client.parser import text_string_to_metric_families

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.verify.checks import find_backup
from backup_assets.defs.build import build_definitions
from backup_assets.defs.sensors import HEALTH_KEY

from .conftest import pg_source

P = "2026-11-20"


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels) -> tuple:
    return ("backup_assets_" + name, tuple(sorted(labels.items())))


def test_metrics_describe_the_repository(pg18, myloware_db, miyabi_db, write_catalog, capsys):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, tiers=["daily"]),
                             "miyabi": {"engine": "sqlite", "path": str(miyabi_db), "tiers": ["daily"]}})
    core = run_backup(catalog, "myloware", "core", "daily", P)
    lite = run_backup(catalog, "miyabi", "full", "daily", P)
    # before any check ran, nothing counts as a good backup
    assert main(["--catalog", catalog.catalog_path, "metrics"]) == 0
    before = samples(capsys.readouterr().out)
    labels = dict(source="myloware", group="core", tier="daily")
    assert key("backup_count", **labels) in before and before[key("backup_count", **labels)] == 1
    assert key("backup_last_success_timestamp_seconds", **labels) not in before
    assert before[key("backup_rpo_met", **labels)] == 0
    assert before[key("backup_rpo_seconds", **labels)] == 26 * 3600

    assert main(["--catalog", catalog.catalog_path, "verify", "--source", "myloware", "--group", "core", "--drill"]) == 0
    assert main(["--catalog", catalog.catalog_path, "verify", "--source", "miyabi", "--group", "full"]) == 0
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "metrics"]) == 0
    text = capsys.readouterr().out
    got = samples(text)
    assert got[key("backup_size_bytes", **labels)] == core.size_bytes
    assert got[key("backup_raw_size_bytes", **labels)] == core.raw_size_bytes
    assert got[key("backup_rows", **labels)] == core.total_rows
    assert got[key("backup_duration_seconds", **labels)] == core.duration_s
    assert got[key("backup_rpo_met", **labels)] == 1
    assert 0 <= got[key("backup_since_last_completion_seconds", **labels)] < 3600
    for check in ("artifact_intact", "archive_readable", "restore_drill"):
        assert got[key("check_passed", check=check, **labels)] == 1
        assert key("check_last_run_timestamp_seconds", check=check, **labels) in got
    assert got[key("drill_rto_seconds", **labels)] > 0
    lite_labels = dict(source="miyabi", group="full", tier="daily")
    assert got[key("backup_size_bytes", **lite_labels)] == lite.size_bytes
    assert got[key("backup_rows", **lite_labels)] == lite.total_rows
    assert got[key("repository_bytes", repository="local")] >= core.size_bytes + lite.size_bytes
    assert any(n == "backup_assets_disk_free_bytes" for n, _ in got)
    # never backed up: present with its RPO, not met
    assert got[key("backup_rpo_met", source="myloware", group="kb", tier="daily")] == 0
    assert pg18.password not in text

    # a failing check shows as 0
    backup = find_backup(catalog, "myloware", "core", "daily", P)
    with open(backup.artifact_path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["--catalog", catalog.catalog_path, "verify", "--source", "myloware", "--group", "core",
                 "--partition", P]) == 1
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "metrics", "--openmetrics"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("# EOF")
    got = samples(text.replace("# EOF", ""))
    assert got[key("check_passed", check="artifact_intact", **labels)] == 0
    assert key("backup_last_success_timestamp_seconds", **labels) not in got


def test_metrics_serve_and_the_health_asset_textfile(miyabi_db, write_catalog, tmp_path):
    textfile = tmp_path / "node_exporter" / "backup_assets.prom"
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db), "tiers": ["daily"]}},
                            metrics={"textfile": str(textfile)})
    run_backup(catalog, "miyabi", "full", "daily", P)
    result = dg.materialize([build_definitions(catalog).resolve_assets_def(HEALTH_KEY)],
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    meta = result.asset_materializations_for_node("operations__backup_health")[0].metadata
    assert meta["metrics_textfile"].value == str(textfile)
    got = samples(textfile.read_text())
    assert got[key("backup_count", source="miyabi", group="full", tier="daily")] == 1
    assert not [p for p in textfile.parent.iterdir() if p != textfile]  # no temporary file left

    proc = subprocess.Popen([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path,
                             "metrics", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving metrics on http://127.0.0.1:"), line
        url = line.split()[3]
        body = urllib.request.urlopen(url, timeout=30).read().decode()
        assert samples(body)[key("backup_count", source="miyabi", group="full", tier="daily")] == 1
        request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert urllib.request.urlopen(request, timeout=30).read().decode().rstrip().endswith("# EOF")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # a port that cannot be bound: one line, exit 2
    busy = subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path,
                           "metrics", "serve", "--port", "1", "--addr", "203.0.113.1"], capture_output=True, text=True)
    assert busy.returncode == 2 and busy.stderr.startswith("backup-assets: cannot listen on 203.0.113.1:1")
