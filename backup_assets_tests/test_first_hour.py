"""A new user's first hour: the README's commands from any directory, `make stop`, plain texts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


from backup_assets.catalog import catalog_from_env
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key


def test_the_demo_catalog_reads_its_settings_from_any_directory(tmp_path, monkeypatch):
    home = tmp_path / "demo"
    home.mkdir()
    (home / "secrets.env").write_text("MYLOWARE_DB_PASSWORD=s3cret-from-file\nBACKUP_ASSETS_DEMO_PG_PORT=55999\n")
    monkeypatch.setenv("BACKUP_ASSETS_DEMO_HOME", str(home))
    monkeypatch.delenv("BACKUP_ASSETS_CATALOG", raising=False)
    monkeypatch.delenv("MYLOWARE_DB_PASSWORD", raising=False)
    monkeypatch.delenv("BACKUP_ASSETS_DEMO_PG_PORT", raising=False)
    monkeypatch.chdir(tmp_path)
    catalog = catalog_from_env()
    conn = catalog.sources["myloware"].connection
    assert conn.password() == "s3cret-from-file" and conn.port == 55999
    assert catalog.repository_root == home / "backups"


def test_make_stop_stops_dagster_dev_and_its_children(tmp_path):
    from backup_assets.demo.__main__ import stop_dagster

    # a stand-in for `dagster dev` with a webserver/daemon child, recorded as `make run` does
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, "dagster", "dev"])
    time.sleep(1)
    children = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
    assert children
    (tmp_path / "dagster.pid").write_text(str(proc.pid))
    # (a workspace of its own: the test must not stop a demo the developer runs from this checkout)
    assert stop_dagster(tmp_path, timeout_s=10, workspace=tmp_path / "workspace.yaml")
    proc.wait(timeout=10)
    time.sleep(0.5)
    for pid in children:
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not (tmp_path / "dagster.pid").exists()
    assert not stop_dagster(tmp_path, workspace=tmp_path / "workspace.yaml")  # nothing left to stop, no error


def test_asset_descriptions_have_no_blanks_that_markdown_eats(write_catalog, tmp_path):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(tmp_path / "m.db")}})
    defs = build_definitions(catalog)
    spec = defs.resolve_assets_def(backup_key("miyabi", "full", "daily")).specs_by_key[backup_key("miyabi", "full", "daily")]
    assert "<" not in spec.description and "miyabi-full-PARTITION-TIMESTAMP.db.zst" in spec.description
    assert os.path.isabs(str(catalog.repository_root))


def test_a_typo_in_a_name_gets_one_answer_everywhere(pg18, myloware_db, write_catalog, tmp_path, capsys, monkeypatch):
    """Unknown source, group, tier or --select: one line naming the valid ones, exit 2, whichever command."""
    from backup_assets.cli import main

    from .conftest import pg_source

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db),
                             "miyabi": {"engine": "sqlite", "path": str(tmp_path / "m.db")}})
    base = ["--catalog", catalog.catalog_path]
    cases = [
        (["list", "--source", "mylowar"], "unknown source 'mylowar': the catalog has myloware, miyabi"),
        (["verify", "--source", "mylowar", "--group", "full"], "unknown source 'mylowar': the catalog has myloware, miyabi"),
        (["restore", "--source", "mylowar", "--group", "full", "--confirm"], "unknown source 'mylowar'"),
        (["list", "--group", "ful"], "unknown group 'ful': the catalog has "),
        (["restore", "--source", "myloware", "--group", "ful", "--confirm"],
         "unknown group 'ful' of source 'myloware': it has full, core, kb, globals"),
        (["backup", "--tier", "daily", "--select", "mylowar"], "--select 'mylowar' names no backup asset: choose a "
                                                               "source (myloware, miyabi) or a source/group ("),
        (["backup", "--tier", "daily", "--select", "myloware/ful"], "--select 'myloware/ful' names no backup asset"),
        (["list", "--source", "miyabi", "--group", "core"], "unknown group 'core' of source 'miyabi': it has full"),
    ]
    for args, expected in cases:
        code = main([*base, *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2, (args, err)
        assert len(err) == 1 and expected in err[0], (args, err)


def test_cli_backup_makes_one_run_per_partition_with_every_asset(miyabi_db, write_catalog, tmp_path, monkeypatch,
                                                                 capsys):
    """As the schedule does: one `daily_backups` run per partition holding every selected asset, tagged with the
    command that started it; each asset is reported by its key."""
    import dagster as dg

    from backup_assets.cli import main

    home = tmp_path / "dh"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    other = tmp_path / "data" / "other.db"
    other.write_bytes(miyabi_db.read_bytes())
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)},
                             "other": {"engine": "sqlite", "path": str(other)}})
    assert main(["--catalog", catalog.catalog_path, "backup", "--tier", "daily", "--partition", "2026-11-20",
                 "2026-11-21"]) == 0
    out = capsys.readouterr().out
    for key in ("miyabi/full_daily", "other/full_daily"):
        for partition in ("2026-11-20", "2026-11-21"):
            assert f"{key} {partition}: " in out, out
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert len(runs) == 2, [r.run_id for r in runs]
    for run in runs:
        assert {k.to_user_string() for k in run.asset_selection} == {"miyabi/full_daily", "other/full_daily"}
        assert run.tags["backup_assets/trigger"] == "cli"
        assert run.tags["backup_assets/command"] == "backup-assets backup --tier daily"
    assert sorted(r.tags["dagster/partition"] for r in runs) == ["2026-11-20", "2026-11-21"]
    instance.dispose()


def test_cli_backup_timings_say_where_the_time_went(pg18, myloware_db, write_catalog, tmp_path, monkeypatch, capsys):
    """`backup --timings`: the command's phases in order (imports, catalog, definitions, instance, the run's
    start, each backup's dump and checks, the run's end) adding up to its total, and the drill's own phases."""
    import re

    from backup_assets.cli import main
    from backup_assets_tests.conftest import pg_source

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    catalog = write_catalog({"app": pg_source(pg18, myloware_db, groups={"core": {"tables": ["runs", "artifacts"]}},
                                              globals=False)}, tiers={"daily": {"drill": True}})
    code = main(["--catalog", catalog.catalog_path, "backup", "--partition", "2026-11-20", "--timings"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    line = next(ln for ln in out.splitlines() if ln.startswith("timings: "))
    steps = re.findall(r"([^;:]+?) (\d+\.\d\d)s", line[len("timings: "):])
    names = [name.strip() for name, _ in steps]
    assert names[:4] == ["catalog", "imports", "definitions", "instance"], line
    assert names[4:] == ["run created and started", "app/core_daily dumped", "app/core_daily checked",
                         names[7], "reporting", "total"], out
    assert re.fullmatch(r"run ended \(\d+ events\)", names[7]), line
    total = float(steps[-1][1])
    assert abs(sum(float(s) for _, s in steps[:-1]) - total) <= 0.01 * len(steps), line
    # the backup was started beside Dagster's start, and its run took it over (one backup, not two)
    early = next(ln for ln in out.splitlines() if ln.startswith("head start: "))
    assert re.fullmatch(r"head start: app/core 2026-11-20 began beside Dagster's start: dumped \d+\.\d\ds; "
                        r"checked \d+\.\d\ds after the command started", early), early
    assert len(list(Path(catalog.repository_root).rglob("*.dump.zst"))) == 1
    drill = next(ln for ln in out.splitlines() if "app/core_daily 2026-11-20: the drill: " in ln)
    for phase in ("scratch database", "decode", "pg restore", "schema compare", "counts and fingerprints"):
        assert re.search(rf"{phase} \d+\.\d\ds", drill), drill


def test_cli_backup_fails_when_the_run_fails_between_a_backup_and_its_checks(miyabi_db, write_catalog, tmp_path,
                                                                            monkeypatch, capsys):
    """An unexpected error after the backup was written (its checks never ran) fails the command and says so; it
    used to print the backup with 'checks unknown' and exit 0."""
    from backup_assets.cli import main
    from backup_assets.core.verify import checks

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})

    def broken(*_a, **_k):
        raise RuntimeError("the checks could not start")

    monkeypatch.setattr(checks, "evaluate", broken)
    assert main(["--catalog", catalog.catalog_path, "backup", "--partition", "2026-11-20"]) == 1
    err = capsys.readouterr().err
    assert "miyabi/full_daily 2026-11-20: FAILED the run failed after the backup, before its checks: " in err, err
    assert "the checks could not start" in err, err


def test_a_backup_started_beside_dagster_that_no_run_took_over_is_waited_for_and_reported(
        miyabi_db, write_catalog, tmp_path, monkeypatch, capsys):
    """The command's first backup starts while Dagster starts; when Dagster then fails before its run takes the
    backup over, the command waits for it (no half-written artifact left behind), records what its checks found
    on the artifact, names it as not recorded in Dagster, and fails."""
    from backup_assets.cli import main
    from backup_assets.core.verify.checks import find_backup
    from backup_assets.core.verify.records import read_status
    from backup_assets.defs import build

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})

    def broken(*_a, **_k):
        raise RuntimeError("the definitions could not load")

    monkeypatch.setattr(build, "build_definitions", broken)
    assert main(["--catalog", catalog.catalog_path, "backup", "--partition", "2026-11-20"]) == 1
    err = capsys.readouterr().err
    assert "the definitions could not load" in err, err
    assert ("backup-assets: miyabi/full daily 2026-11-20 was backed up while Dagster started, but no run took it "
            "over (not recorded in Dagster): ") in err, err
    backup = find_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    assert str(backup.artifact_path) in err
    assert not list(backup.artifact_path.parent.glob("*.partial*"))
    status = read_status(backup)
    assert status["artifact_intact"]["passed"] and status["archive_readable"]["passed"], status
