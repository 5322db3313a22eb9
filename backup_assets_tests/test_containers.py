"""docker/ for real: build the image with podman FROM the local Debian base image, start the compose stack
(podman-compose), back up a PostgreSQL database that runs in another container with a run that
DockerRunLauncher starts in a container of its own (through podman's Docker-compatible socket), see the
run succeed and its checks pass through the webserver's GraphQL API, and take the stack down.

Needs root, podman and the base image (`../shared/containers/base-image.sh`, which .ci/run calls).
Run alone with `pytest -m containers`; leave out with `-m "not containers"`."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backup_assets.demo.cluster import free_port

from .conftest import graphql, wait_for

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/debian:bookworm"
APP_IMAGE, PG_IMAGE = "localhost/backup-assets:test", "localhost/backup-assets-postgres:test"
PROJECT = "backup_assets"
SOURCE = "ba_test_source_db"
PROBE = """
import os, subprocess
from backup_assets.core.engines.postgres import find_tool
print(os.getuid())
for major in (15, 18):
    print(subprocess.run([find_tool("pg_dump", major)[0], "--version"], capture_output=True, text=True).stdout.strip())
for tool in ("psql", "zstd", "age"):
    print(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[0])
"""


def run(*argv, timeout: float = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert not check or done.returncode == 0, f"{' '.join(map(str, argv))}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done




@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """podman with the base image, and its Docker-compatible API socket for DockerRunLauncher."""
    if shutil.which("podman") is None or run("podman", "image", "exists", BASE_IMAGE, check=False).returncode != 0:
        script = Path(os.environ.get("BASE_IMAGE_SCRIPT", ROOT.parent / "shared" / "containers" / "base-image.sh"))
        assert script.exists(), f"podman and {BASE_IMAGE} are needed: run {script} (as root) first"
        run("bash", script, timeout=1200)
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock.exists, 30, "podman's API socket", interval=0.2)
    # as podman.socket's systemd unit makes it: read-write for its group (the containers join group 0)
    sock.chmod(0o660)
    yield sock
    service.terminate()
    service.wait(timeout=30)


def compose(env_file: Path, *args, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKUP_ASSETS_ENV_FILE": str(env_file)}
    tool = shutil.which("podman-compose", path=str(Path(sys.executable).parent)) or "podman-compose"
    return run(tool, "--env-file", env_file, "-f", ROOT / "docker" / "compose.yaml", *args, timeout=timeout,
               check=check, env=env)


def logs() -> str:
    out = []
    for name in ("daemon", "code", "webserver"):
        done = run("podman", "logs", "--tail", "40", f"{PROJECT}_{name}_1", check=False)
        out.append(f"--- {name}\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    for name in run("podman", "ps", "-a", "--format", "{{.Names}}", "--filter", f"ancestor={APP_IMAGE}",
                    check=False).stdout.split():
        if not name.startswith(f"{PROJECT}_"):  # a run's own container
            done = run("podman", "logs", "--tail", "60", name, check=False)
            out.append(f"--- run container {name}\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    runs = run("podman", "ps", "-a", "--format", "{{.Names}} {{.Image}} {{.Status}}", check=False).stdout
    return "\n".join(out) + "\n--- containers\n" + runs


@pytest.mark.timeout(2700)
def test_compose_stack_backs_up_a_database_in_another_container(engine, tmp_path):
    for image, dockerfile in ((PG_IMAGE, "docker/postgres/Dockerfile"), (APP_IMAGE, "docker/Dockerfile")):
        run("podman", "build", "-q", "-f", dockerfile, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", image, ".",
            timeout=1500)
    # the image: non-root, pg_dump of both majors (Debian's 15, the embedded 18), psql, zstd, age
    probe = run("podman", "run", "--rm", APP_IMAGE, "python", "-c", PROBE).stdout.splitlines()
    assert probe[0] != "0", probe
    assert probe[1].startswith("pg_dump (PostgreSQL) 15.") and probe[2].startswith("pg_dump (PostgreSQL) 18."), probe
    assert probe[3].startswith("psql (PostgreSQL)") and probe[4].startswith("*** Zstandard") and probe[5], probe

    port = free_port()
    source_password = "src-" + secrets.token_urlsafe(12)
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join([
        "DAGSTER_PG_HOST=dagster-postgres", "DAGSTER_PG_DB=dagster", "DAGSTER_PG_USER=dagster",
        f"DAGSTER_PG_PASSWORD=dg-{secrets.token_urlsafe(12)}",
        "SOURCE_DB_HOST=source-db", "SOURCE_DB_NAME=app", "SOURCE_DB_USER=postgres",
        f"SOURCE_DB_PASSWORD={source_password}",
        f"BACKUP_ASSETS_IMAGE={APP_IMAGE}", f"POSTGRES_IMAGE={PG_IMAGE}", f"DAGSTER_WEBSERVER_PORT={port}",
        f"DOCKER_SOCKET={engine}", "DOCKER_SOCKET_GID=0", f"BACKUP_ASSETS_ENV_FILE={env_file}", ""]))
    env_file.chmod(0o600)
    web = f"http://127.0.0.1:{port}"
    try:
        compose(env_file, "up", "-d", "--no-build")
        # the database to back up, in a container of its own on the stack's network
        run("podman", "run", "-d", "--name", SOURCE, "--network", "backup_assets", "--network-alias", "source-db",
            "-e", f"POSTGRES_PASSWORD={source_password}", "-e", "POSTGRES_DB=app", PG_IMAGE)
        wait_for(lambda: run("podman", "exec", SOURCE, "pg_isready", "-q", check=False).returncode == 0, 120,
                 "the source database")
        time.sleep(1)  # pg_isready answers during the first start's single-user step too
        wait_for(lambda: run("podman", "exec", SOURCE, "psql", "-q", "-d", "app", "-c", "SELECT 1",
                             check=False).returncode == 0, 60, "the source database to accept queries")
        run("podman", "exec", SOURCE, "psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", "app", "-c", """
            CREATE SCHEMA "Billing Dept";
            CREATE TABLE "Billing Dept"."Order Items" (id bigserial PRIMARY KEY, "Price.EUR" numeric, note text);
            INSERT INTO "Billing Dept"."Order Items" ("Price.EUR", note)
                SELECT n / 7.0, 'row ' || n FROM generate_series(1, 5000) n;
            CREATE TABLE runs (id serial PRIMARY KEY, status text);
            INSERT INTO runs (status) SELECT 'done' FROM generate_series(1, 300);""")

        # the webserver reaches the code server (both retry until the other is up)
        wait_for(lambda: "backup_assets" in json.dumps(graphql(web, """{ workspaceOrError { ... on Workspace {
            locationEntries { name locationOrLoadError { __typename } } } } }""")) and '"RepositoryLocation"' in json.dumps(
            graphql(web, "{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { __typename } } } } }")),
            300, "the webserver and the code location", on_timeout=logs)

        partition = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
        launched = graphql(web, """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
            ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidStepError { invalidStepKey }
            ... on RunConfigValidationInvalid { errors { message } } } }""", {"p": {
            "selector": {"repositoryLocationName": "backup_assets", "repositoryName": "__repository__",
                         "jobName": "daily_backups"},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        def finished():
            r = graphql(web, """query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }""",
                        {"id": run_id})["runOrError"]
            return r if r["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

        result = wait_for(finished, 600, "the backup run", interval=3, on_timeout=logs)
        assert result["status"] == "SUCCESS", logs()
        tags = {t["key"]: t["value"] for t in result["tags"]}
        assert tags.get("docker/container_id"), tags  # the run had a container of its own

        checks = graphql(web, """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
            assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } } } }""",
                         {"key": {"path": ["app", "full_daily"]}})["assetNodeOrError"]["assetChecksOrError"]["checks"]
        status = {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status") for c in checks}
        assert status == {"artifact_intact": "SUCCEEDED", "archive_readable": "SUCCEEDED",
                          "size_anomaly": "SUCCEEDED"}, status

        # the backup is in the repository volume, with the odd table's rows
        listed = run("podman", "run", "--rm", "-v", "backup_assets_repository:/backups", APP_IMAGE,
                     "backup-assets", "list", "--json").stdout
        rows = [r for r in json.loads(listed) if r["source"] == "app" and r["group"] == "full"]
        assert rows and rows[0]["partition"] == partition and rows[0]["rows"] == 5300, listed
        assert source_password not in listed + logs()
    finally:
        compose(env_file, "down", "-v", timeout=300, check=False)
        run("podman", "rm", "-f", SOURCE, check=False)
        for container in run("podman", "ps", "-a", "--format", "{{.Names}}", "--filter", f"ancestor={APP_IMAGE}",
                             check=False).stdout.split():
            run("podman", "rm", "-f", container, check=False)
        run("podman", "volume", "rm", "-f", "backup_assets_repository", check=False)
        run("podman", "network", "rm", "-f", "backup_assets", check=False)
