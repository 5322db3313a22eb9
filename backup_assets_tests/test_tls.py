"""TLS to PostgreSQL for real: Debian's PostgreSQL 15 with a certificate from a throwaway CA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backup_assets.cli import main
from backup_assets.core.backup import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify import restore_drill
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
    from backup_assets.core.backup import endpoint_for
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
