"""Base backups of a PostgreSQL server for point-in-time recovery: taking them (pg_basebackup, full or incremental),
listing them locally or on the replica, choosing the one a target needs, and pruning them with their WAL.

`pg_basebackup -Ft -D - -X none` is streamed through the same compression, encryption, hashing and atomic write
as every artifact, to `<repository>/base/<source>/base-<UTC time>.tar.zst[.age]`, with a JSON beside it (start
WAL file and timeline from the backup_label, start and finish times, sizes, SHA-256). The backup_label and
backup_manifest are picked out of the stream as it is written (unpack.TarPicker): nothing is read back, so a host
that only encrypts needs no private key. The WAL it needs comes from the archive (`wal-push`); pg_basebackup
waits until the last segment is archived."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from backup_assets.catalog import Catalog, Pitr
from backup_assets.core import BackupError
from backup_assets.core.artifact import CHUNK, ArtifactWriter, decompress_to, ensure_dir, write_json_atomic
from backup_assets.core.crypto import identities_for_record
from backup_assets.core.engines import tools
from backup_assets.core.pitr.unpack import TarPicker


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
    from backup_assets.core.engines import (postgres)  # the driver only where a server is asked: a restore starts without it

    with postgres.connect(ep, what=what) as conn:
        major = postgres.server_major(conn)
        facts = {
            "major": major, "version": postgres.server_version(conn),
            "archive_mode": conn.execute("SELECT current_setting('archive_mode')").fetchone()[0],
            "summarize_wal": conn.execute("SELECT current_setting('summarize_wal')").fetchone()[0]
            if major >= 17 else "off",
            "system_identifier": str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]),
            "in_recovery": conn.execute("SELECT pg_is_in_recovery()").fetchone()[0],
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
    from backup_assets.core.backup.take import endpoint_for, primary_endpoint_for

    folder = ensure_dir(base_dir(catalog, source))
    ep = endpoint_for(catalog, source)
    facts = _server_facts(ep, f"base backup of {source}: ")
    if facts["in_recovery"]:
        # from a standby: the WAL comes from the primary's archive, and only the primary can close the segment the
        # backup ends in and archive it (a standby with archive_mode = on archives nothing)
        if catalog.sources[source].primary is None:
            raise BackupError(f"{source}: {ep.host}:{ep.port} is a standby: a base backup from it needs the source's "
                              "`primary` in the catalog (which archives the WAL the backup ends in)")
        primary = _server_facts(primary_endpoint_for(catalog, source), f"base backup of {source} (the primary): ")
        if primary["system_identifier"] != facts["system_identifier"]:
            raise BackupError(f"{source}: the standby {ep.host}:{ep.port} is not a standby of the catalog's primary "
                              f"(system identifiers {facts['system_identifier']} and {primary['system_identifier']})")
        facts["archive_mode"] = primary["archive_mode"]
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
        # the backup_label and backup_manifest are picked out of the stream as it is written
        picker = TarPicker({"backup_label", "backup_manifest"}, what=final.name)
        with ArtifactWriter(final, recipients=recipients) as writer:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ep.child_env())
            try:
                while chunk := proc.stdout.read1(CHUNK):
                    picker.feed(chunk)
                    writer.write(chunk)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            err = proc.stderr.read().decode(errors="replace")
            if proc.wait() != 0:
                lines = [line for line in err.strip().splitlines() if "skipping special file" not in line]
                raise BackupError(f"pg_basebackup of {source} failed: "
                                  f"{ep.scrub(lines[-1] if lines else str(proc.returncode))}")
            picked = picker.finish()
            written = writer.commit()
    finished = _now()
    described = final.with_name(f"base-{stamp}.manifest.zst{suffix}")
    label, manifest = picked["backup_label"].decode(), picked["backup_manifest"]
    try:
        with ArtifactWriter(described, recipients=recipients) as mw:
            mw.write(manifest)
            man = mw.commit()
        if facts.get("in_recovery"):
            _archived_by_primary(catalog, source, _manifest_end_lsn(manifest), say)
    except BaseException:
        final.unlink(missing_ok=True)  # never left as a base backup without its description, or its WAL
        described.unlink(missing_ok=True)
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


def _archived_by_primary(catalog: Catalog, source: str, end_lsn: str | None, say, timeout_s: float = 120) -> None:
    """A base backup from a standby is restorable once the primary has archived the segment it ends in: the
    primary switches to a new segment when it is still writing that one, and this waits until the archive
    holds it (as pg_basebackup does itself on a primary)."""
    from backup_assets.core.backup.take import primary_endpoint_for
    from backup_assets.core.engines import postgres
    from backup_assets.core.pitr.wal import read_meta, wal_dir

    if end_lsn is None:
        raise BackupError(f"base backup of {source}: its backup_manifest names no WAL range")
    with postgres.connect(primary_endpoint_for(catalog, source), what=f"base backup of {source} (the primary): ") as conn:
        segment, current = conn.execute("SELECT pg_walfile_name(%s::pg_lsn), pg_walfile_name(pg_current_wal_lsn())",
                                        (end_lsn,)).fetchone()
        if current <= segment:
            conn.execute("SELECT pg_switch_wal()")
    say(f"waiting for the primary to archive {segment}, where the base backup from the standby ends")
    deadline = time.monotonic() + timeout_s
    while read_meta(wal_dir(catalog, source), segment) is None:
        if time.monotonic() > deadline:
            raise BackupError(f"base backup of {source}: the primary did not archive {segment} (where the backup ends) "
                              f"within {timeout_s:g}s: check its archive_command (wal-push) and pg_stat_archiver")
        time.sleep(0.2)


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
    locked: dict[str, str] = {}  # S3 Object Lock keeps these a little longer than the window: a later run prunes them
    for b in list(delete):
        if not dry_run:
            held = storage.delete([f"{base_prefix(source)}{b['artifact']}.json"])
            if held:
                locked[b["artifact"]] = max(until for _k, until in held).isoformat()
                delete.remove(b)
                continue
            storage.delete([base_prefix(source) + name for name in
                            [b["artifact"]] + ([b["manifest"]["artifact"]] if b.get("manifest") else [])])
        freed += b["size_bytes"] + (b["manifest"]["size_bytes"] if b.get("manifest") else 0)
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
            if not dry_run:
                held = storage.delete([key])
                if held:
                    locked[name] = max(until for _k, until in held).isoformat()
                    continue
                storage.delete([f"{wal_prefix(source)}{name}{ext}" for ext in (".zst", ".zst.age")
                                if f"{wal_prefix(source)}{name}{ext}" in listed_wal])
            wal_deleted += 1
            freed += sum(listed_wal.get(f"{wal_prefix(source)}{name}{ext}", 0) for ext in (".zst", ".zst.age"))
    return {"retention_days": days, "base_backups_kept": len(keep), "base_backups_deleted": len(delete),
            "orphans_deleted": len(orphans),
            "deleted": [b["artifact"] for b in delete], "wal_files_deleted": wal_deleted, "bytes_freed": freed,
            "oldest_restorable": (min(keep.values(), key=lambda m: m["finished_at"])["finished_at"] if keep else None),
            **({"locked_until": locked} if locked else {})}


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
