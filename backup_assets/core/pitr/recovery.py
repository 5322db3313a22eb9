"""Point-in-time recovery: base backups and restoring a new data directory to a time.

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
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backup_assets.catalog import Catalog, Pitr
from backup_assets.core import BackupError
from backup_assets.core.artifact import ArtifactWriter, decompress_to, ensure_dir, open_decompressed, write_json_atomic
from backup_assets.core.crypto import identities_for_record
from backup_assets.core.engines import tools
from backup_assets.core.outcome import Outcome

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


def _server_facts(ep, what: str) -> dict:
    from backup_assets.core.engines import postgres  # the driver only where a server is asked: a restore starts without it

    with postgres.connect(ep, what=what) as conn:
        major = postgres.server_major(conn)
        facts = {
            "major": major, "version": postgres.server_version(conn),
            "archive_mode": conn.execute("SELECT current_setting('archive_mode')").fetchone()[0],
            "summarize_wal": conn.execute("SELECT current_setting('summarize_wal')").fetchone()[0]
            if major >= 17 else "off",
            "system_identifier": str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]),
            # recovery refuses to run with less than the source had (set on its command line, these would not be
            # in the data directory): recorded and written into the recovered copy's settings
            "limits": dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                        (list(RECOVERY_LIMITS),)).fetchall()),
        }
    return facts


def _incremental_parent(catalog: Catalog, source: str, facts: dict, bases: list[dict], kind: str,
                        now: dt.datetime) -> tuple[dict | None, str]:
    """The base backup an incremental one would build on, or (None, why a full one is taken)."""
    configured = catalog.sources[source].pitr
    cfg = configured or Pitr()
    if kind == "full":
        return None, "a full base backup was asked for"
    if kind == "auto" and (configured is None or not cfg.incremental):
        return None, "incremental base backups are off for this source"
    if facts["major"] < 17:
        return None, f"PostgreSQL {facts['major']} takes no incremental base backups (17 and newer do)"
    if facts["summarize_wal"] != "on":
        return None, "summarize_wal is off on the server (incremental base backups need it)"
    same = [b for b in bases if b.get("system_identifier") == facts["system_identifier"] and b.get("manifest")]
    if not same:
        return None, "no earlier base backup of this server to build on"
    parent = same[-1]
    root = next((b for b in bases if b["artifact"] == parent.get("full", parent["artifact"])), None)
    if root is None:
        return None, f"the full base backup under {parent['artifact']} is gone"
    every = cfg.full_every_days
    # an hour's slack: a daily schedule's run a few minutes earlier than a week ago still counts a week
    if kind == "auto" and dt.datetime.fromisoformat(root["started_at"]) <= now - dt.timedelta(days=every) + \
            dt.timedelta(hours=1):
        return None, f"the newest full base backup ({root['artifact']}) is {every} or more days old"
    return parent, f"incremental on {parent['artifact']}"


def base_backup(catalog: Catalog, source: str, *, kind: str = "auto", partition: str | None = None,
                say=lambda _m: None) -> dict:
    """A base backup of the source's server: full, or incremental on the newest one (kind 'auto' decides
    from the catalog's pitr settings and what the server can do; 'incremental' fails when it cannot)."""
    if kind not in ("auto", "full", "incremental"):
        raise BackupError(f"base backup kind {kind!r}: expected auto, full or incremental")
    from backup_assets.core.backup.take import endpoint_for

    folder = ensure_dir(base_dir(catalog, source))
    ep = endpoint_for(catalog, source)
    facts = _server_facts(ep, f"base backup of {source}: ")
    if facts["archive_mode"] == "off":
        raise BackupError(f"{source}: archive_mode is off on {ep.host}:{ep.port}; a base backup restores to a time "
                          "only with the WAL archive (archive_command = 'backup-assets ... wal-push ...')")
    started = _now()
    parent, why = _incremental_parent(catalog, source, facts, base_backups(catalog, source), kind, started)
    if parent is None and kind == "incremental":
        raise BackupError(f"{source}: no incremental base backup possible: {why}")
    say(f"{'incremental' if parent else 'full'} base backup of {source} ({why})")
    try:
        return _take(catalog, source, ep, facts, folder, parent, partition, say)
    except BackupError as exc:
        if parent is None or kind == "incremental":
            raise
        say(f"the incremental base backup failed ({exc}); taking a full one")
        return _take(catalog, source, ep, facts, folder, None, partition, say)


def _take(catalog: Catalog, source: str, ep, facts: dict, folder: Path, parent: dict | None,
          partition: str | None, say) -> dict:
    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_basebackup", facts["major"], src.pg_bin_dir)
    encryption = catalog.encryption_for(source)
    recipients = encryption.recipients if encryption else None
    started = _now()
    stamp = started.strftime('%Y%m%dT%H%M%S%fZ')
    suffix = ".age" if encryption else ""
    final = folder / f"base-{stamp}.tar.zst{suffix}"
    args = [str(tool), "-Ft", "-D", "-", "-X", "none", "--checkpoint=fast", "--no-password"]
    with tempfile.TemporaryDirectory(prefix="backup-assets-base-") as tmp:
        if parent is not None:
            # the reference backup's manifest, as the server checks the new backup against it
            reference = Path(tmp) / "backup_manifest"
            decompress_to(folder / parent["manifest"]["artifact"], reference,
                          expected_size=parent["manifest"]["raw_size_bytes"],
                          identities=identities_for_record(catalog, source, parent, what=parent["manifest"]["artifact"]))
            args.append(f"--incremental={reference}")
        say(f"{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(args))} from {ep.host}:{ep.port}")
        with ArtifactWriter(final, recipients=recipients) as writer:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ep.child_env())
            writer.copy_from(proc.stdout)
            err = proc.stderr.read().decode(errors="replace")
            if proc.wait() != 0:
                lines = [line for line in err.strip().splitlines() if "skipping special file" not in line]
                raise BackupError(f"pg_basebackup of {source} failed: "
                                  f"{ep.scrub(lines[-1] if lines else str(proc.returncode))}")
            written = writer.commit()
    finished = _now()
    try:
        label, manifest = _read_back(final, catalog, source, encryption)
        with ArtifactWriter(final.with_name(f"base-{stamp}.manifest.zst{suffix}"), recipients=recipients) as mw:
            mw.write(manifest)
            man = mw.commit()
    except BaseException:
        final.unlink(missing_ok=True)  # never left as a base backup without its description
        raise
    meta = {
        "source": source, "artifact": final.name, "sha256": written.sha256, "size_bytes": written.size_bytes,
        "raw_size_bytes": written.raw_size_bytes, "started_at": started.isoformat(), "finished_at": finished.isoformat(),
        "kind": "incremental" if parent else "full", "parent": parent["artifact"] if parent else None,
        "full": parent.get("full", parent["artifact"]) if parent else final.name, "partition": partition,
        "start_wal": LABEL_WAL.search(label).group(1), "timeline": int(LABEL_TLI.search(label).group(1)),
        "end_lsn": _manifest_end_lsn(manifest),
        "manifest": {"artifact": man.path.name, "sha256": man.sha256, "size_bytes": man.size_bytes,
                     "raw_size_bytes": man.raw_size_bytes},
        "server_version": facts["version"], "server_major": facts["major"],
        "system_identifier": facts["system_identifier"], "settings": facts["limits"],
        "encrypted": encryption is not None, "identity_file_env": encryption.identity_file_env if encryption else None,
    }
    write_json_atomic(final.with_name(final.name + ".json"), meta)
    return meta


def _read_back(path: Path, catalog: Catalog, source: str, encryption) -> tuple[str, bytes]:
    """The backup_label and backup_manifest of a written base backup, in one pass that also proves the
    artifact decodes to its end."""
    ids = None
    if encryption is not None:
        from backup_assets.core.crypto import Identities

        if not encryption.identity_file_env or not os.environ.get(encryption.identity_file_env):
            raise BackupError(f"{path.name}: the backup_label and manifest are read back to record the start WAL: "
                              f"set {encryption.identity_file_env or 'encryption.identity_file_env'}")
        ids = Identities.load(encryption.identity_file_env)
    label = manifest = None
    with open_decompressed(path, None, ids) as reader, tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name == "backup_label":
                label = tar.extractfile(member).read().decode()
            elif name == "backup_manifest":
                manifest = tar.extractfile(member).read()
        while reader.read(1 << 20):  # to the end of the stream (tar padding), so every byte is proven
            pass
    if label is None or manifest is None:
        raise BackupError(f"{path.name} holds no {'backup_label' if label is None else 'backup_manifest'}: "
                          "not a base backup")
    return label, manifest


def base_backups(catalog: Catalog, source: str, storage=None) -> list[dict]:
    """The complete base backups of a source (a JSON whose artifact and manifest are there with their sizes),
    oldest first: in the local repository, or in `storage` (the S3 replica)."""
    from backup_assets.core.pitr.locations import base_prefix, local_storage

    base_dir(catalog, source)  # a postgres source of the catalog
    storage = storage or local_storage(catalog)
    return _complete_bases(storage, base_prefix(source), dict(storage.list(base_prefix(source))))


def _complete_bases(storage, prefix: str, listed: dict[str, int]) -> list[dict]:
    found = []
    for key in sorted(k for k in listed if k.endswith(".json")):
        try:
            meta = json.loads(storage.get_bytes(key))
        except ValueError:
            continue  # a damaged description: not a usable base backup (wal-verify and the checks say so)
        manifest = meta.get("manifest")
        if key == f"{prefix}{meta.get('artifact')}.json" and listed.get(prefix + meta["artifact"]) == meta["size_bytes"] and \
                (not manifest or listed.get(prefix + manifest["artifact"]) == manifest["size_bytes"]):
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


def chain_of(bases: list[dict], base: dict) -> list[dict]:
    """The full base backup and the incremental ones up to `base`, oldest first."""
    by_name = {b["artifact"]: b for b in bases}
    chain = [base]
    while chain[0].get("parent"):
        parent = by_name.get(chain[0]["parent"])
        if parent is None:
            raise BackupError(f"{base['artifact']} is incremental on {chain[0]['parent']}, which is gone or damaged: "
                              "it cannot be restored; nothing was changed")
        chain.insert(0, parent)
    return chain


def lsn_value(text: str) -> int:
    """A WAL location ('16/B374D848') as a number; BackupError naming it when it is not one."""
    match = re.fullmatch(r"\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*", text or "")
    if not match:
        raise BackupError(f"{text!r} is not a WAL location (like 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def _manifest_end_lsn(manifest: bytes) -> str | None:
    """Where a base backup is consistent: the end of its WAL range in pg_basebackup's backup_manifest."""
    try:
        ranges = json.loads(manifest).get("WAL-Ranges") or []
        return ranges[-1]["End-LSN"] if ranges else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def base_end_lsn(catalog: Catalog, source: str, base: dict) -> int | None:
    """The base backup's end LSN: from its description, or (described before it was kept there) from its
    stored backup_manifest."""
    if base.get("end_lsn"):
        return lsn_value(base["end_lsn"])
    try:
        with tempfile.TemporaryDirectory(prefix="backup-assets-lsn-") as tmp:
            path = Path(tmp) / "backup_manifest"
            decompress_to(base_dir(catalog, source) / base["manifest"]["artifact"], path,
                          expected_size=base["manifest"]["raw_size_bytes"],
                          identities=identities_for_record(catalog, source, base, what=base["manifest"]["artifact"]))
            end = _manifest_end_lsn(path.read_bytes())
    except (BackupError, OSError, KeyError):
        return None
    return lsn_value(end) if end else None


def pick_base(bases: list[dict], source: str, to_time: dt.datetime | None, *, to_lsn: str | None = None,
              end_lsn=None) -> dict:
    """The base backup a restore starts from: the newest that is consistent before the target (ended before
    the time; its end LSN at or before the LSN; `end_lsn(base)` tells it), the newest for the latest."""
    if not bases:
        raise BackupError(f"no base backup of {source} (backup-assets basebackup --source {source})")
    if to_lsn is not None:
        target = lsn_value(to_lsn)
        ends = [(b, end_lsn(b)) for b in bases]
        usable = [b for b, end in ends if end is not None and end <= target]
        if not usable:
            known = [(b, e) for b, e in ends if e is not None]
            oldest = f" (the oldest, {known[0][0]['artifact']}, is consistent from {_lsn_text(known[0][1])})" if known else ""
            raise BackupError(f"WAL location {to_lsn} is before every base backup of {source} is consistent{oldest}: "
                              "no restore to it is possible; nothing was changed")
        return usable[-1]
    if to_time is None:
        return bases[-1]
    usable = [b for b in bases if dt.datetime.fromisoformat(b["finished_at"]) <= to_time]
    if not usable:
        raise BackupError(f"{to_time.isoformat()} is before the oldest base backup of {source} ended "
                          f"({bases[0]['finished_at']}): no restore to that time is possible; nothing was changed")
    return usable[-1]


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


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
        if isinstance(exc, BackupError):
            raise BackupError(f"{exc}; what the restore built in {target_dir} was removed") from None
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
                f"unix_socket_directories = '{target_dir}'"]
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
    for name in ("postmaster.pid", "postmaster.opts"):
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
    absent = ("" if catalog.replication.s3 is not None else
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


# -- checks ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scratch(prefix: str, user: "pwd.struct_passwd | None" = None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def verify_base(catalog: Catalog, source: str, meta: dict) -> Outcome:
    """pg_verifybackup of one base backup (unpacked into a scratch directory): every file in the manifest is
    there with its size and checksum, nothing extra. Its WAL is the continuity check's business."""
    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_verifybackup", meta["server_major"], src.pg_bin_dir)
    scratch = _scratch("backup-assets-verify-")
    started = time.monotonic()
    try:
        _unpack(catalog, source, meta, scratch, durable=False)
        done = subprocess.run([str(tool), "--no-parse-wal", "--quiet", str(scratch)], capture_output=True, text=True)
    except BackupError as exc:
        return Outcome(False, f"{meta['artifact']}: {exc}", {"artifact": meta["artifact"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    md = {"artifact": meta["artifact"], "kind": meta.get("kind", "full"), "raw_size_bytes": meta["raw_size_bytes"],
          "duration_s": round(time.monotonic() - started, 3)}
    if done.returncode != 0:
        problems = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        md["problems"] = problems[:20]
        return Outcome(False, f"pg_verifybackup found {len(problems)} problem(s) in {meta['artifact']}: "
                            f"{problems[0] if problems else done.returncode}", md)
    return Outcome(True, f"pg_verifybackup: {meta['artifact']} matches its manifest", md)


def archive_state(catalog: Catalog, source: str):
    """The WAL archive from the oldest kept base backup's start on (one read of its descriptions), with that
    base backup list: what wal_continuity and recovery_point look at."""
    from backup_assets.core.pitr import wal

    bases = base_backups(catalog, source)
    return bases, wal.verify(catalog, source, since=bases[0]["start_wal"] if bases else None)


def wal_continuity(catalog: Catalog, source: str, state=None) -> Outcome:
    bases, result = state or archive_state(catalog, source)
    since = bases[0]["start_wal"] if bases else None
    md = {"segments": result.segments, "first": result.first, "last": result.last, "gaps": len(result.gaps),
          "oldest_base_backup": bases[0]["artifact"] if bases else None}
    if not bases:
        return Outcome(False, f"no base backup of {source}: the WAL archive restores nothing on its own", md)
    if result.segments == 0:
        return Outcome(False, f"no WAL archived since {since} (is archive_command = wal-push set?)", md)
    if since is not None and result.first != since:
        return Outcome(False, f"the WAL archive starts at {result.first}, after the oldest base backup's start "
                            f"{since}: that base backup cannot be recovered", md)
    if result.gaps:
        md["gap_list"] = [f"{a} .. {b}" for a, b in result.gaps[:20]]
        return Outcome(False, f"{len(result.gaps)} gap(s) in the WAL archive, first after {result.gaps[0][0]} "
                            f"(next archived: {result.gaps[0][1]})", md)
    return Outcome(True, f"{result.segments} segments from {result.first} to {result.last}, no gaps", md)


def recovery_point(catalog: Catalog, source: str, now: dt.datetime | None = None, state=None) -> Outcome:
    """The age of the newest archived WAL: what a restore to --latest would lose at most now."""
    now = now or _now()
    rpo = catalog.sources[source].wal_rpo_seconds
    newest = (state or archive_state(catalog, source))[1].newest_pushed_at
    if newest is None:
        return Outcome(False, f"nothing archived for {source} yet", {"rpo_seconds": rpo}, warn=True)
    age = (now - dt.datetime.fromisoformat(newest)).total_seconds()
    md = {"newest_wal_at": newest, "recovery_point_age_s": round(age, 1), "rpo_seconds": rpo}
    if rpo is not None and age > rpo:
        return Outcome(False, f"the newest archived WAL is {age:.0f}s old, over the RPO of {rpo}s", md, warn=True)
    return Outcome(True, f"the newest archived WAL is {age:.0f}s old" + (f" (RPO {rpo}s)" if rpo else ""), md)


COMMIT = re.compile(r"tx:\s+(\d+),.*desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def _commits(catalog: Catalog, source: str, major: int, segment: str, scratch: Path) -> list[tuple[int, dt.datetime]]:
    """(xid, commit time) of the commits recorded in one archived segment (pg_waldump)."""
    from backup_assets.core.pitr import wal

    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_waldump", major, src.pg_bin_dir)
    wal.fetch(catalog, source, segment, str(scratch / segment))
    try:
        done = subprocess.run([str(tool), "--rmgr=Transaction", "--path", str(scratch), segment, segment],
                              capture_output=True, text=True, env={**_server_env(), "TZ": "UTC"})
    finally:
        (scratch / segment).unlink(missing_ok=True)
    found = []
    for xid, stamp in COMMIT.findall(done.stdout):
        found.append((int(xid), dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc)))
    return found


def drill_target(catalog: Catalog, source: str, rng) -> tuple[dt.datetime, tuple, tuple] | None:
    """A random time between two commits in the archive, after the oldest base backup ended: (target, the
    commit before it, the commit after it). None when the window holds no two commits."""
    from backup_assets.core.pitr import wal

    bases = base_backups(catalog, source)
    if not bases:
        raise BackupError(f"no base backup of {source}")
    oldest_end = dt.datetime.fromisoformat(bases[0]["finished_at"])
    names = wal.segment_names(catalog, source, since=bases[0]["start_wal"])
    if not names:
        return None
    newest_tli = max(n[:8] for n in names)
    names = [n for n in names if n[:8] == newest_tli]
    start = rng.randrange(len(names))
    scratch = _scratch("backup-assets-waldump-")
    try:
        for name in names[start:] + names[:start]:  # from a random segment on, until one has two commits to split
            commits = [c for c in _commits(catalog, source, bases[-1]["server_major"], name, scratch)
                       if c[1] > oldest_end]
            pairs = [(a, b) for a, b in zip(commits, commits[1:]) if b[1] - a[1] > dt.timedelta(microseconds=2)]
            if pairs:
                before, after = rng.choice(pairs)
                return before[1] + (after[1] - before[1]) * rng.uniform(0.1, 0.9), before, after
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def pitr_drill(catalog: Catalog, source: str, *, rng=None, say=lambda _m: None) -> Outcome:
    """Restore to a random committed time in the window into a scratch cluster and prove it: recovery stopped
    exactly between the commits around the target, the server starts and promotes, pg_amcheck is clean and
    every table of every database can be read."""
    import random

    rng = rng or random.Random()
    cfg = catalog.sources[source].pitr
    picked = drill_target(catalog, source, rng)
    if picked is None:
        return Outcome(False, "no two commits after the oldest base backup in the archive: nothing to restore to "
                            "(is anything written to the server, is archive_timeout set?)", {}, warn=True)
    target, before, after = picked
    if os.geteuid() == 0 and not (cfg and cfg.run_as):
        return Outcome(False, f"the drill's scratch cluster cannot run as root: set sources.{source}.pitr.run_as to the "
                            "server's OS user (e.g. postgres)", _md_target(target, before, after))
    user = pwd.getpwnam(cfg.run_as) if os.geteuid() == 0 else None
    scratch = _scratch("backup-assets-pitr-drill-", user)
    pgdata = scratch / "pgdata"
    started = time.monotonic()
    recovered = None
    md = _md_target(target, before, after)
    try:
        recovered = restore_to_time(catalog, source, str(pgdata), to_time=target, port=_free_port(),
                                    run_as=cfg.run_as if cfg else None, say=say, local_trust=True)
        md["rto_s"] = round(time.monotonic() - started, 3)
        md["base_backups"] = recovered.chain
        md["reached"] = recovered.reached
        stop = re.search(r"recovery stopping before commit of transaction (\d+)", recovered.reached)
        if stop is None or int(stop.group(1)) != after[0]:
            return Outcome(False, f"recovery to {target.isoformat()} did not stop before transaction {after[0]} "
                                f"(the first commit after the target): {recovered.reached}", md)
        tables, rows, problems = _prove(catalog, source, recovered)
        md.update({"tables_read": tables, "rows_read": rows, "amcheck": "clean" if not problems else problems[:10]})
        if problems:
            return Outcome(False, f"pg_amcheck found problems after recovery to {target.isoformat()}: {problems[0]}", md)
        return Outcome(True, f"recovered to {target.isoformat()} (between transactions {before[0]} and {after[0]}) "
                           f"from {len(recovered.chain)} base backup(s) in {md['rto_s']:.1f}s; pg_amcheck clean; "
                           f"{tables} tables ({rows} rows) read", md)
    except BackupError as exc:
        return Outcome(False, f"restore to {target.isoformat()} failed: {exc}", md)
    finally:
        if recovered is not None:
            recovered.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _md_target(target: dt.datetime, before: tuple, after: tuple) -> dict:
    return {"target": target.isoformat(), "commit_before": f"{before[0]} at {before[1].isoformat()}",
            "commit_after": f"{after[0]} at {after[1].isoformat()}"}


def _prove(catalog: Catalog, source: str, recovered: Recovered) -> tuple[int, int, list[str]]:
    import psycopg
    from psycopg import sql

    from backup_assets.core.backup.take import endpoint_for

    ep = endpoint_for(catalog, source)
    host = str(recovered.pgdata)

    def connect(dbname: str, user: str):
        return psycopg.connect(host=host, port=recovered.port, user=user, dbname=dbname, autocommit=True,
                               client_encoding="UTF8", application_name="backup_assets_drill")

    with connect(ep.dbname, ep.user) as conn:
        superuser = conn.execute("SELECT rolname FROM pg_roles WHERE oid = 10").fetchone()[0]
        databases = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
    tables = rows = 0
    for dbname in databases:
        with connect(dbname, superuser) as conn:
            for schema, name in conn.execute(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "AND n.nspname NOT LIKE 'pg_toast%' AND NOT c.relispartition ORDER BY 1, 2").fetchall():
                rows += conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(name))).fetchone()[0]
                tables += 1
    src = catalog.sources[source]
    tool, _ = tools.find_tool("pg_amcheck", recovered_major(recovered), src.pg_bin_dir)
    done = subprocess.run([str(tool), "--all", "--install-missing", "--heapallindexed", "-h", host,
                           "-p", str(recovered.port), "-U", superuser], capture_output=True, text=True,
                          env=_server_env())
    problems = [] if done.returncode == 0 else \
        [line for line in (done.stdout + done.stderr).splitlines() if line.strip()] or [f"exit {done.returncode}"]
    return tables, rows, problems


def recovered_major(recovered: Recovered) -> int:
    return int((recovered.pgdata / "PG_VERSION").read_text().strip())


# -- retention ---------------------------------------------------------------------------------------------

def prune_base(catalog: Catalog, source: str, *, dry_run: bool, now: dt.datetime | None = None,
               storage=None) -> dict:
    """Keep what restores to any time in the last `pitr.retention_days`: the newest base backup that ended
    before that window and everything after it, the full and incremental backups those build on, and the WAL
    from the oldest kept one's start on. Descriptions go first, so a half-pruned backup is never counted.
    `storage`: the local repository (default) or the S3 replica, pruned alike from one listing each."""
    from backup_assets.core.pitr import wal
    from backup_assets.core.pitr.locations import base_prefix, local_storage, wal_prefix

    now = now or _now()
    storage = storage or local_storage(catalog)
    days = (catalog.sources[source].pitr or Pitr()).retention_days
    listed = dict(storage.list(base_prefix(source)))
    bases = _complete_bases(storage, base_prefix(source), listed)
    cutoff = now - dt.timedelta(days=days)
    older = [b for b in bases if dt.datetime.fromisoformat(b["finished_at"]) <= cutoff]
    anchor = older[-1] if older else (bases[0] if bases else None)
    keep: dict[str, dict] = {}
    if anchor is not None:
        for b in bases[bases.index(anchor):]:
            for member in chain_of(bases, b):
                keep[member["artifact"]] = member
    delete = [b for b in bases if b["artifact"] not in keep]
    freed = 0
    # files of a base backup killed before its JSON was written (never counted): gone once a day old
    described = {_stamp(k[len(base_prefix(source)):]) for k in listed if k.endswith(".json")}
    orphans = [k for k in listed if not k.endswith(".json") and _stamp(k[len(base_prefix(source)):]) not in described
               and _stamp_age(k[len(base_prefix(source)):], now) > dt.timedelta(days=1)]
    for key in orphans:
        freed += listed[key]
    if orphans and not dry_run:
        storage.delete(orphans)
    for b in delete:
        freed += b["size_bytes"] + (b["manifest"]["size_bytes"] if b.get("manifest") else 0)
        if not dry_run:
            storage.delete([f"{base_prefix(source)}{b['artifact']}.json"])
            storage.delete([base_prefix(source) + name for name in
                            [b["artifact"]] + ([b["manifest"]["artifact"]] if b.get("manifest") else [])])
    wal_deleted = 0
    if keep:
        first = min(m["start_wal"][8:] for m in keep.values())
        listed_wal = dict(storage.list(wal_prefix(source)))
        for key in sorted(listed_wal):
            name = key[len(wal_prefix(source)):]
            if not name.endswith(".json"):
                continue
            name = name[:-5]
            if name.endswith(".history") or not wal.ARCHIVABLE.match(name) or name[8:24] >= first:
                continue
            wal_deleted += 1
            freed += sum(listed_wal.get(f"{wal_prefix(source)}{name}{ext}", 0) for ext in (".zst", ".zst.age"))
            if not dry_run:
                storage.delete([key])
                storage.delete([f"{wal_prefix(source)}{name}{ext}" for ext in (".zst", ".zst.age")
                                if f"{wal_prefix(source)}{name}{ext}" in listed_wal])
    return {"retention_days": days, "base_backups_kept": len(keep), "base_backups_deleted": len(delete),
            "orphans_deleted": len(orphans),
            "deleted": [b["artifact"] for b in delete], "wal_files_deleted": wal_deleted, "bytes_freed": freed,
            "oldest_restorable": (min(keep.values(), key=lambda m: m["finished_at"])["finished_at"] if keep else None)}


def _stamp(name: str) -> str | None:
    match = re.match(r"base-(\d{8}T\d{12}Z)\.", name)
    return match.group(1) if match else None


def _stamp_age(name: str, now: dt.datetime) -> dt.timedelta:
    """How old a base backup file is by the time in its name (base-20261202T154218078907Z...); a name that is not
    ours is never old enough to delete."""
    stamp = _stamp(name)
    if stamp is None:
        return dt.timedelta(0)
    return now - dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
