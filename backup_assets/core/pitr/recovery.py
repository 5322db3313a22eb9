"""Point-in-time recovery: restoring a new data directory to a time, a transaction location or the end of the
archive.

The newest base backup that finished before the target (base.py), unpacked into a new, empty data directory
(never the running cluster's), `recovery.signal` and settings that fetch WAL through a prefetching spool and
`wal-fetch`, stop at the target and promote; archiving is off in the copy so it never writes into the source's
archive. The server is started on the given port and what recovery reached is reported from its log."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import subprocess
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.artifact import ensure_dir, open_decompressed, write_json_atomic
from backup_assets.core.crypto import NoIdentity, identities_for_record
from backup_assets.core.engines import tools
from backup_assets.core.pitr.base import base_backups, base_dir, base_end_lsn, chain_of, pick_base


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
    chain: list[str]
    bin_dir: Path
    user: "pwd.struct_passwd | None" = None
    # seconds per phase, in order: choosing the base backup, unpacking, preparing, the server's start, its
    # recovery until promoted (with redo and the promotion from its log)
    timings: dict = None

    def stop(self) -> None:
        subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
                       capture_output=True, env=_server_env(), user=self.user.pw_uid if self.user else None,
                       group=self.user.pw_gid if self.user else None)


RECOVERED = ".recovered_servers.json"


def record_recovered(catalog: Catalog, result: Recovered, source: str) -> None:
    """Remember a server a point-in-time restore left running (`make stop` and `recovered` find it)."""
    path = catalog.repository_root / RECOVERED
    entries = [e for e in recovered_servers(catalog) if e["pgdata"] != str(result.pgdata)]
    entries.append({"source": source, "pgdata": str(result.pgdata), "port": result.port,
                    "pg_ctl": str(result.bin_dir / "pg_ctl"), "user": result.user.pw_name if result.user else None,
                    "target": result.target, "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    write_json_atomic(path, entries)


def recovered_servers(catalog: Catalog) -> list[dict]:
    try:
        data = json.loads((catalog.repository_root / RECOVERED).read_text())
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def stop_recovered(catalog: Catalog) -> list[str]:
    """Stop the servers point-in-time restores left running (those still running); says what it stopped."""
    said, keep = [], []
    for e in recovered_servers(catalog):
        pgdata = Path(e["pgdata"])
        if not (pgdata / "postmaster.pid").exists():
            continue
        user = pwd.getpwnam(e["user"]) if e.get("user") else None
        done = subprocess.run([e["pg_ctl"], "-D", str(pgdata), "-m", "fast", "-w", "stop"], capture_output=True,
                              env=_server_env(), user=user.pw_uid if user else None,
                              group=user.pw_gid if user else None)
        if done.returncode == 0:
            said.append(f"the server recovered into {pgdata} (port {e['port']}) stopped; its data directory is kept")
        else:
            keep.append(e)
            said.append(f"the server recovered into {pgdata} (port {e['port']}) did not stop: "
                        f"{done.stderr.decode(errors='replace').strip()[:200]}")
    write_json_atomic(catalog.repository_root / RECOVERED, keep)
    return said


def _unpack(catalog: Catalog, source: str, meta: dict, dest: Path, *, durable: bool = True) -> None:
    """Unpack a base backup (decrypted, decompressed, its size checked) into `dest`, fsynced unless `durable` is
    false (a scratch copy that is thrown away)."""
    from backup_assets.core.pitr.unpack import unpack_tar

    folder = base_dir(catalog, source)
    identities = identities_for_record(catalog, source, meta, what=meta["artifact"])
    with open_decompressed(folder / meta["artifact"], meta["raw_size_bytes"], identities) as reader:
        unpack_tar(reader, dest, what=meta["artifact"], durable=durable)


def materialize(catalog: Catalog, source: str, chain: list[dict], target_dir: Path, *, say=lambda _m: None) -> None:
    """The data directory of the newest backup of `chain` in `target_dir` (empty): unpacked, and for an
    incremental chain unpacked side by side and combined with pg_combinebackup (hard links where it can)."""
    if len(chain) == 1:
        say(f"unpacking {chain[0]['artifact']} (finished {chain[0]['finished_at']}) into {target_dir}")
        _unpack(catalog, source, chain[0], target_dir)
        return
    src = catalog.sources[source]
    tool, major = tools.find_tool("pg_combinebackup", chain[-1]["server_major"], src.pg_bin_dir)
    parts = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.parts-", dir=target_dir.parent))
    try:
        dirs = []
        for i, meta in enumerate(chain):
            say(f"unpacking {meta['artifact']} ({meta['kind']}, finished {meta['finished_at']})")
            part = parts / f"{i:03d}"
            part.mkdir(mode=0o700)
            _unpack(catalog, source, meta, part, durable=False)  # pg_combinebackup syncs what it makes
            dirs.append(str(part))
        say(f"combining {len(chain)} base backups into {target_dir} (pg_combinebackup)")
        target_dir.rmdir()  # pg_combinebackup creates it
        done = subprocess.run([str(tool), *dirs, "-o", str(target_dir), *(["--link"] if major >= 18 else [])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(target_dir, ignore_errors=True)  # it was new and empty: leave it so
            lines = done.stderr.strip().splitlines() or [str(done.returncode)]
            raise BackupError(f"pg_combinebackup failed: {lines[-1]}")
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        ensure_dir(target_dir)


def _server_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def restore_to_time(catalog: Catalog, source: str, pgdata: str, *, to_time: dt.datetime | None = None,
                    to_lsn: str | None = None, port: int, run_as: str | None = None, say=lambda _m: None,
                    timeout_s: float = 600, local_trust: bool = False) -> Recovered:
    """Build a new data directory from the base backup(s) and the WAL archive, recover it to the target and
    leave it running on `port` (local_trust: the drill's scratch copy lets local socket connections in)."""
    clock = _Clock()
    bases = base_backups(catalog, source)
    base = pick_base(bases, source, to_time, to_lsn=to_lsn, end_lsn=lambda b: base_end_lsn(catalog, source, b))
    chain = chain_of(bases, base)
    clock.mark("choose the base backup")
    target_dir = Path(pgdata).resolve()
    if target_dir.exists() and any(target_dir.iterdir()):
        raise BackupError(f"{target_dir} is not empty: restore into a new data directory; nothing was changed")
    existed = target_dir.exists()
    try:
        return _recover(catalog, source, base, chain, target_dir, to_time=to_time, to_lsn=to_lsn, port=port,
                        run_as=run_as, say=say, timeout_s=timeout_s, local_trust=local_trust, clock=clock)
    except BaseException as exc:
        # what this restore built is of no use: the server (if it started) stopped, the folder emptied
        _discard(target_dir, keep_folder=existed)
        if isinstance(exc, BackupError):  # a missing key stays one (a check says "not checked here")
            kind = NoIdentity if isinstance(exc, NoIdentity) else BackupError
            raise kind(f"{exc}; what the restore built in {target_dir} was removed") from None
        raise


def _discard(target_dir: Path, *, keep_folder: bool) -> None:
    if (target_dir / "postmaster.pid").exists():
        for bin_dir in {p.parent for p, _m in tools.installed_tools("pg_ctl")}:
            owner = target_dir.stat().st_uid
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(target_dir), "-m", "immediate", "-w", "stop"],
                           capture_output=True, env=_server_env(), user=owner if os.geteuid() == 0 else None)
            if not (target_dir / "postmaster.pid").exists():
                break
    if keep_folder:
        for child in list(target_dir.iterdir()) if target_dir.exists() else []:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
    else:
        shutil.rmtree(target_dir, ignore_errors=True)


class _Clock:
    """Seconds per phase, for `restore --timings`."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now


_LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) ")


def _log_phases(text: str) -> dict[str, float]:
    """From the recovered server's log: how long redo ran and how long the promotion after it took."""
    marks = {}
    for line in text.splitlines():
        m = _LOG_STAMP.match(line)
        if not m:
            continue
        for key, needle in (("start", "starting archive recovery"), ("redo", "redo starts at"),
                            ("redo_done", "redo done at"), ("ready", "ready to accept connections")):
            if needle in line and key not in marks:
                marks[key] = dt.datetime.fromisoformat(m.group(1))
    out = {}
    if "redo" in marks and "redo_done" in marks:
        out["redo"] = round((marks["redo_done"] - marks["redo"]).total_seconds(), 3)
    if "redo_done" in marks and "ready" in marks:
        out["promotion"] = round((marks["ready"] - marks["redo_done"]).total_seconds(), 3)
    return out


def _recover(catalog: Catalog, source: str, base: dict, chain: list[dict], target_dir: Path, *,
             to_time, to_lsn, port: int, run_as, say, timeout_s: float, local_trust: bool,
             clock: "_Clock | None" = None) -> Recovered:
    clock = clock or _Clock()
    user = None
    if os.geteuid() == 0:
        if not run_as:
            raise BackupError("PostgreSQL does not run as root: pass --run-as USER (the server's OS user)")
        try:
            user = pwd.getpwnam(run_as)
        except KeyError:
            raise BackupError(f"--run-as {run_as}: no such user") from None
    src = catalog.sources[source]
    bin_dir = tools.find_tool("pg_ctl", base["server_major"], src.pg_bin_dir)[0].parent
    ensure_dir(target_dir)
    target_dir.chmod(0o700)
    materialize(catalog, source, chain, target_dir, say=say)
    clock.mark("unpack")
    target_dir.chmod(0o700)
    spool = target_dir / SPOOL
    spool.mkdir(mode=0o700)
    script = target_dir / RESTORE_SCRIPT
    script.write_text(restore_command_script(catalog, source, spool))
    script.chmod(0o700)
    settings = [f"restore_command = '{script} %f %p'", "archive_mode = off", "recovery_target_timeline = 'latest'",
                "recovery_target_action = 'promote'", f"port = {port}", "listen_addresses = '127.0.0.1'",
                f"unix_socket_directories = '{target_dir}'",
                # a base backup taken from a standby carries its settings: the copy never streams from the primary
                "primary_conninfo = ''", "primary_slot_name = ''"]
    settings += [f"{name} = {int(value)}" for name, value in sorted(base.get("settings", {}).items())]
    if to_time is not None:
        settings.append(f"recovery_target_time = '{to_time.isoformat()}'")
    elif to_lsn is not None:
        settings.append(f"recovery_target_lsn = '{to_lsn}'")
    with open(target_dir / "postgresql.auto.conf", "a") as fh:
        fh.write("\n# backup_assets: point-in-time recovery\n" + "\n".join(settings) + "\n")
    if local_trust:
        hba = target_dir / "pg_hba.conf"
        hba.write_text("local all all trust  # backup_assets drill: the socket is in the 0700 data directory\n"
                       + (hba.read_text() if hba.exists() else ""))
    (target_dir / "recovery.signal").touch()
    # and its standby.signal: the copy recovers from the archive and is promoted, it does not stay a standby
    for name in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        (target_dir / name).unlink(missing_ok=True)
    if user is not None:
        for root, dirs, files in os.walk(target_dir):
            for n in [*dirs, *files]:
                os.lchown(os.path.join(root, n), user.pw_uid, user.pw_gid)
        os.chown(target_dir, user.pw_uid, user.pw_gid)
    log = target_dir / "recovery.log"
    clock.mark("prepare")
    prefetch = _Prefetcher(catalog, source, base, spool, user)
    say(f"starting recovery on port {port} (log: {log})")
    try:
        # -W: pg_ctl returns once the postmaster is forked; the recovery's end is watched in its log at once
        # (pg_ctl's own wait polls ten times a second and then the log is read again)
        started = subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(target_dir), "-l", str(log), "-W", "start"],
                                 env=_server_env(), capture_output=True, text=True,
                                 user=user.pw_uid if user else None, group=user.pw_gid if user else None)
        if started.returncode != 0:
            detail = (log.read_text(errors="replace") if log.exists() else "") or started.stderr or started.stdout
            raise BackupError(f"the recovered server in {target_dir} did not start: {_last_fatal(detail)}")
        clock.mark("start the server")
        text = _wait_recovered(target_dir, log, timeout_s)
        clock.mark("recover until promoted")
    finally:
        prefetch.stop()
        shutil.rmtree(spool, ignore_errors=True)
    reached = "; ".join(line.split("LOG:", 1)[-1].strip() for line in text.splitlines()
                        if "recovery stopping" in line or "last completed transaction" in line) or "end of the archived WAL"
    target = to_time.isoformat() if to_time else (to_lsn or "latest")
    return Recovered(target_dir, port, base["artifact"], target, reached, [b["artifact"] for b in chain], bin_dir, user,
                     timings={**clock.phases, **{f"  of which {k}": v for k, v in _log_phases(text).items()}})


def restore_command_script(catalog: Catalog, source: str, spool: Path) -> str:
    """The recovered server's restore_command (`script %f %p`): a segment the prefetcher decompressed into the
    spool is linked into place, and stays in the spool until recovery has moved past it (PostgreSQL asks for
    the last segment again as recovery ends); anything else (history files, a segment not prefetched or no
    longer spooled) is fetched by wal-fetch. A file the local archive does not hold (the next timeline's history,
    the segment after the last) is answered at once, without starting Python, when there is no replica to look
    in. A link that fails (the prefetcher let the segment go in between) falls through to wal-fetch, never to
    "not in the archive", which would end recovery early."""
    from backup_assets.core.pitr.wal import wal_dir

    q = shlex.quote
    absent = ("" if catalog.replication.replicas() else
              f'if [ ! -f {q(str(wal_dir(catalog, source)))}/"$1.json" ]; then exit 1; fi\n')
    return ("#!/bin/sh\n# backup_assets point-in-time recovery: restore_command %f %p\n"
            f"spool={q(str(spool))}\n"
            'if [ -f "$spool/$1" ] && ln -f "$spool/$1" "$2" 2>/dev/null; then exit 0; fi\n' + absent +
            f"exec {q(sys.executable)} -m backup_assets --catalog {q(str(catalog.catalog_path))} "
            f'wal-fetch --source {q(source)} "$1" "$2"\n')


SPOOL = "backup_assets_wal_spool"


RESTORE_SCRIPT = "backup_assets_restore_command"


class _Prefetcher:
    """Decompresses the archived segments recovery will ask for, in order, a few ahead, into the spool (as the
    server's user), so recovery does not wait on a wal-fetch process per segment. Only the base backup's
    timeline is prefetched; anything else goes through wal-fetch."""

    AHEAD = 8

    def __init__(self, catalog: Catalog, source: str, base: dict, spool: Path, user):
        import threading

        from backup_assets.core.pitr import wal

        self.catalog, self.source, self.spool, self.user = catalog, source, spool, user
        start = base["start_wal"]
        self.names = wal.segment_names(catalog, source, since=start, timeline=start[:8])
        self.served = ""  # the newest segment recovery took from the spool
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wal-prefetch", daemon=True)
        if user is not None:
            os.chown(spool, user.pw_uid, user.pw_gid)
        self.thread.start()

    def _waiting(self) -> int:
        """How many spooled segments recovery has not taken yet. One it took is linked into pg_wal (a second link)
        or is older than one it took; of those only the newest stays in the spool."""
        names = sorted(p.name for p in self.spool.iterdir() if not p.name.startswith("."))
        linked = [n for n in names if (self.spool / n).stat().st_nlink > 1]
        self.served = max([self.served, *linked])
        for name in names:
            if name < self.served:
                (self.spool / name).unlink(missing_ok=True)  # restore_command falls back to wal-fetch for it
        return sum(1 for n in names if n > self.served)

    def _run(self) -> None:
        from backup_assets.core.pitr import wal

        for name in self.names:
            try:
                while not self.done.is_set() and self._waiting() >= self.AHEAD:
                    time.sleep(0.02)
            except OSError:
                return  # recovery fetches the rest itself
            if self.done.is_set():
                return
            hidden = self.spool / f".{name}"
            try:
                wal.fetch(self.catalog, self.source, name, str(hidden), durable=False)
                os.chmod(hidden, 0o600)  # as PostgreSQL's own segments
                if self.user is not None:
                    os.chown(hidden, self.user.pw_uid, self.user.pw_gid)
                os.replace(hidden, self.spool / name)
            except (BackupError, OSError):
                return  # recovery fetches the rest itself (and reports what is wrong)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)


def _wait_recovered(target_dir: Path, log: Path, timeout_s: float, start_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    started_by = time.monotonic() + start_s  # the postmaster writes its pid file as it starts
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if time.monotonic() > started_by and not (target_dir / "postmaster.pid").exists() \
                and "ready to accept connections" not in text:
            raise BackupError(f"the recovered server in {target_dir} did not start: "
                              f"{_last_fatal(text) if text else 'it wrote no log'} (its log: {log})")
        if "database system is ready to accept connections" in text and "archive recovery complete" in text:
            break
        if "FATAL" in text and not (target_dir / "postmaster.pid").exists():
            hint = ("; the archive holds no commit after the target yet (a time is reached at the first later commit):"
                    " restore with --latest, or after the next archived segment (archive_timeout)"
                    if "before configured recovery target" in text else "")
            raise BackupError(f"recovery of {target_dir} failed: {_last_fatal(text)}{hint} (its log: {log}; remove "
                              f"{target_dir} before trying again)")
        if time.monotonic() > deadline:
            raise BackupError(f"recovery of {target_dir} did not finish in {timeout_s:g}s; see {log}")
        time.sleep(0.05)
    return text


def _last_fatal(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL" in line]
    return fatal[-1].split("FATAL:", 1)[-1].strip() if fatal else (lines[-1].strip() if lines else "see the log")


def _scratch(prefix: str, user: "pwd.struct_passwd | None" = None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def recovered_major(recovered: Recovered) -> int:
    return int((recovered.pgdata / "PG_VERSION").read_text().strip())
