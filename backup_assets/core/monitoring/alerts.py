"""Alerts: Slack, email over SMTP, and a signed JSON webhook, with no storms.

Each alert names source, group, tier, partition, what failed, the error and a link to the run.
One alert per failing asset and cause per window (`alerts.window_minutes`); the memory of what
was sent lives in the Dagster instance's key-value store (its run storage: SQLite or PostgreSQL,
shared by the daemon's sensors and the command line), or, for a command run without a Dagster
instance, in the repository (`.alerts/sent.json`). It holds across sensors and restarts; when it
cannot be written (a full volume, a storage down) the alert is delivered all the same.
Secrets (Slack token, SMTP password, HMAC secret) come from environment variables and never
appear in an alert or an error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import smtplib
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from pathlib import Path

from backup_assets.catalog import Alerts, Catalog, CatalogError
from backup_assets.core import BackupError
from backup_assets.core.artifact import ensure_dir, write_json_atomic
from backup_assets.core.secrets import scrub

SIGNATURE_HEADER = "X-Backup-Assets-Signature"


@dataclass
class Alert:
    what: str  # e.g. "run failed", "check restore_drill failed", "backup is stale"
    error: str
    severity: str = "error"  # or "warning"
    source: str | None = None
    group: str | None = None
    tier: str | None = None
    partition: str | None = None
    asset: str | None = None
    run_url: str | None = None
    cause: str | None = None  # what makes two alerts the same, with the asset

    @property
    def dedupe_key(self) -> str:
        return f"{self.asset or '-'}|{self.partition or '-'}|{self.cause or self.what}"

    def title(self) -> str:
        target = "/".join(x for x in (self.source, self.group, self.tier) if x) or self.asset or "backup_assets"
        part = f" [{self.partition}]" if self.partition else ""
        return f"[{self.severity.upper()}] {target}{part}: {self.what}"

    def text(self) -> str:
        lines = [self.title(), "",
                 f"source: {self.source or '-'}", f"group: {self.group or '-'}", f"tier: {self.tier or '-'}",
                 f"partition: {self.partition or '-'}", f"what failed: {self.what}", f"error: {self.error}"]
        if self.run_url:
            lines.append(f"run: {self.run_url}")
        return "\n".join(lines)


def _secret(env_name: str | None) -> str | None:
    import os

    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if value is None:
        raise CatalogError(f"environment variable {env_name} is not set")
    return value


class FileMemory:
    """What was sent when, in a JSON file (a command run without a Dagster instance)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, sent: dict[str, str]) -> None:
        ensure_dir(self.path.parent)
        write_json_atomic(self.path, sent)


class InstanceMemory:
    """What was sent when, in the Dagster instance's key-value store (its run storage)."""

    KEY = "backup_assets/alerts_sent"

    def __init__(self, instance):
        self.instance = instance

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.instance.run_storage.get_cursor_values({self.KEY}).get(self.KEY) or "{}")
        except Exception:  # a storage that cannot be read: send (a repeat beats silence)
            return {}

    def write(self, sent: dict[str, str]) -> None:
        self.instance.run_storage.set_cursor_values({self.KEY: json.dumps(sent, sort_keys=True)})


class Notifier:
    def __init__(self, cfg: Alerts, memory: "FileMemory | InstanceMemory"):
        self.cfg = cfg
        self.memory = memory

    @classmethod
    def for_catalog(cls, catalog: Catalog, instance=None) -> "Notifier":
        """With a Dagster instance, the alert memory is its key-value store; without, the repository's file."""
        return cls(catalog.alerts, InstanceMemory(instance) if instance is not None
                   else FileMemory(catalog.repository_root / ".alerts" / "sent.json"))

    def using(self, instance) -> "Notifier":
        """The same channels, remembering in this instance's key-value store."""
        return Notifier(self.cfg, InstanceMemory(instance))

    @property
    def channels(self) -> list[str]:
        return [name for name in ("slack", "email", "webhook") if getattr(self.cfg, name) is not None]

    # -- storms ------------------------------------------------------------------------------
    def _sent(self) -> dict[str, str]:
        return self.memory.read()

    def should_send(self, alert: Alert, now: dt.datetime) -> bool:
        last = self._sent().get(alert.dedupe_key)
        if last is None:
            return True
        return now - dt.datetime.fromisoformat(last) >= dt.timedelta(minutes=self.cfg.window_minutes)

    def _remember(self, alert: Alert, now: dt.datetime) -> None:
        sent = self._sent()
        horizon = now - dt.timedelta(days=7)
        sent = {k: v for k, v in sent.items() if dt.datetime.fromisoformat(v) > horizon}
        sent[alert.dedupe_key] = now.isoformat()
        self.memory.write(sent)

    # -- sending -----------------------------------------------------------------------------
    def send(self, alert: Alert, *, now: dt.datetime | None = None) -> list[str]:
        """Deliver to every configured channel; returns the channels reached. Raises if none was."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if not self.should_send(alert, now):
            return []
        secrets = [self._safe_secret(getattr(getattr(self.cfg, c, None), f, None))
                   for c, f in (("slack", "token_env"), ("email", "password_env"), ("webhook", "hmac_secret_env"))]
        alert = Alert(**{**asdict(alert), "error": scrub(alert.error, *secrets)})
        reached, failures = [], []
        for name in self.channels:
            try:
                getattr(self, f"_send_{name}")(alert)
                reached.append(name)
            except Exception as exc:  # one broken channel must not silence the others
                failures.append(f"{name}: {scrub(str(exc), *secrets)}")
        if reached:
            try:  # a full volume must not stop the next alerts: the memory is a courtesy, delivery is the point
                self._remember(alert, now)
            except Exception:  # noqa: BLE001 - whatever the storage raises (OSError, a database error)
                pass
        if failures and not reached:
            raise BackupError("no alert channel reached: " + "; ".join(failures))
        return reached

    def test(self) -> dict[str, str | None]:
        """Send a test alert to each configured channel (no dedupe): channel -> None or its error."""
        alert = Alert(what="test alert", error="sent by `backup-assets alerts test`; nothing is wrong",
                      severity="warning", cause="test")
        secrets = [self._safe_secret(getattr(getattr(self.cfg, c, None), f, None))
                   for c, f in (("slack", "token_env"), ("email", "password_env"), ("webhook", "hmac_secret_env"))]
        out: dict[str, str | None] = {}
        for name in self.channels:
            try:
                getattr(self, f"_send_{name}")(alert)
                out[name] = None
            except Exception as exc:
                out[name] = scrub(str(exc), *secrets)
        return out

    @staticmethod
    def _safe_secret(env_name: str | None) -> str | None:
        try:
            return _secret(env_name)
        except CatalogError:
            return None

    def _send_slack(self, alert: Alert) -> None:
        from slack_sdk import WebClient

        cfg = self.cfg.slack
        kwargs = {"base_url": cfg.base_url} if cfg.base_url else {}
        client = WebClient(token=_secret(cfg.token_env), timeout=10, **kwargs)
        client.chat_postMessage(channel=cfg.channel, text=alert.text(),
                                blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": f"*{alert.title()}*"}},
                                        {"type": "section", "text": {"type": "mrkdwn", "text": "```" + alert.text() + "```"}}])

    def _send_email(self, alert: Alert) -> None:
        cfg = self.cfg.email
        msg = EmailMessage()
        msg["Subject"] = alert.title()
        msg["From"] = cfg.sender
        msg["To"] = ", ".join(cfg.recipients)
        msg.set_content(alert.text())
        with smtplib.SMTP(cfg.host, cfg.port, timeout=15) as smtp:
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context(cafile=cfg.ca_file))
            if cfg.username:
                smtp.login(cfg.username, _secret(cfg.password_env) or "")
            smtp.send_message(msg)

    def _send_webhook(self, alert: Alert) -> None:
        cfg = self.cfg.webhook
        body = json.dumps({"title": alert.title(), **asdict(alert)}, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "backup_assets"}
        secret = _secret(cfg.hmac_secret_env)
        if secret:
            headers[SIGNATURE_HEADER] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                if response.status >= 300:
                    raise BackupError(f"webhook answered HTTP {response.status}")
        except urllib.error.URLError as exc:
            raise BackupError(f"webhook {cfg.url} unreachable: {exc.reason}") from None


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return bool(header) and hmac.compare_digest(header, expected)
