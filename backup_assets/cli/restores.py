"""`restore` (a dump, a SQLite copy, or a point in time), the restore log (`restores`) and the safety copies
restores keep (`safety-copies`)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from backup_assets.core import BackupError
from backup_assets.cli.common import (UsageError, Reporter, _catalog, _print_table, _check_partitions,
    _selected_backup, _confirm, _alert)


def cmd_restore(args) -> int:
    if args.to_time or args.to_lsn or args.latest:
        return cmd_pitr_restore(args)  # without the logical restore's modules: the recovery time counts
    from backup_assets.core.restore.postgres import restore_plan, restore_postgres
    from backup_assets.core.restore.sqlite import restore_sqlite

    catalog = _catalog(args)
    say = Reporter()
    _check_partitions(args, catalog)
    if args.from_ != "local":
        from backup_assets.core.replica import fetch_from_replica

        if args.from_ not in catalog.replication.replicas():
            raise UsageError(f"--from {args.from_}: the catalog has no replication.{args.from_} section")
        backup = fetch_from_replica(catalog, source=args.source, group=args.group, tier=args.tier,
                                    partition=args.partition, replica=args.from_, say=say)
    else:
        backup = _selected_backup(args, catalog, say)
    m = backup.manifest
    if m.engine == "sqlite" and (args.target_db or args.tables):
        raise BackupError(f"{backup.artifact_path.name} is a SQLite backup: --target-db and --tables are for PostgreSQL")
    if m.engine == "postgres" and args.target_file:
        raise BackupError(f"{backup.artifact_path.name} is a PostgreSQL backup and cannot be restored onto a SQLite file")
    tables = list(args.tables or [])
    plan = restore_plan(catalog, backup, target_db=args.target_db, tables=tables, target_file=args.target_file,
                        safety_copy=not args.no_safety_copy)
    target = args.target_db or args.target_file or (
        catalog.sources[m.source].connection.dbname if m.engine == "postgres" else str(catalog.resolve_path(catalog.sources[m.source].path)))
    _confirm(args, plan, target)
    say(f"restoring {backup.artifact_path}")
    from backup_assets.core.monitoring.alerts import Alert

    failed_alert = Alert(what=f"restore into {target}{' (tables ' + ', '.join(tables) + ')' if tables else ''} failed",
                         error="", source=m.source, group=m.group, tier=m.tier, partition=m.partition,
                         asset=f"restore:{m.source}", cause=f"restore:{target}")
    try:
        if m.engine == "postgres":
            result = restore_postgres(catalog, backup, target_db=args.target_db, tables=tables or None, jobs=args.jobs,
                                      safety_copy=not args.no_safety_copy,
                                      terminate_connections=args.terminate_connections,
                                      create_roles=not args.no_create_roles, say=say)
        else:
            result = restore_sqlite(catalog, backup, target_file=args.target_file,
                                    safety_copy=not args.no_safety_copy, say=say)
    except BackupError as exc:
        _alert(catalog, replace(failed_alert, error=str(exc)))
        raise
    if result.problems or result.hook_problem:
        _alert(catalog, replace(failed_alert, error="; ".join(result.problems) or result.hook_problem))
    print(result.table())
    print(f"restored {result.artifact} into {result.target} in {result.duration_s:.1f}s"
          + (f"; the previous data is kept as {result.safety_copy}" if result.safety_copy else ""))
    if result.problems:
        print("DIFFERS from the manifest: " + "; ".join(result.problems), file=sys.stderr)
        return 1
    if result.hook_problem:
        print(f"HOOK FAILED: {result.hook_problem}", file=sys.stderr)
        return 1
    return 0


def cmd_pitr_restore(args) -> int:
    from backup_assets.core.pitr import recovery as pitr

    catalog = _catalog(args)
    if not args.pgdata:
        raise UsageError("a point-in-time restore builds a new data directory: name it with --pgdata")
    if not args.source:
        raise UsageError("name the source with --source")
    target = pitr.parse_time(args.to_time) if args.to_time else None
    what = target.isoformat() if target else (args.to_lsn or "the end of the archived WAL")
    plan = (f"build a new data directory {args.pgdata} from {args.source}'s base backup and WAL archive, recover it "
            f"to {what} and start it on port {args.port}; the running server is not touched")
    _confirm(args, plan, args.pgdata)
    if args.from_ != "local":  # the base backups come back into the local repository; WAL one segment at a time
        from backup_assets.core.pitr.s3 import download_bases
        from backup_assets.core.pitr.locations import replica_storage

        if args.from_ not in catalog.replication.replicas():
            raise UsageError(f"--from {args.from_}: the catalog has no replication.{args.from_} section")
        download_bases(catalog, args.source, replica_storage(catalog, replica=args.from_), say=Reporter())
    cfg = catalog.sources[args.source].pitr
    run_as = args.run_as or (cfg.run_as if cfg is not None else None)  # the catalog's server user by default
    result = pitr.restore_to_time(catalog, args.source, args.pgdata, to_time=target, to_lsn=args.to_lsn, port=args.port,
                                  run_as=run_as, say=Reporter())
    print(f"recovered {result.pgdata} from {result.base} to {result.target}: {result.reached}")
    try:
        pitr.record_recovered(catalog, result, args.source)
    except OSError as exc:  # the server runs; only `make stop` will not know it
        print(f"backup-assets: the running server was not recorded for `make stop`: {exc.strerror}", file=sys.stderr)
    import shlex

    stop = f"{shlex.quote(str(result.bin_dir / 'pg_ctl'))} -D {shlex.quote(str(result.pgdata))} -m fast stop"
    if result.user is not None:  # PostgreSQL refuses root: stop it as the user it runs as
        stop = f"runuser -u {shlex.quote(result.user.pw_name)} -- {stop}"
    print(f"running on 127.0.0.1:{result.port}; stop it with: {stop}")
    if getattr(args, "timings", False) and result.timings:
        total = sum(v for k, v in result.timings.items() if not k.startswith(" "))
        print("timings: " + "; ".join(f"{k.strip()} {v:.2f}s" for k, v in result.timings.items())
              + f"; total {total:.2f}s (after the command started)")
    return 0


def cmd_restores(args) -> int:
    """The restore log (<repository>/restores.jsonl), newest last."""
    from backup_assets.core.restore import restore_log as audit

    catalog = _catalog(args)
    entries = audit.read(catalog.repository_root)[-args.limit:] if args.limit else audit.read(catalog.repository_root)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"{'WHEN':25} {'BY':28} {'EVENT':9} {'OUTCOME':8} {'SOURCE':12} {'TARGET':40} BACKUP")
    for e in entries:
        who = f"{e.get('user', '?')}@{e.get('host', '?')}" if e.get("via") == "cli" else f"run {str(e.get('run_id'))[:8]}"
        print(f"{e.get('at', ''):25} {who[:28]:28} {e.get('event', ''):9} {e.get('outcome', '-'):8} "
              f"{e.get('source', ''):12} {str(e.get('target', ''))[:40]:40} {e.get('artifact', '')}"
              + (f"  tables: {', '.join(e['tables'])}" if e.get("tables") else "")
              + (f"  error: {e['error']}" if e.get("error") else ""))
    return 0


def cmd_safety_list(args) -> int:
    from backup_assets.core.doctor import safety_copies

    rows = [{"kind": c.kind, "where": c.where, "name": c.name, "created": c.created.isoformat(timespec="seconds"),
             "age_days": c.age_days} for c in safety_copies(_catalog(args))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        _print_table(rows, ["kind", "where", "name", "created", "age_days"])
    else:
        print("no safety copies", file=sys.stderr)
    return 0


def cmd_safety_drop(args) -> int:
    from backup_assets.core.doctor import drop_safety_copy, safety_copies

    if args.older_than is None and not args.all:
        raise UsageError("say which: --older-than DAYS, or --all")
    catalog = _catalog(args)
    doomed = [c for c in safety_copies(catalog) if args.all or c.age_days > args.older_than]
    if not doomed:
        print("no safety copies to drop", file=sys.stderr)
        return 0
    names = ", ".join(f"{c.kind} {c.name}" for c in doomed)
    if not args.confirm:
        raise UsageError(f"refusing to drop {len(doomed)} safety cop{'y' if len(doomed) == 1 else 'ies'} ({names}) "
                         "without --confirm")
    for c in doomed:
        drop_safety_copy(catalog, c)
        print(f"dropped {c.kind} {c.name} ({c.where})")
    return 0
