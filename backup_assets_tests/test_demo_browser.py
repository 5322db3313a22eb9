"""The demo as a newcomer meets it: `make run` (PostgreSQL with MyloWare and Miyabi, the SQLite stores, the S3
stand-in, the alert receiver, Dagster's webserver and daemon), `make backup`, then the UI in a real browser
(Debian's headless chromium driven by selenium) and the command line against the same demo.

Screenshots go to $BACKUP_ASSETS_SCREENSHOTS (the README's come from here: docs/screenshots), else to the
test's temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from backup_assets.demo.cluster import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LOCATION = "backup_assets"  # workspace.yaml names it as pyproject.toml does


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BACKUP_ASSETS_CATALOG"}
    env.update(BACKUP_ASSETS_DEMO_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"),
               BACKUP_ASSETS_DEMO_PG_PORT=str(free_port()), BACKUP_ASSETS_DEMO_S3_PORT=str(free_port()),
               BACKUP_ASSETS_DEMO_WEBHOOK_PORT=str(free_port()), BACKUP_ASSETS_DEMO_DAGSTER_PORT=str(port))
    log = open(home / "make_run.log", "wb")
    run = subprocess.Popen([sys.executable, "-m", "backup_assets.demo", "run"], env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _up(f"{base}/server_info"):
            assert run.poll() is None, (home / "make_run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the webserver did not come up in 300 s"
            time.sleep(1)
        backup = subprocess.run([sys.executable, "-m", "backup_assets.demo", "backup"], env=env, capture_output=True,
                                text=True, timeout=900)
        assert backup.returncode == 0, backup.stdout[-2000:] + backup.stderr[-3000:]
        yield {"base": base, "env": env, "home": home, "backup": backup.stdout, "run": run}
    finally:
        subprocess.run([sys.executable, "-m", "backup_assets.demo", "stop"], env=env, capture_output=True, timeout=120)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()


def cli(demo, *args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "backup_assets.cli", *args], env=demo["env"], capture_output=True,
                          text=True, timeout=600)
    assert not check or done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_demo_replicates_to_s3_restores_from_it_and_alerts_reach_the_receiver(demo):
    rows = json.loads(cli(demo, "list", "--json").stdout)
    sources = {r["source"] for r in rows}
    assert {"myloware", "miyabi_pg", "miyabi", "miyabi_persistence"} <= sources
    assert rows and all(r["where"] == "local+s3" for r in rows), rows
    assert all(r["verified"] == "drilled" for r in rows), rows  # the demo drills its daily tier
    # its replicas are immutable: the bucket has Object Lock and every replicated backup is locked
    import boto3

    from backup_assets.catalog import demo_env
    from backup_assets.demo.services import S3_BUCKET, S3_KEY_ENV, S3_SECRET_ENV

    env = {**demo["env"], **demo_env(demo["home"])}
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{env['BACKUP_ASSETS_DEMO_S3_PORT']}", region_name="us-east-1",
                      aws_access_key_id=env[S3_KEY_ENV], aws_secret_access_key=env[S3_SECRET_ENV])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET).get("Contents", []) if o["Key"].endswith(".meta")]
    assert keys and all(s3.head_object(Bucket=S3_BUCKET, Key=k[:-len(".meta")])["ObjectLockMode"] == "GOVERNANCE"
                        for k in keys), keys

    restored = cli(demo, "restore", "--from", "s3", "--source", "miyabi_pg", "--group", "full",
                   "--target-db", "miyabi_from_s3", "--confirm")
    assert "public.agent_executions" in restored.stdout and "DIFFERS" not in restored.stderr

    assert cli(demo, "alerts", "test").stdout.strip() == "OK   webhook"
    log = (demo["home"] / "alerts.log").read_text()
    assert "[signed] [WARNING] backup_assets: test alert" in log

    metrics = cli(demo, "metrics").stdout
    assert 'backup_assets_backup_rpo_met{group="full",source="miyabi_pg",tier="daily"} 1.0' in metrics


def test_make_backup_shows_in_dagster_one_run_per_partition_and_says_how_far_back_pitr_reaches(demo):
    import dagster as dg

    assert "a point-in-time restore of myloware reaches any moment from " in demo["backup"], demo["backup"]
    assert "myloware/full_daily " in demo["backup"]  # asset keys, as the UI names them
    instance = dg.DagsterInstance.from_config(str(demo["home"] / "dagster_home"))
    try:
        base = dg.AssetKey(["myloware", "base_backup"])
        assert instance.get_latest_materialization_event(base) is not None, "the base backup is in the UI"
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(base, n) for n in ("base_verified", "wal_continuity", "recovery_point", "pitr_drill")])
        assert len(checks) == 4, checks
        # the first make backup leaves two commits after a first base backup: the drill has a time to restore to
        drill = checks[dg.AssetCheckKey(base, "pitr_drill")].event.dagster_event.event_specific_data
        assert drill.passed, drill.description
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="daily_backups", tags={"backup_assets/trigger": "cli"}))
        assert len(runs) == 1, "one run for the partition, every daily asset in it"
        assert runs[0].tags["backup_assets/command"] == "backup-assets backup --tier daily"
    finally:
        instance.dispose()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def shots_dir(tmp_path) -> Path:
    path = Path(os.environ.get("BACKUP_ASSETS_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def visit(driver, url: str, *texts: str, timeout_s: float = 90) -> str:
    """Open a page, dismiss Dagster's newsletter prompt, wait until every text is on it; returns the text."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            try:
                button.click()
            except Exception:  # the prompt went away between finding and clicking
                pass
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts) and "fetching statuses" not in body and "Loading" not in body:
            time.sleep(1)  # let the graph settle before a screenshot
            return driver.find_element(By.TAG_NAME, "body").text
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"{url}: {missing} not shown within {timeout_s:g}s; the page shows: {body[:1500]}")


def test_the_ui_shows_lineage_partitions_checks_and_running_automation(demo, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, shots = demo["base"], shots_dir(tmp_path)
    # one source's assets: names tell group and tier apart, replicas are their own assets
    names = [f"{g}_{t}{r}" for g in ("full", "core", "kb", "globals") for t in ("daily", "weekly", "monthly")
             for r in ("", "_s3")]
    browser.set_window_size(1600, 3600)  # the list renders the rows in view: all of them
    text = visit(browser, f"{base}/locations/{LOCATION}/asset-groups/myloware/list", *names, "app_table_pruning")
    assert "\ndaily\n" not in f"\n{text}\n"  # no asset is named by its tier alone
    browser.set_window_size(1600, 1000)
    # the lineage from a daily backup: its replica, the weekly and monthly tiers promoted from it
    visit(browser, f"{base}/assets/myloware/core_daily?view=lineage&lineageScope=downstream&lineageDepth=5",
          "core_daily_s3", "core_weekly", "core_weekly_s3", "core_monthly", "core_monthly_s3", "app_table_pruning")
    browser.save_screenshot(str(shots / "lineage.png"))

    text = visit(browser, f"{base}/assets/myloware/core_daily?view=partitions", "Materialized (1)", "Missing (")
    browser.save_screenshot(str(shots / "partitions.png"))

    text = visit(browser, f"{base}/assets/myloware/core_daily?view=checks", "artifact_intact", "archive_readable",
                 "restore_drill", "size_anomaly")
    assert text.count("Succeeded") >= 4, text
    browser.save_screenshot(str(shots / "checks.png"))

    # the physical tier of the demo's server: its base backup asset with the point-in-time checks
    visit(browser, f"{base}/assets/myloware/base_backup?view=checks", "base_verified", "wal_continuity",
          "recovery_point", "pitr_drill")

    names = ["daily_backup_schedule", "weekly_backup_schedule", "monthly_backup_schedule", "maintenance_schedule",
             "dr_drill_schedule", "base_backup_schedule", "hourly_backup_schedule", "run_failure_alerts",
             "cli_run_failure_alerts", "check_failure_alerts", "freshness_alerts", "disk_space_alerts"]
    browser.set_window_size(1600, 2400)  # every row in view: the list renders only those
    visit(browser, f"{base}/automation", *names)
    deadline, stopped = time.monotonic() + 60, names
    while stopped and time.monotonic() < deadline:  # each row's toggle shows its state once its status has loaded
        stopped = [n for n in names if not _toggle_on(browser, n)]
        time.sleep(0.5)
    assert not stopped, f"not running in the UI: {stopped}"
    browser.set_window_size(1600, 1000)
    browser.save_screenshot(str(shots / "automation.png"))


def _toggle_on(browser, name: str) -> bool:
    """Whether the automation list's row for `name` has its toggle switched on."""
    from selenium.webdriver.common.by import By

    link = f"contains(@href, '/schedules/{name}') or contains(@href, '/sensors/{name}')"
    rows = browser.find_elements(By.XPATH, f"//div[contains(@class, 'ListItem_listItem')][.//a[{link}]]")
    return any(box.is_selected() for row in rows  # the row's switch, not its selection box
               for box in row.find_elements(By.CSS_SELECTOR, "label[class*=formatSwitch] input[type=checkbox]"))


def test_the_s3_stand_in_is_refilled_when_it_starts_empty(demo):
    """moto's server keeps its objects in memory: after a restart the demo puts the verified backups back, so the
    replicas the UI shows and `restore --from s3` stay true."""
    from backup_assets.demo.services import stop_services

    # only the stand-in: the alert receiver stays up (the daemon's alert sensors may send at any moment)
    assert stop_services(demo["home"], ("s3",)) == ["s3"]
    setup = subprocess.run([sys.executable, "-m", "backup_assets.demo", "setup"], env=demo["env"], capture_output=True,
                           text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert "the stand-in keeps nothing across restarts: put 7 backup(s) back" in setup.stdout, setup.stdout
    rows = json.loads(cli(demo, "list", "--json").stdout)
    assert rows and all(r["where"] == "local+s3" for r in rows), rows
    again = subprocess.run([sys.executable, "-m", "backup_assets.demo", "setup"], env=demo["env"], capture_output=True,
                           text=True, timeout=300)
    assert "put" not in again.stdout  # not empty: nothing to put back


def test_zz_a_second_make_run_is_refused_and_make_stop_stops_everything(demo, monkeypatch):
    """Last in this module (it stops the demo): `make run` again while it runs is refused and changes nothing;
    `make stop` stops webserver, daemon and code servers (they exit on SIGTERM: the first `make run` returns by
    itself) and says only what was running; the first screen of `make run` has no warning line."""
    from backup_assets.demo.__main__ import _dagster_processes

    env = demo["env"]
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])  # this demo's processes, not a developer's own demo
    running = _dagster_processes()
    assert len(running) >= 2, "webserver and daemon"
    again = subprocess.run([sys.executable, "-m", "backup_assets.demo", "run"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "the demo is already running" in again.stderr and "`make stop` stops it" in again.stderr
    assert set(running) <= set(_dagster_processes()), "the running demo was not touched"
    log = (demo["home"] / "make_run.log").read_text()
    for noise in ("RuntimeDirWarning", "SupersessionWarning", "Found a dagster instance configuration", "Traceback"):
        assert noise not in log, noise
    stopped = subprocess.run([sys.executable, "-m", "backup_assets.demo", "stop"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert "Dagster (webserver, daemon and code servers) stopped: pid" in stopped.stdout
    assert "demo PostgreSQL stopped" in stopped.stdout
    assert demo["run"].wait(timeout=30) == 0, "`make run` ends by itself when its Dagster is stopped"
    assert not _dagster_processes()
    assert not _up(demo["base"] + "/server_info")
    twice = subprocess.run([sys.executable, "-m", "backup_assets.demo", "stop"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert "Dagster was not running" in twice.stdout and "PostgreSQL stopped" not in twice.stdout, twice.stdout
