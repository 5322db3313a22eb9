"""The command line's arguments: one subcommand per operation, each with its options and help."""

from __future__ import annotations

import argparse

from backup_assets.catalog import TIER_NAMES
from backup_assets.cli.backups import cmd_list, cmd_verify, cmd_backup, cmd_drill, cmd_basebackup
from backup_assets.cli.restores import cmd_restore, cmd_restores, cmd_safety_list, cmd_safety_drop
from backup_assets.cli.maintenance import (cmd_retention_prune, cmd_retention_prune_tables, cmd_runs_prune,
                                           cmd_doctor, cmd_replicas_verify, cmd_rekey)
from backup_assets.cli.operations import (cmd_wal_push, cmd_wal_fetch, cmd_wal_verify, cmd_alerts_test, cmd_metrics,
                                          cmd_metrics_serve)

JOBS_HELP = "parallel pg_restore jobs (default: the catalog's restore.jobs, 2; one for an archive under 64 MiB)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", help="catalog file (default: $BACKUP_ASSETS_CATALOG, else the demo catalog)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list backups in the repository")
    p.add_argument("--source")
    p.add_argument("--group")
    p.add_argument("--tier", choices=TIER_NAMES)
    p.add_argument("--partition")
    p.add_argument("--json", action="store_true")
    p.add_argument("--local-only", action="store_true", help="do not list S3")
    p.add_argument("--paths", action="store_true", help="add each backup's full path or S3 URI")
    p.set_defaults(func=cmd_list)

    def backup_selector(p, file_arg: bool = True):
        if file_arg:
            p.add_argument("file", nargs="?", help="an artifact in the repository")
        else:
            p.add_argument("--file", help="an artifact in the repository")
        p.add_argument("--source")
        p.add_argument("--group")
        p.add_argument("--tier", choices=TIER_NAMES)
        p.add_argument("--partition", help="partition key (default: the newest backup that verifies)")

    p = sub.add_parser("verify", help="check a backup: checksum, readability, optionally a restore drill")
    backup_selector(p)
    p.add_argument("--drill", action="store_true", help="also restore it into a scratch target and compare")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="restore a backup (asks first; keeps a safety copy)")
    backup_selector(p, file_arg=False)
    p.add_argument("--from", dest="from_", choices=["local", "s3", "gcs", "azure"], default="local",
                   help="the local repository or one of the catalog's replicas")
    p.add_argument("--target-db", help="restore into this PostgreSQL database (created if missing)")
    p.add_argument("--target-file", help="restore into this SQLite file (default: the source's path)")
    p.add_argument("--tables", nargs="+", help='replace only these tables (PostgreSQL), e.g. runs billing.invoices '
                                                "'public.\"Order Items\"' (a partitioned table with its partitions)")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--confirm", action="store_true", help="do not ask")
    p.add_argument("--no-safety-copy", action="store_true", help="do not keep the replaced data")
    p.add_argument("--terminate-connections", action="store_true", help="end other sessions on the target")
    p.add_argument("--no-create-roles", action="store_true",
                   help="refuse instead of creating roles that own restored objects and are missing on the target")
    pitr = p.add_argument_group("point-in-time recovery (base backups + WAL archive)")
    pitr.add_argument("--to-time", help="recover to this time, e.g. '2026-11-22 10:41:07+00'")
    pitr.add_argument("--to-lsn", help="recover to this WAL location")
    pitr.add_argument("--latest", action="store_true", help="recover to the end of the archived WAL")
    pitr.add_argument("--pgdata", help="the new data directory to build (must not exist or be empty)")
    pitr.add_argument("--port", type=int, default=5433, help="port of the recovered server (default 5433)")
    pitr.add_argument("--run-as", help="OS user the recovered server runs as (default: the catalog's pitr.run_as)")
    pitr.add_argument("--timings", action="store_true", help="print the seconds each phase of the restore took")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("basebackup", help="a base backup for point-in-time recovery (pg_basebackup, needs the WAL "
                                          "archive)")
    p.add_argument("--source", required=True)
    p.add_argument("--dagster", action="store_true",
                   help="take it through the <source>/base_backup asset: a run in DAGSTER_HOME with the asset's "
                        "checks (the point-in-time drill too) and replica, shown in the UI")
    p.add_argument("--kind", choices=["auto", "full", "incremental"], default="auto",
                   help="auto (default): incremental on the newest base backup where the server can take one "
                        "(PostgreSQL 17+, summarize_wal = on) and the catalog's pitr settings allow, else full")
    p.add_argument("--local-only", action="store_true",
                   help="do not replicate base backups and WAL to the catalog's S3 replica afterwards")
    p.set_defaults(func=cmd_basebackup)

    p = sub.add_parser("drill", help="the disaster-recovery drill: restore the newest backup of everything, compare")
    p.add_argument("--source", nargs="*")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.set_defaults(func=cmd_drill)

    p = sub.add_parser("retention", help="retention: prune old backups, prune old application rows")
    rsub = p.add_subparsers(dest="retention_command", required=True)
    for name, func, text in (
        ("prune", cmd_retention_prune, "delete backups past their tier's retention (local and S3)"),
        ("prune-tables", cmd_retention_prune_tables, "delete old application rows covered by a drilled backup"),
    ):
        r = rsub.add_parser(name, help=text + " (a dry run unless --apply)")
        r.add_argument("--dry-run", action="store_true", help="only report (the default)")
        r.add_argument("--apply", action="store_true", help="really delete")
        if name == "prune-tables":
            r.add_argument("--source", nargs="*")
        r.set_defaults(func=func)

    p = sub.add_parser("runs", help="Dagster run history in $DAGSTER_HOME")
    rsub = p.add_subparsers(dest="runs_command", required=True)
    r = rsub.add_parser("prune", help="delete old runs, never one holding a partition's latest materialization "
                                      "(a dry run unless --apply)")
    r.add_argument("--older-than-days", type=int, default=90)
    r.add_argument("--apply", action="store_true")
    r.add_argument("--include-restores", action="store_true",
                   help="delete old restore runs too (kept by default; restores.jsonl keeps their record either way)")
    r.set_defaults(func=cmd_runs_prune)

    p = sub.add_parser("restores", help="the restore log: every restore, who started it, from where, and how it ended")
    p.add_argument("--limit", type=int, default=50, help="the newest N entries (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restores)

    p = sub.add_parser("rekey", help="re-encrypt existing backups to new recipients (local and S3; a dry run "
                                     "unless --apply)")
    p.add_argument("--recipients", nargs="+", required=True, help="public keys: age1... or 'ssh-ed25519 AAAA...'")
    p.add_argument("--identity-file-env", help="variable that will name the new identity file (recorded in manifests)")
    p.add_argument("--source")
    p.add_argument("--group")
    p.add_argument("--tier", choices=TIER_NAMES)
    p.add_argument("--older-than-days", type=float)
    p.add_argument("--local-only", action="store_true", help="leave the S3 copies as they are")
    p.add_argument("--apply", action="store_true")
    p.set_defaults(func=cmd_rekey)

    p = sub.add_parser("doctor", help="find and repair what interrupted operations left (partial files, scratch "
                                      "folders and databases, a restore's swap state, artifacts without manifest)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("safety-copies", help="the copies restores kept of what they replaced")
    ssub = p.add_subparsers(dest="safety_command", required=True)
    r = ssub.add_parser("list", help="databases, schemas and SQLite files kept by restores")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_safety_list)
    r = ssub.add_parser("drop", help="drop safety copies (asks for --confirm)")
    r.add_argument("--older-than", type=float, metavar="DAYS")
    r.add_argument("--all", action="store_true")
    r.add_argument("--confirm", action="store_true")
    r.set_defaults(func=cmd_safety_drop)

    p = sub.add_parser("replicas", help="the replicas (S3, GCS, Azure)")
    ssub = p.add_subparsers(dest="replicas_command", required=True)
    r = ssub.add_parser("verify", help="download and hash the copies that are due (replication.*.deep_verify_days)")
    r.add_argument("--replica", choices=["s3", "gcs", "azure"], help="only this replica (default: every one)")
    r.add_argument("--all", action="store_true", help="every replica, due or not")
    r.add_argument("--limit", type=int, metavar="N", help="at most N replicas (default: deep_verify_per_run)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_replicas_verify)

    p = sub.add_parser("wal-push", help="archive one WAL file (PostgreSQL's archive_command: wal-push --source S %%p)")
    p.add_argument("--source", required=True)
    p.add_argument("path", help="the WAL file (%%p)")
    p.set_defaults(func=cmd_wal_push)
    p = sub.add_parser("wal-fetch", help="restore one archived WAL file (restore_command: wal-fetch --source S %%f %%p)")
    p.add_argument("--source", required=True)
    p.add_argument("name", help="the WAL file name (%%f)")
    p.add_argument("dest", help="where to write it (%%p)")
    p.set_defaults(func=cmd_wal_fetch)
    p = sub.add_parser("wal-verify", help="WAL archive continuity: every segment from the oldest to the newest")
    p.add_argument("--source", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wal_verify)

    p = sub.add_parser("alerts", help="alert channels")
    asub = p.add_subparsers(dest="alerts_command", required=True)
    r = asub.add_parser("test", help="send a test alert to every configured channel")
    r.set_defaults(func=cmd_alerts_test)

    p = sub.add_parser("metrics", help="Prometheus metrics of the repository: print them, write a node_exporter "
                                       "textfile, or `metrics serve --port N`")
    p.add_argument("--openmetrics", action="store_true", help="OpenMetrics text instead of Prometheus 0.0.4")
    p.add_argument("--textfile", metavar="PATH", help="write a node_exporter textfile (atomically) instead")
    p.set_defaults(func=cmd_metrics)
    msub = p.add_subparsers(dest="metrics_command")
    r = msub.add_parser("serve", help="serve /metrics over HTTP until stopped")
    r.add_argument("--port", type=int, default=9860, help="default 9860")
    r.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    r.set_defaults(func=cmd_metrics_serve)

    p = sub.add_parser("backup", help="back up now through Dagster (default: the newest complete partition)")
    p.add_argument("--tier", default="daily", choices=TIER_NAMES)
    p.add_argument("--partition", nargs="+", help="partition key(s), e.g. 2026-11-18 2026-11-19 (a backfill: one "
                                                 "run each; default: the newest complete one)")
    p.add_argument("--select", nargs="*", help="source or source/group names")
    p.add_argument("--timings", action="store_true", help="print where the time went: imports, catalog, Dagster's "
                                                         "definitions and instance, the run's dumps, checks and events")
    p.set_defaults(func=cmd_backup)
    return parser
