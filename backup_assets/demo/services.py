"""The demo's stand-ins for what production has elsewhere, run as background processes of `make run`:

- an S3-compatible endpoint: moto's server on 127.0.0.1, in memory (a stand-in for a real bucket: its
  objects are gone when it stops; the next backups replicate again);
- an alert receiver: a local HTTP server that takes the catalog's signed webhook, checks the signature
  and appends one line per alert to <demo home>/alerts.log.

`python -m backup_assets.demo.services webhook --port N --log FILE` runs the receiver itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

S3_BUCKET = "backup-assets-demo"
S3_KEY_ENV, S3_SECRET_ENV = "DEMO_S3_ACCESS_KEY_ID", "DEMO_S3_SECRET_ACCESS_KEY"
WEBHOOK_SECRET_ENV = "DEMO_WEBHOOK_SECRET"
DEFAULT_S3_PORT, DEFAULT_WEBHOOK_PORT = 54330, 54331


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def _spawn(name: str, argv: list[str], port: int, home: Path, timeout_s: float = 30) -> None:
    pid_file = home / f"{name}.pid"
    if _alive(pid_file) and _answers(port):
        return
    if _answers(port):
        raise SystemExit(f"port {port} for the demo's {name} is taken by another program: set "
                         f"BACKUP_ASSETS_DEMO_{name.upper()}_PORT to a free port")
    log = open(home / f"{name}.out", "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the demo's {name} did not start; see {home / f'{name}.out'}")
        time.sleep(0.2)


def start_s3(home: Path, port: int, env: dict[str, str]) -> None:
    _spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, home)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id=env[S3_KEY_ENV], aws_secret_access_key=env[S3_SECRET_ENV])
    if S3_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        # with Object Lock, as the catalog's replica asks (it can only be enabled when a bucket is created)
        client.create_bucket(Bucket=S3_BUCKET, ObjectLockEnabledForBucket=True)


def start_webhook(home: Path, port: int) -> Path:
    log = home / "alerts.log"
    log.touch()
    _spawn("webhook", [sys.executable, "-m", "backup_assets.demo.services", "webhook", "--port", str(port),
                       "--log", str(log)], port, home)
    return log


def stop_services(home: Path, names: tuple[str, ...] = ("s3", "webhook")) -> list[str]:
    """Stop the named services of the demo in `home` (all by default); the ones that were running."""
    stopped = []
    for name in names:
        pid_file = home / f"{name}.pid"
        if _alive(pid_file):
            pid = int(pid_file.read_text().strip())
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(50):
                if not _alive(pid_file):
                    break
                time.sleep(0.1)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return stopped


# -- the alert receiver -------------------------------------------------------------------------------

def serve_webhook(port: int, log: Path) -> None:
    from backup_assets.core.monitoring.alerts import SIGNATURE_HEADER, verify_signature

    secret = os.environ.get(WEBHOOK_SECRET_ENV, "")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            signed = verify_signature(body, self.headers.get(SIGNATURE_HEADER), secret) if secret else None
            try:
                alert = json.loads(body)
                text = f"{alert.get('title', '?')}: {alert.get('error') or ''}".strip()
                if alert.get("run_url"):
                    text += f" ({alert['run_url']})"
            except ValueError:
                text = f"(not JSON) {body[:200]!r}"
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            mark = {True: "signed", False: "BAD SIGNATURE", None: "unsigned"}[signed]
            with open(log, "a") as fh:
                fh.write(f"{stamp} [{mark}] {text}\n")
            self.send_response(204 if signed is not False else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m backup_assets.demo.services")
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("webhook")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    serve_webhook(args.port, args.log)
