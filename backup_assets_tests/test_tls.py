"""TLS to PostgreSQL for real: Debian's PostgreSQL 15 with a certificate from a throwaway CA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.restore_drill import restore_drill
from backup_assets.demo.cluster import LocalCluster, _ensure_server_user, debian_bin_dir, free_port

from .conftest import pg_source

ENV = "BA_TEST_TLS_PASSWORD"


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    return folder / "ca.crt", folder / "ca.key"


@pytest.fixture
def tls_pg15(tmp_path):
    bin_dir = debian_bin_dir(15)
    if bin_dir is None:
        pytest.fail("Debian's PostgreSQL 15 is missing: .ci/run installs postgresql-15")
    ca_crt, ca_key = make_ca(tmp_path / "ca", "backup_assets test CA")
    cluster = LocalCluster(bin_dir, tmp_path / "pg15tls", free_port(), "tls-" + os.urandom(6).hex())
    cluster.init()
    data = cluster.data_dir
    work = tmp_path / "server"
    work.mkdir()
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=work)
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=work)
    user = _ensure_server_user()
    for name in ("server.crt", "server.key"):
        shutil.copy(work / name, data / name)
        os.chmod(data / name, 0o600)
        if user:
            os.chown(data / name, user.pw_uid, user.pw_gid)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    cluster.start()
    os.environ[ENV] = cluster.password
    cluster.create_database("secure")
    with cluster.connect("secure") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g ON CONFLICT DO NOTHING")
    yield cluster, ca_crt
    cluster.destroy()


def _catalog(write_catalog, cluster, **tls):
    source = pg_source(cluster, "secure", ENV, groups={"full": {}})
    source["connection"].update(tls)
    return write_catalog({"secure": source}, tiers={"daily": {"drill": True}})


def test_verify_full_backs_up_drills_and_restores_over_tls(tls_pg15, write_catalog):
    cluster, ca = tls_pg15
    catalog = _catalog(write_catalog, cluster, sslmode="verify-full", sslrootcert=str(ca))
    from backup_assets.core.backup.take import endpoint_for
    from backup_assets.core.engines import postgres

    with postgres.connect(endpoint_for(catalog, "secure")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
    run_backup(catalog, "secure", "full", "daily", "2026-11-20")
    backup = LocalRepository(catalog.repository_root).latest("secure", "full", "daily")
    assert restore_drill(catalog, backup).passed
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "secure", "--group", "full",
                 "--target-db", "secure_copy", "--confirm"]) == 0
    with cluster.connect("secure_copy") as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 50


def test_a_wrong_ca_is_refused_with_a_clear_message(tls_pg15, write_catalog, tmp_path, capsys):
    cluster, _ = tls_pg15
    wrong, _ = make_ca(tmp_path / "wrong", "some other CA")
    catalog = _catalog(write_catalog, cluster, sslmode="verify-full", sslrootcert=str(wrong))
    from backup_assets.core import BackupError

    with pytest.raises(BackupError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:\d+/secure: .*certificate verify failed"):
        run_backup(catalog, "secure", "full", "daily", "2026-11-20")
    assert not list(catalog.repository_root.rglob("*.zst"))


def test_verify_full_without_a_ca_is_a_catalog_error(write_catalog, tls_pg15):
    cluster, _ = tls_pg15
    from backup_assets.catalog import CatalogError

    with pytest.raises(CatalogError, match="sslmode verify-full needs sslrootcert"):
        _catalog(write_catalog, cluster, sslmode="verify-full")


class TlsProxy:
    """HTTPS on 127.0.0.1 in front of moto's HTTP server, with a certificate from a throwaway CA."""

    def __init__(self, backend_port: int, cert: Path, key: Path):
        import socket
        import ssl
        import threading

        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(cert), str(key))
        self._backend = backend_port
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import select
        import socket
        import threading

        while not self._stop:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return

            def handle(raw=raw):
                try:
                    conn = self._ctx.wrap_socket(raw, server_side=True)
                except OSError:
                    raw.close()
                    return
                backend = socket.create_connection(("127.0.0.1", self._backend))
                # one thread per connection: an SSLSocket must not be read and written concurrently
                try:
                    while True:
                        ready = [conn] if conn.pending() else select.select([conn, backend], [], [], 30)[0]
                        if not ready:
                            return
                        for src in ready:
                            data = src.recv(65536)
                            if not data:
                                return
                            (backend if src is conn else conn).sendall(data)
                except OSError:
                    return
                finally:
                    for sock in (conn, backend):
                        try:
                            sock.close()
                        except OSError:
                            pass

            threading.Thread(target=handle, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._sock.close()


@pytest.fixture
def https_s3(moto_s3, tmp_path):
    ca_crt, ca_key = make_ca(tmp_path / "s3ca", "backup_assets S3 test CA")
    work = tmp_path / "s3cert"
    work.mkdir()
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "s3.key", "-out", "s3.csr", cwd=work)
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "s3.csr", "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", "san.ext", "-out", "s3.crt", cwd=work)
    proxy = TlsProxy(moto_s3.port, work / "s3.crt", work / "s3.key")
    yield f"https://127.0.0.1:{proxy.port}", ca_crt
    proxy.close()


def test_s3_over_https_with_a_ca_bundle(miyabi_db, write_catalog, moto_s3, bucket, https_s3, tmp_path):
    from backup_assets.core import BackupError
    from backup_assets.core.replica import replica_intact, replicate, storage_for

    from .conftest import s3_replication

    endpoint, ca = https_s3
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            replication=s3_replication(moto_s3, bucket, endpoint_url=endpoint, ca_bundle=str(ca)))
    run_backup(catalog, "miyabi", "full", "daily", "2026-11-20")
    backup = LocalRepository(catalog.repository_root).latest("miyabi", "full", "daily")
    replicate(catalog, backup, storage_for(catalog))
    assert replica_intact(catalog, backup, storage_for(catalog)).passed
    shutil.rmtree(catalog.repository_root)
    assert main(["--catalog", catalog.catalog_path, "restore", "--from", "s3", "--source", "miyabi", "--group", "full",
                 "--target-file", str(tmp_path / "from_s3.db"), "--confirm"]) == 0
    wrong, _ = make_ca(tmp_path / "wrongs3", "not the S3 CA")
    bad = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                        replication=s3_replication(moto_s3, bucket, endpoint_url=endpoint, ca_bundle=str(wrong)))
    with pytest.raises(BackupError, match="certificate verify failed"):
        storage_for(bad).head("anything")
