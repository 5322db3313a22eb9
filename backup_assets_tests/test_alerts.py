"""Schedules, sensors and alerts against a real instance with real failed runs and checks;
alerts delivered over SMTP with STARTTLS, to a signed webhook and to a Slack API stand-in."""

from __future__ import annotations

import datetime as dt
import json
import os

import dagster as dg
import pytest

from backup_assets.core.monitoring.alerts import SIGNATURE_HEADER, verify_signature
from backup_assets.defs import sensors as sensors_module
from backup_assets.defs.build import build_definitions
from backup_assets.defs.hygiene import prune_runs
from backup_assets.defs.keys import backup_key

from .conftest import WEBHOOK_SECRET_ENV, alert_config, pg_source

UTC = dt.timezone.utc


def subject(message) -> str:
    """The Subject header unfolded (long ones arrive folded over lines)."""
    return str(message["Subject"]).replace("\r\n", "").replace("\n", "")


def test_schedules_yield_the_newest_complete_partition_in_the_catalog_timezone(write_catalog, tmp_path):
    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(tmp_path / "m.db")}}, timezone="Europe/Berlin",
                            tiers={"daily": {"time": "03:00"}, "weekly": {"time": "03:30"}, "monthly": {"time": "04:00"}})
    defs = build_definitions(catalog)
    berlin = dt.timezone(dt.timedelta(hours=1))  # CET in November

    def tick(name, when):
        schedule = defs.resolve_schedule_def(name)
        assert schedule.execution_timezone == "Europe/Berlin"
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        with dg.instance_for_test() as instance:
            ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
            data = schedule.evaluate_tick(ctx)
        return schedule.cron_schedule, [r.partition_key for r in data.run_requests]

    assert tick("daily_backup_schedule", dt.datetime(2026, 11, 21, 3, 0, tzinfo=berlin)) == ("0 3 * * *", ["2026-11-20"])
    assert tick("weekly_backup_schedule", dt.datetime(2026, 11, 23, 3, 30, tzinfo=berlin)) == ("30 3 * * 1", ["2026-11-16"])
    assert tick("monthly_backup_schedule", dt.datetime(2026, 12, 1, 4, 0, tzinfo=berlin)) == ("0 4 1 * *", ["2026-11-01"])
    maintenance = defs.resolve_schedule_def("maintenance_schedule")
    assert maintenance.cron_schedule == "0 4 * * *" and maintenance.default_status == dg.DefaultScheduleStatus.RUNNING


def _failure_context(instance, run_id, sensor_name="run_failure_alerts"):
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    event = records[-1].event_log_entry.dagster_event
    return dg.build_run_status_sensor_context(
        sensor_name=sensor_name, dagster_event=event, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id)).for_run_failure()


def test_run_failure_alert_by_email_webhook_and_slack_once_per_window(pg18, myloware_db, write_catalog, smtp_sink,
                                                                       http_sink):
    from backup_assets.demo.cluster import free_port

    source = pg_source(pg18, myloware_db)
    source["connection"]["port"] = free_port()
    catalog = write_catalog({"myloware": source}, alerts=alert_config(smtp_sink, http_sink))
    defs = build_definitions(catalog)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            partition_key="2026-11-20", instance=instance, raise_on_error=False,
            asset_selection=[backup_key("myloware", "core", "daily")])
        assert not result.success
        sensor = defs.resolve_sensor_def("run_failure_alerts")
        sensor(_failure_context(instance, result.run_id))

        assert len(smtp_sink.messages) == 1
        mail = smtp_sink.messages[0]
        assert subject(mail) == "[ERROR] myloware/core/daily [2026-11-20]: run of daily_backups failed"
        body = mail.get_payload()
        for needle in ("source: myloware", "group: core", "tier: daily", "partition: 2026-11-20",
                       "cannot connect to PostgreSQL", f"run: http://127.0.0.1:3000/runs/{result.run_id}"):
            assert needle in body, needle
        hooks = [r for r in http_sink.requests if r["path"] == "/hooks/backup"]
        assert len(hooks) == 1
        assert verify_signature(hooks[0]["body"], hooks[0]["headers"].get(SIGNATURE_HEADER), os.environ[WEBHOOK_SECRET_ENV])
        payload = json.loads(hooks[0]["body"])
        assert payload["source"] == "myloware" and payload["partition"] == "2026-11-20" and payload["severity"] == "error"
        slack = [r for r in http_sink.requests if r["path"].startswith("/slack/api/chat.postMessage")]
        assert len(slack) == 1 and b"myloware%2Fcore%2Fdaily" in slack[0]["body"] or b"myloware/core/daily" in slack[0]["body"]
        assert slack[0]["headers"]["Authorization"] == f"Bearer {os.environ['BA_TEST_SLACK_TOKEN']}"
        for secret in (os.environ[WEBHOOK_SECRET_ENV], pg18.password):
            assert secret.encode() not in hooks[0]["body"] and secret not in body

        # the same failure again within the window: no storm
        again = defs.resolve_job_def("daily_backups").execute_in_process(
            partition_key="2026-11-20", instance=instance, raise_on_error=False,
            asset_selection=[backup_key("myloware", "core", "daily")])
        sensor(_failure_context(instance, again.run_id))
        assert len(smtp_sink.messages) == 1 and len([r for r in http_sink.requests if r["path"] == "/hooks/backup"]) == 1


def test_failed_checks_alert_once_including_warnings(pg18, myloware_db, write_catalog, smtp_sink, http_sink):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)},
                            alerts=alert_config(smtp_sink, http_sink, window_minutes=0))
    defs = build_definitions(catalog)
    job = defs.resolve_job_def("daily_backups")
    key = backup_key("myloware", "core", "daily")
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(partition_key="2026-11-19", instance=instance, asset_selection=[key]).success
        with pg18.connect(myloware_db) as conn:
            conn.execute("INSERT INTO webhook_events (provider, event_type, signature, payload, raw_body) "
                         "SELECT 'x', 'y', md5(g::text), '{}', repeat(md5(random()::text), 40) FROM generate_series(1, 5000) g")
        result = job.execute_in_process(partition_key="2026-11-20", instance=instance, asset_selection=[key])
        assert result.success, "a WARN check does not fail the run, so no run-failure sensor would ever see it"
        sensor = defs.resolve_sensor_def("check_failure_alerts")
        ctx = dg.build_sensor_context(instance=instance, cursor=None)
        sensor(ctx)
        assert len(smtp_sink.messages) == 1
        assert subject(smtp_sink.messages[0]) == "[WARNING] myloware/core/daily [2026-11-20]: check size_anomaly failed"
        cursor = ctx.cursor
        assert int(cursor) > 0
        sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
        assert len(smtp_sink.messages) == 1, "each failure alerts once"


def test_freshness_and_disk_space_alerts(miyabi_db, write_catalog, smtp_sink, http_sink, monkeypatch):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            alerts=alert_config(smtp_sink, http_sink, disk_free_min_percent=100))
    defs = build_definitions(catalog)
    with dg.instance_for_test() as instance:
        assert defs.resolve_job_def("daily_backups").execute_in_process(partition_key="2026-11-20", instance=instance).success
        sensor = defs.resolve_sensor_def("freshness_alerts")
        sensor(dg.build_sensor_context(instance=instance))
        assert smtp_sink.messages == [], "a fresh backup does not alert"
        monkeypatch.setitem(sensors_module.FRESHNESS, "daily", (dt.timedelta(seconds=0), dt.timedelta(seconds=0)))
        sensor(dg.build_sensor_context(instance=instance))
        assert subject(smtp_sink.messages[-1]) == "[ERROR] miyabi/full/daily: backup is stale"
        defs.resolve_sensor_def("disk_space_alerts")(dg.build_sensor_context(instance=instance))
        assert subject(smtp_sink.messages[-1]).endswith("backup volume low on space")
        assert "threshold 10 GB or 100%" in smtp_sink.messages[-1].get_payload()


def test_every_backup_asset_has_a_tier_freshness_policy(write_catalog, tmp_path):
    catalog = write_catalog({"m": {"engine": "sqlite", "path": str(tmp_path / "m.db")}})
    defs = build_definitions(catalog)
    key = backup_key("m", "full", "daily")
    daily = defs.resolve_assets_def(key).specs_by_key[key].freshness_policy
    assert daily.fail_window.to_timedelta() == dt.timedelta(hours=30)
    assert daily.warn_window.to_timedelta() == dt.timedelta(hours=26)


def test_backup_health_report(miyabi_db, write_catalog):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}}, tiers={"daily": {"drill": True}})
    defs = build_definitions(catalog)
    with dg.instance_for_test() as instance:
        assert defs.resolve_job_def("daily_backups").execute_in_process(partition_key="2026-11-20", instance=instance).success
        result = defs.resolve_job_def("maintenance").execute_in_process(instance=instance)
        assert result.success
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events() for m in
                [m.event_specific_data.materialization]}
        md = mats["operations/backup_health"].metadata
        report = md["report"].value
        assert "| miyabi | full | daily | 2026-11-20 |" in report and "| yes |" in report
        assert "| miyabi | full | weekly | — |" in report and "| NO |" in report
        assert "in 30 days" in report and md["estimated_30_day_bytes"].value > 0


def test_run_hygiene_keeps_the_latest_materialization_of_every_partition(miyabi_db, write_catalog):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    job = build_definitions(catalog).resolve_job_def("daily_backups")
    key = backup_key("miyabi", "full", "daily")
    with dg.instance_for_test() as instance:
        runs = {}
        for partition in ("2026-11-18", "2026-11-19", "2026-11-19", "2026-11-20"):
            runs.setdefault(partition, []).append(job.execute_in_process(partition_key=partition, instance=instance).run_id)
        dry = prune_runs(instance, older_than_days=0, dry_run=True, now=dt.datetime.now(UTC) + dt.timedelta(seconds=5))
        assert dry["deleted"] == 1 and dry["run_ids"] == [runs["2026-11-19"][0]]
        assert len(instance.get_runs()) == 4
        report = prune_runs(instance, older_than_days=0, dry_run=False, now=dt.datetime.now(UTC) + dt.timedelta(seconds=5))
        assert report["deleted"] == 1 and report["kept_latest_materialization"] == 3
        assert {r.run_id for r in instance.get_runs()} == {runs["2026-11-18"][0], runs["2026-11-19"][1], runs["2026-11-20"][0]}
        assert instance.get_materialized_partitions(key) == {"2026-11-18", "2026-11-19", "2026-11-20"}


def test_catalog_rejects_inline_alert_secrets(tmp_path):
    from backup_assets.catalog import CatalogError, parse_catalog

    with pytest.raises(CatalogError, match=r"alerts\.email: 'password' is not allowed"):
        parse_catalog({"repository": {"root": "/x"}, "sources": {"m": {"engine": "sqlite", "path": "/m.db"}},
                       "alerts": {"email": {"host": "h", "sender": "a@b", "recipients": ["c@d"], "password": "pw"}}})


def test_a_failed_restore_run_alerts_naming_source_target_and_error_once_per_target(miyabi_db, write_catalog,
                                                                                   smtp_sink, http_sink):
    from backup_assets.core.backup.take import run_backup

    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            alerts=alert_config(smtp_sink, http_sink))
    run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    defs = build_definitions(catalog)
    job, sensor = defs.resolve_job_def("restore"), defs.resolve_sensor_def("run_failure_alerts")

    def refused(instance, config: dict) -> None:
        result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                        instance=instance, raise_on_error=False)
        assert not result.success
        sensor(_failure_context(instance, result.run_id))

    with dg.instance_for_test() as instance:  # one instance: its key-value store remembers what was sent
        refused(instance, {"source": "miyabi", "group": "full", "confirm": True})  # its own file: refused by the catalog
        refused(instance, {"source": "miyabi", "group": "full", "target_file": str(miyabi_db.parent / "copy.db")})
        refused(instance, {"source": "miyabi", "group": "full", "confirm": True})  # the same again: within the window
    hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
    assert len(hooks) == 2, hooks
    assert hooks[0]["source"] == "miyabi" and "miyabi's own database or file" in hooks[0]["title"]
    assert "refusing to replace file" in hooks[0]["error"]
    assert f"restore into {miyabi_db.parent / 'copy.db'} failed" in hooks[1]["title"]
    assert "refusing without confirm: true" in hooks[1]["error"]


def test_failed_cli_backups_and_restores_alert_even_when_the_alert_memory_cannot_be_written(
        pg18, myloware_db, write_catalog, smtp_sink, http_sink, tmp_path, monkeypatch, capsys):
    """A backup run by `backup-assets backup` runs in its process: no daemon's sensor sees it, so the CLI alerts
    itself; a full volume where the alert memory lives must not stop the next alerts."""
    import errno

    from backup_assets.cli import main
    from backup_assets.core.monitoring import alerts as alerts_module
    from backup_assets.demo.cluster import free_port

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(alerts_module, "write_json_atomic", disk_full)
    source = pg_source(pg18, myloware_db, groups={"core": {"tables": ["runs"]}, "kb": {"tables": ["kb_documents"]}},
                       globals=False)
    source["connection"]["port"] = free_port()  # nobody listens: every backup fails
    catalog = write_catalog({"myloware": source}, alerts=alert_config(smtp_sink, http_sink))
    assert main(["--catalog", catalog.catalog_path, "backup", "--tier", "daily", "--partition", "2026-11-20"]) == 1
    hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
    assert sorted((h["source"], h["group"], h["partition"]) for h in hooks) == [
        ("myloware", "core", "2026-11-20"), ("myloware", "kb", "2026-11-20")], hooks
    assert all("Connection refused" in h["error"] for h in hooks), hooks
    assert "alert sent to" in capsys.readouterr().err
    # a CLI restore that fails alerts too, naming its target
    good = write_catalog({"myloware": pg_source(pg18, myloware_db, groups={"core": {"tables": ["runs"]}})},
                         alerts=alert_config(smtp_sink, http_sink))
    from backup_assets.core.backup.take import run_backup

    run_backup(good, "myloware", "core", "daily", "2026-11-20")
    assert main(["--catalog", good.catalog_path, "restore", "--source", "myloware", "--group", "core", "--tables",
                 "runs", "--target-db", "no_such_database_here", "--confirm"]) == 1
    hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
    assert "restore into no_such_database_here (tables runs) failed" in hooks[-1]["title"]
    assert "does not exist" in hooks[-1]["error"]


def test_a_killed_cli_backup_is_marked_failed_and_alerted_once(pg18, myloware_db, write_catalog, smtp_sink, http_sink,
                                                               tmp_path, monkeypatch, capsys):
    """`backup-assets backup` runs its run in its own process: killed mid-run, nothing launched it, so no
    launcher knows the worker. The owner tag tells the run launcher's health check (run monitoring), doctor and
    the next backup that it is dead; it is marked failed and alerted, once, whichever sees it first."""
    import subprocess
    import sys

    from backup_assets.cli import main
    from backup_assets.defs.run_launcher import LocalRunLauncher

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, groups={"core": {"tables": ["runs"]}},
                                                   globals=False)}, alerts=alert_config(smtp_sink, http_sink))
    blocker = pg18.connect(myloware_db, autocommit=False)
    blocker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")  # the dump waits here, mid-run
    env = dict(os.environ)
    env.pop("BACKUP_ASSETS_CATALOG", None)
    proc = subprocess.Popen([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path, "backup",
                             "--tier", "daily", "--select", "myloware/core", "--partition", "2026-11-20"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    instance = dg.DagsterInstance.get()
    try:
        from .conftest import wait_for

        def started():
            runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED],
                                                           tags={"backup_assets/trigger": "cli"}))
            return runs[0] if runs else None

        run = wait_for(started, 120, "the command's run to start")
        launcher = LocalRunLauncher()
        assert launcher.check_run_worker_health(run).status.value == "RUNNING"
        proc.kill()
        proc.wait()
    finally:
        blocker.rollback()
        blocker.close()
    run = instance.get_run_by_id(run.run_id)
    assert run.status == dg.DagsterRunStatus.STARTED  # nothing else knows it is dead
    health = LocalRunLauncher().check_run_worker_health(run)
    assert health.status.value == "FAILED" and f"pid {proc.pid}" in health.msg, health

    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    out = capsys.readouterr()
    assert f"run {run.run_id} of daily_backups marked failed" in out.out + out.err
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
    assert [(h["source"], h["group"], h["partition"]) for h in hooks] == [("myloware", "core", "2026-11-20")], hooks
    assert "killed or crashed mid-run" in hooks[0]["error"]
    # the daemon's sensor for command-line runs sees the same failure: the shared memory keeps it to one alert
    defs = build_definitions(catalog)
    sensor = defs.resolve_sensor_def("cli_run_failure_alerts")
    sensor(_failure_context(instance, run.run_id, "cli_run_failure_alerts"))
    assert len([r for r in http_sink.requests if r["path"] == "/hooks/backup"]) == 1
    assert "backup_assets/alerts_sent" in instance.run_storage.get_cursor_values({"backup_assets/alerts_sent"})
    assert not (catalog.repository_root / ".alerts").exists()  # the instance remembers, not the repository
    # a run of another repository's command is not this catalog's to alert
    other = instance.create_run_for_job(defs.resolve_job_def("daily_backups"), tags={
        "backup_assets/trigger": "cli", "backup_assets/repository": "0" * 16})
    instance.report_run_failed(other, "someone else's")
    sensor(_failure_context(instance, other.run_id, "cli_run_failure_alerts"))
    assert len([r for r in http_sink.requests if r["path"] == "/hooks/backup"]) == 1
    instance.dispose()


def test_a_run_failing_on_blocking_checks_is_left_to_the_check_alerts_only_when_they_watch_every_one():
    """The run-failure sensor stays quiet about a step that failed on blocking checks only when
    check_failure_alerts alerts each of those checks by name; any other failed check is a run failure to alert."""
    from types import SimpleNamespace as NS

    from backup_assets.defs.sensors import is_check_failure

    error = NS(cls_name="DagsterAssetCheckFailedError",
               message="dagster._core.errors.DagsterAssetCheckFailedError: 2 blocking asset checks failed with ERROR "
                       "severity:\nmyloware/base_backup: base_verified,pitr_drill\n")
    event = NS(event_specific_data=NS(error=error))
    base = dg.AssetKey(["myloware", "base_backup"])
    both = {dg.AssetCheckKey(base, "base_verified"), dg.AssetCheckKey(base, "pitr_drill")}
    assert is_check_failure(event, both)
    assert not is_check_failure(event, {dg.AssetCheckKey(base, "base_verified")})
    other = NS(event_specific_data=NS(error=NS(cls_name="Failure", message="x")))
    assert not is_check_failure(other, both)
