"""Point-in-time recovery (issue 14, second part): base backups and restoring a new data directory to a time.

Base backup: `pg_basebackup -Ft -D - -X none` streamed through the same compression, encryption, hashing and
atomic write as every artifact, to `<repository>/base/<source>/base-<UTC time>.tar.zst[.age]`, with a JSON
beside it (start WAL file and timeline from the backup_label, start and finish times, sizes, SHA-256). The
WAL it needs comes from the archive (`wal-push`); pg_basebackup waits until the last segment is archived.

Restore to a time: the newest base backup that finished before the target, unpacked into a new, empty data
directory (never the running cluster's), `recovery.signal` and settings that fetch WAL through `wal-fetch`,
stop at the target and promote; archiving is off in the copy so it never writes into the source's archive.
The server is started on the given port and what recovery reached is reported from its log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..catalog import Catalog
from . import BackupError
from .artifact import ArtifactWriter, ensure_dir, open_decompressed, write_json_atomic
from .crypto import identities_for_record
from .backup import endpoint_for
from .engines import postgres

LABEL_WAL = re.compile(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)")
LABEL_TLI = re.compile(r"START TIMELINE: (\d+)")
RECOVERY_LIMITS = ("max_connections", "max_worker_processes", "max_wal_senders", "max_prepared_transactions",
                   "max_locks_per_transaction")


def base_dir(catalog: Catalog, source: str) -> Path:
    src = catalog.sources.get(source)
    if src is None or src.engine != "postgres":
        raise BackupError(f"source {source!r} is not a postgres source in the catalog")
    return catalog.repository_root / "base" / source


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def base_backup(catalog: Catalog, source: str, *, say=lambda _m: None) -> dict:
    src = catalog.sources[source] if source in catalog.sources else None
    folder = ensure_dir(base_dir(catalog, source))
    ep = endpoint_for(catalog, source)
    with postgres.connect(ep, what=f"base backup of {source}: ") as conn:
        major = postgres.server_major(conn)
        version = postgres.server_version(conn)
        archiving = conn.execute("SELECT current_setting('archive_mode')").fetchone()[0]
        # recovery refuses to run with less than the source had (set on its command line, these would not be in
        # the data directory): recorded and written into the recovered copy's settings
        limits = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                   (list(RECOVERY_LIMITS),)).fetchall())
    if archiving == "off":
        raise BackupError(f"{source}: archive_mode is off on {ep.host}:{ep.port}; a base backup restores to a time "
                          "only with the WAL archive (archive_command = 'backup-assets ... wal-push ...')")
    tool, _ = postgres.find_tool("pg_basebackup", major, src.pg_bin_dir)
    encryption = catalog.encryption_for(source)
    started = _now()
    final = folder / f"base-{started.strftime('%Y%m%dT%H%M%S%fZ')}.tar.zst{'.age' if encryption else ''}"
    say(f"{tool} -Ft -D - -X none --checkpoint=fast from {ep.host}:{ep.port}")
    env = ep.child_env()
    with ArtifactWriter(final, recipients=encryption.recipients if encryption else None) as writer:
        proc = subprocess.Popen([str(tool), "-Ft", "-D", "-", "-X", "none", "--checkpoint=fast", "--no-password"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        writer.copy_from(proc.stdout)
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise BackupError(f"pg_basebackup of {source} failed: {ep.scrub(err.strip().splitlines()[-1] if err.strip() else str(proc.returncode))}")
        written = writer.commit()
    finished = _now()
    label = _backup_label(final, encryption, catalog)
    meta = {
        "source": source, "artifact": final.name, "sha256": written.sha256, "size_bytes": written.size_bytes,
        "raw_size_bytes": written.raw_size_bytes, "started_at": started.isoformat(), "finished_at": finished.isoformat(),
        "start_wal": LABEL_WAL.search(label).group(1), "timeline": int(LABEL_TLI.search(label).group(1)),
        "server_version": version, "server_major": major, "settings": limits, "encrypted": encryption is not None,
        "identity_file_env": encryption.identity_file_env if encryption else None,
    }
    write_json_atomic(final.with_name(final.name + ".json"), meta)
    return meta


def _backup_label(path: Path, encryption, catalog: Catalog) -> str:
    ids = None
    if encryption is not None:
        from .crypto import Identities

        if not encryption.identity_file_env or not os.environ.get(encryption.identity_file_env):
            raise BackupError(f"{path.name}: the backup_label is read back to record the start WAL: set "
                              f"{encryption.identity_file_env or 'encryption.identity_file_env'}")
        ids = Identities.load(encryption.identity_file_env)
    with open_decompressed(path, None, ids) as reader, tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            if member.name in ("backup_label", "./backup_label"):
                return tar.extractfile(member).read().decode()
    raise BackupError(f"{path.name} holds no backup_label: not a base backup")


def base_backups(catalog: Catalog, source: str) -> list[dict]:
    folder = base_dir(catalog, source)
    found = []
    for path in sorted(folder.glob("base-*.json")) if folder.is_dir() else []:
        meta = json.loads(path.read_text())
        artifact = folder / meta["artifact"]
        if artifact.is_file() and artifact.stat().st_size == meta["size_bytes"]:
            found.append(meta)
    return sorted(found, key=lambda m: m["finished_at"])


def parse_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.strip().replace(" ", "T", 1) if "T" not in text else text.strip())
    except ValueError:
        raise BackupError(f"--to-time {text!r}: not a time (e.g. '2026-11-22 10:41:07+00')") from None
    if value.tzinfo is None:
        raise BackupError(f"--to-time {text!r}: give the time zone (e.g. +00), so the target is not ambiguous")
    return value


@dataclass
class Recovered:
    pgdata: Path
    port: int
    base: str
    target: str
    reached: str


def restore_to_time(catalog: Catalog, source: str, pgdata: str, *, to_time: dt.datetime | None = None,
                    to_lsn: str | None = None, port: int, run_as: str | None = None, say=lambda _m: None,
                    timeout_s: float = 600) -> Recovered:
    bases = base_backups(catalog, source)
    if not bases:
        raise BackupError(f"no base backup of {source} (backup-assets basebackup --source {source})")
    if to_time is not None:
        usable = [b for b in bases if dt.datetime.fromisoformat(b["finished_at"]) <= to_time]
        if not usable:
            raise BackupError(f"{to_time.isoformat()} is before the oldest base backup of {source} ended "
                              f"({bases[0]['finished_at']}): no restore to that time is possible; nothing was changed")
        base = usable[-1]
    else:
        base = bases[-1]
    target_dir = Path(pgdata).resolve()
    if target_dir.exists() and any(target_dir.iterdir()):
        raise BackupError(f"{target_dir} is not empty: restore into a new data directory; nothing was changed")
    user = None
    if os.geteuid() == 0:
        if not run_as:
            raise BackupError("PostgreSQL does not run as root: pass --run-as USER (the server's OS user)")
        try:
            user = pwd.getpwnam(run_as)
        except KeyError:
            raise BackupError(f"--run-as {run_as}: no such user") from None
    src = catalog.sources[source]
    bin_dir = postgres.find_tool("pg_ctl", base["server_major"], src.pg_bin_dir)[0].parent
    ensure_dir(target_dir)
    target_dir.chmod(0o700)
    folder = base_dir(catalog, source)
    say(f"unpacking {base['artifact']} (finished {base['finished_at']}) into {target_dir}")
    identities = identities_for_record(catalog, source, base, what=base["artifact"])
    with open_decompressed(folder / base["artifact"], base["raw_size_bytes"], identities) as reader, \
            tarfile.open(fileobj=reader, mode="r|") as tar:
        tar.extractall(target_dir, filter="tar")
    fetch = (f"{sys.executable} -m backup_assets.cli --catalog {catalog.catalog_path} wal-fetch --source {source} "
             "%f %p")
    settings = [f"restore_command = '{fetch}'", "archive_mode = off", "recovery_target_timeline = 'latest'",
                "recovery_target_action = 'promote'", f"port = {port}", "listen_addresses = '127.0.0.1'",
                f"unix_socket_directories = '{target_dir}'"]
    settings += [f"{name} = {int(value)}" for name, value in sorted(base.get("settings", {}).items())]
    if to_time is not None:
        settings.append(f"recovery_target_time = '{to_time.isoformat()}'")
    elif to_lsn is not None:
        settings.append(f"recovery_target_lsn = '{to_lsn}'")
    with open(target_dir / "postgresql.auto.conf", "a") as fh:
        fh.write("\n# backup_assets: point-in-time recovery\n" + "\n".join(settings) + "\n")
    (target_dir / "recovery.signal").touch()
    for name in ("postmaster.pid", "postmaster.opts"):
        (target_dir / name).unlink(missing_ok=True)
    if user is not None:
        for root, dirs, files in os.walk(target_dir):
            for n in [*dirs, *files]:
                os.lchown(os.path.join(root, n), user.pw_uid, user.pw_gid)
        os.chown(target_dir, user.pw_uid, user.pw_gid)
    log = target_dir / "recovery.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    say(f"starting recovery on port {port} (log: {log})")
    started = subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(target_dir), "-l", str(log), "start"], env=env,
                             capture_output=True, text=True, user=user.pw_uid if user else None,
                             group=user.pw_gid if user else None)
    if started.returncode != 0:
        detail = (log.read_text(errors="replace") if log.exists() else "") or started.stderr or started.stdout
        raise BackupError(f"the recovered server in {target_dir} did not start: {_last_fatal(detail)}")
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "database system is ready to accept connections" in text and "archive recovery complete" in text:
            break
        if "FATAL" in text and not (target_dir / "postmaster.pid").exists():
            hint = ("; the archive holds no commit after the target yet (a time is reached at the first later commit):"
                    " restore with --latest, or after the next archived segment (archive_timeout)"
                    if "before configured recovery target" in text else "")
            raise BackupError(f"recovery of {target_dir} failed: {_last_fatal(text)}{hint}")
        if time.monotonic() > deadline:
            raise BackupError(f"recovery of {target_dir} did not finish in {timeout_s:g}s; see {log}")
        time.sleep(0.3)
    reached = "; ".join(line.split("LOG:", 1)[-1].strip() for line in text.splitlines()
                        if "recovery stopping" in line or "last completed transaction" in line) or "end of the archived WAL"
    target = to_time.isoformat() if to_time else (to_lsn or "latest")
    return Recovered(target_dir, port, base["artifact"], target, reached)


def _last_fatal(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL" in line]
    return fatal[-1].split("FATAL:", 1)[-1].strip() if fatal else (lines[-1].strip() if lines else "see the log")
