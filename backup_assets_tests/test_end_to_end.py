"""End to end: dagster-webserver and dagster-daemon as processes, their instance stored in a real
PostgreSQL (the production dagster.yaml), a schedule with a near tick, a backfill of three missed
days from the UI's GraphQL API, then the database under backup stopped and the alert arriving by
SMTP and webhook."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from backup_assets.demo.cluster import LocalCluster, embedded_bin_dir, free_port
from backup_assets.demo.seed import Scale, seed_myloware
from backup_assets.defs.keys import backup_key, replica_key

from .conftest import PG18_PASSWORD_ENV, alert_config, graphql, s3_replication, wait_for

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PASSWORD_ENV = "BA_E2E_SOURCE_PASSWORD"




def next_tick() -> dt.datetime:
    """The next whole minute at least 40 seconds away, in UTC."""
    now = dt.datetime.now(dt.timezone.utc)
    tick = (now + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    return tick if (tick - now).total_seconds() >= 40 else tick + dt.timedelta(minutes=1)


@pytest.fixture
def source_cluster(tmp_path):
    cluster = LocalCluster(embedded_bin_dir(), tmp_path / "source_pg", free_port(), "src-" + os.urandom(6).hex())
    cluster.start()
    os.environ[SOURCE_PASSWORD_ENV] = cluster.password
    cluster.create_database("myloware")
    with cluster.connect("myloware") as conn:
        seed_myloware(conn, Scale(runs=200, webhooks=200, documents=10, chunks_per_document=3, dims=16))
    cluster.create_database("crm")
    with cluster.connect("crm") as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 20) g")
    yield cluster
    log = cluster.data_dir / "server.log"
    if log.exists():  # kept with the test's files, to see what the server said when something failed
        (tmp_path / "source_server.log").write_bytes(log.read_bytes())
    cluster.destroy()


def test_daemon_runs_the_schedule_backfills_and_alerts(pg18, source_cluster, moto_s3, bucket, smtp_sink, http_sink,
                                                       tmp_path, monkeypatch, request):
    # the Dagster instance lives in PostgreSQL, as in production
    pg18.create_database("dagster_e2e")
    home = tmp_path / "dagster_home"
    home.mkdir()
    # the production instance file, with run monitoring polling every few seconds for the test
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text().replace(
        "poll_interval_seconds: 60", "poll_interval_seconds: 5"))
    web_port = free_port()
    web = f"http://127.0.0.1:{web_port}"
    tick = next_tick()
    # the repository on a volume of its own, to fill up later
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(volume)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the repository: {mounted.stderr.decode().strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(volume)], check=False))
    catalog = {
        "repository": {"root": str(volume / "backups")},
        "start_date": "2026-11-01",
        "tiers": {"daily": {"time": tick.strftime("%H:%M"), "drill": True},
                  "weekly": {"enabled": False}, "monthly": {"enabled": False}},
        "dr_drill": {"enabled": False},
        "sources": {"myloware": {
            "engine": "postgres",
            "connection": {"host": "127.0.0.1", "port": source_cluster.port, "dbname": "myloware",
                           "user": "postgres", "password_env": SOURCE_PASSWORD_ENV},
            "groups": {"core": {"tables": ["runs", "artifacts", "webhook_events", "hitl_approvals"]},
                       "kb": {"tables": ["kb_documents"]}},
        }, "crm": {  # another source on the same server: the UI may never replace it
            "engine": "postgres", "globals": False,
            "connection": {"host": "127.0.0.1", "port": source_cluster.port, "dbname": "crm",
                           "user": "postgres", "password_env": SOURCE_PASSWORD_ENV},
            "groups": {"full": {}},
        }},
        "replication": s3_replication(moto_s3, bucket),
        "alerts": alert_config(smtp_sink, http_sink, dagster_url=web, sensor_interval_seconds=5, window_minutes=0),
    }
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog))
    env = dict(os.environ, DAGSTER_HOME=str(home), BACKUP_ASSETS_CATALOG=str(catalog_path),
               DAGSTER_PG_HOST=pg18.host, DAGSTER_PG_PORT=str(pg18.port), DAGSTER_PG_DB="dagster_e2e",
               DAGSTER_PG_USER=pg18.superuser, DAGSTER_PG_PASSWORD=os.environ[PG18_PASSWORD_ENV])
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD"):
        monkeypatch.setenv(name, env[name])  # this process reads the same instance
    # the storages are created here first, as `make run` does (demo.prepare_instance): a webserver and a daemon
    # creating a fresh PostgreSQL storage at the same moment race, and the loser exits on "type instigators already
    # exists" (the deployments restart it: compose's loop, systemd's Restart=on-failure; this test would not)
    with dg.DagsterInstance.from_config(str(home)) as first:
        first.get_runs(limit=1)
        first.all_instigator_state()
        first.event_log_storage.get_event_records(dg.EventRecordsFilter(dg.DagsterEventType.RUN_SUCCESS), limit=1)
    bin_dir = Path(sys.executable).parent
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("webserver", "daemon")}
    procs = [
        subprocess.Popen([str(bin_dir / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1",
                          "-p", str(web_port)], cwd=ROOT, env=env, stdout=logs["webserver"], stderr=subprocess.STDOUT,
                         start_new_session=True),
        subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")], cwd=ROOT, env=env,
                         stdout=logs["daemon"], stderr=subprocess.STDOUT, start_new_session=True),
    ]
    key = backup_key("myloware", "core", "daily").path
    rkey = replica_key("myloware", "core", "daily").path
    try:
        def server_up():
            try:
                return graphql(web, "{ version }")
            except OSError:
                return None

        wait_for(server_up, 120, "dagster-webserver")

        # 1. the schedule fires by itself and backs up yesterday's partition, checked and replicated
        yesterday = (tick - dt.timedelta(days=1)).date().isoformat()
        runs_query = """query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) {
            ... on Runs { results { runId status tags { key value } } } } }"""

        def scheduled_run_done():
            results = graphql(web, runs_query, {"tags": [{"key": "dagster/schedule_name",
                                                         "value": "daily_backup_schedule"}]})["runsOrError"]["results"]
            done = [r for r in results if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            return done[0] if done else None

        run = wait_for(scheduled_run_done, 240, "the scheduled run")
        assert run["status"] == "SUCCESS", (tmp_path / "daemon.log").read_text()[-3000:]
        assert {"key": "dagster/partition", "value": yesterday} in run["tags"]
        asset_query = """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
            assetMaterializations(limit: 50) { partition runId } } } }"""
        mats = graphql(web, asset_query, {"key": {"path": key}})["assetOrError"]["assetMaterializations"]
        assert {"partition": yesterday, "runId": run["runId"]} in mats
        replica = graphql(web, asset_query, {"key": {"path": rkey}})["assetOrError"]["assetMaterializations"]
        assert any(m["partition"] == yesterday for m in replica)
        instance = dg.DagsterInstance.from_config(str(home))
        check_keys = [dg.AssetCheckKey(dg.AssetKey(key), n) for n in ("artifact_intact", "archive_readable", "restore_drill")]
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
        assert {k.name: r.status.value for k, r in latest.items()} == {
            "artifact_intact": "SUCCEEDED", "archive_readable": "SUCCEEDED", "restore_drill": "SUCCEEDED"}

        # 2. three missed days, backfilled from the UI's API (the daily_backups job's partitions, which
        #    carry the checks and the replica): one run per partition
        missed = ["2026-11-10", "2026-11-11", "2026-11-12"]
        selector = {"repositorySelector": {"repositoryName": "__repository__",
                                           "repositoryLocationName": "backup_assets"},
                    "partitionSetName": "daily_backups_partition_set"}
        launched = graphql(web, """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
                           {"params": {"selector": selector, "partitionNames": missed}})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        akey = dg.AssetKey(key)

        def state() -> str:  # what to look at when a wait times out
            runs = [(r.run_id[:8], r.status.value, r.tags.get("dagster/partition")) for r in instance.get_runs(limit=20)]
            with source_cluster.connect() as conn:
                activity = conn.execute(
                    "SELECT pid, state, wait_event_type, wait_event, left(query, 120) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()
            daemon = (tmp_path / "daemon.log").read_text(errors="replace").splitlines()[-80:]
            return f"runs: {runs}\nsource server sessions: {activity}\ndaemon.log:\n" + "\n".join(daemon)

        wait_for(lambda: set(missed) <= instance.get_materialized_partitions(dg.AssetKey(rkey)), 300,
                 "the backfill", on_timeout=state)
        assert set(missed) <= instance.get_materialized_partitions(akey)

        def backfill_done():  # every run of it ended (a run also backs up the roles after the core group)
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": launched["backfillId"]}))
            return runs if len(runs) == len(missed) and all(r.is_finished for r in runs) else None

        backfill_runs = wait_for(backfill_done, 300, "the backfill's runs to end")
        assert all(r.is_success for r in backfill_runs), [(r.run_id, r.status) for r in backfill_runs]
        from backup_assets.defs.sensors import run_partition

        assert sorted(run_partition(r.tags) for r in backfill_runs) == missed, "one partition per run"
        for partition in missed:
            history = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(akey, "artifact_intact"), limit=50)
            assert any(r.status.value == "SUCCEEDED" and r.event and
                       r.event.dagster_event.event_specific_data.partition == partition for r in history), partition

        # 3. the database under backup goes away while the repository's volume is full: every failure (each
        #    group and the roles) reaches people by SMTP and webhook all the same
        filler = volume / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        source_cluster.stop("immediate")
        before = len(smtp_sink.messages)
        launched = graphql(web, """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } } }""",
                           {"params": {"selector": selector, "partitionNames": ["2026-11-13"]}})
        assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"
        mail = wait_for(lambda: [m for m in smtp_sink.messages[before:] if "run of" in str(m["Subject"])], 240,
                        "the failure alert by email")[0]
        body = mail.get_payload()
        assert "partition: 2026-11-13" in body and "cannot connect to PostgreSQL" in body and f"{web}/runs/" in body
        hooks = [json.loads(r["body"]) for r in http_sink.requests if r["path"] == "/hooks/backup"]
        failed_groups = wait_for(lambda: (g := sorted(h["group"] for h in (json.loads(r["body"]) for r in http_sink.requests
                                                                         if r["path"] == "/hooks/backup")
                                                  if h["partition"] == "2026-11-13" and h["source"] == "myloware"))
                                               == ["core", "globals", "kb"] and g,
                                 120, "an alert for each failed group")
        assert failed_groups == ["core", "globals", "kb"]  # the roles' backup fails with the database
        assert any(h["partition"] == "2026-11-13" and h["source"] == "myloware" and "cannot connect" in h["error"]
                   for h in hooks)
        filler.unlink()

        # 4. a run worker killed mid-run: run monitoring marks the run failed and the alert fires
        source_cluster.start()
        blocker = source_cluster.connect("myloware", autocommit=False)
        blocker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")  # the dump waits here, mid-run
        try:
            launched = graphql(web, """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                __typename ... on LaunchBackfillSuccess { backfillId } } }""",
                               {"params": {"selector": selector, "partitionNames": ["2026-11-14"]}})
            backfill_id = launched["launchPartitionBackfill"]["backfillId"]

            def worker_pid():
                runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
                for r in runs:
                    for record in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
                        if "Started process for run" in (record.dagster_event.message or ""):
                            return r.run_id, int(record.dagster_event.event_specific_data.metadata["pid"].value)
                return None

            run_id, pid = wait_for(worker_pid, 240, "the run worker to start")
            os.kill(pid, signal.SIGKILL)
            status = wait_for(lambda: (r := instance.get_run_by_id(run_id)) and r.status.value in ("FAILURE", "CANCELED")
                              and r.status.value, 180, "run monitoring to mark the killed run failed")
            assert status == "FAILURE"
            wait_for(lambda: any(json.loads(r["body"]).get("partition") == "2026-11-14" for r in http_sink.requests
                                 if r["path"] == "/hooks/backup"), 120, "the alert for the killed run")

            # 5. `backup-assets backup` killed mid-run: its run is in the command's process, outside any code
            #    location; run monitoring sees from the owner tag that the process is gone, marks the run failed,
            #    and the sensor for command-line runs alerts it
            cli = subprocess.Popen([sys.executable, "-m", "backup_assets.cli", "backup", "--tier", "daily",
                                    "--select", "myloware/core", "--partition", "2026-11-15"], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def cli_run():
                runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED],
                                                               tags={"backup_assets/trigger": "cli"}))
                return runs[0].run_id if runs else None

            cli_run_id = wait_for(cli_run, 240, "the command's run to start")
            cli.kill()
            cli.wait()
            wait_for(lambda: instance.get_run_by_id(cli_run_id).status == dg.DagsterRunStatus.FAILURE, 180,
                     "run monitoring to mark the killed command's run failed")
            hook = wait_for(lambda: [h for r in http_sink.requests if r["path"] == "/hooks/backup"
                                     for h in [json.loads(r["body"])] if h.get("partition") == "2026-11-15"], 120,
                            "the alert for the killed command's run")[0]
            assert hook["source"] == "myloware" and "killed or crashed mid-run" in hook["error"], hook
        finally:
            blocker.rollback()
            blocker.close()

        # 6. the webserver has no login: what the UI's API may destroy is what the catalog allows
        launch = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } } } }"""
        location = {"repositoryLocationName": "backup_assets", "repositoryName": "__repository__"}

        def run_job(job: str, config: dict) -> dg.DagsterRun:
            done = graphql(web, launch, {"params": {"selector": {**location, "jobName": job},
                                                    "runConfigData": config}})["launchRun"]
            assert done["__typename"] == "LaunchRunSuccess", done
            run_id = done["run"]["runId"]
            return wait_for(lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r, 240,
                            f"the {job} run")

        def restore(**config) -> dg.DagsterRun:
            return run_job("restore", {"ops": {"restore_backup": {"config": {
                "source": "myloware", "group": "core", "partition": yesterday, **config}}}})

        with source_cluster.connect("crm") as conn:
            crm_before = conn.execute("SELECT count(*) FROM customers").fetchone()
        refused = restore(target_database="crm", safety_copy=False, terminate_connections=True, confirm=True)
        assert refused.status == dg.DagsterRunStatus.FAILURE
        no_copy = restore(target_database="myloware_copy", safety_copy=False, confirm=True)
        assert no_copy.status == dg.DagsterRunStatus.FAILURE
        with source_cluster.connect("crm") as conn:  # untouched, and no restored table in it
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == crm_before
            assert not conn.execute("SELECT 1 FROM pg_class WHERE relname = 'runs'").fetchone()
        copied = restore(target_database="myloware_copy", confirm=True)
        assert copied.status == dg.DagsterRunStatus.SUCCESS
        # each refusal alerted by name (source and target), not folded into one "restore failed"
        targets = wait_for(lambda: (t := sorted(h["title"] for h in (json.loads(r["body"]) for r in http_sink.requests
                                                                     if r["path"] == "/hooks/backup")
                                                if h.get("asset") == "restore:myloware")) and len(t) >= 2 and t,
                           120, "the alerts for the refused restores")
        assert any("restore into crm failed" in t for t in targets), targets
        assert any("restore into myloware_copy failed" in t for t in targets), targets
        # the restore log holds all three, with the run that asked; pruning the run history keeps them
        pruned = run_job("prune_run_history", {"ops": {"prune_old_runs": {"config": {"older_than_days": 0}}}})
        assert pruned.status == dg.DagsterRunStatus.SUCCESS
        for run in (refused, no_copy, copied):
            assert instance.get_run_by_id(run.run_id) is not None, "a restore run was pruned"
        log = [json.loads(line) for line in (volume / "backups" / "restores.jsonl").read_text().splitlines()]
        by_run = {}
        for entry in log:
            by_run.setdefault(entry.get("run_id"), []).append(entry)
        assert [e["outcome"] for e in by_run[refused.run_id]] == ["refused"]
        assert by_run[refused.run_id][0]["target"] == "crm"
        assert [e.get("outcome") for e in by_run[copied.run_id]] == [None, "ok"], by_run[copied.run_id]
        instance.dispose()
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for fh in logs.values():
            fh.close()
