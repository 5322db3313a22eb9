"""`backup-assets`: the operator's command line. It reads the catalog, the repository and the
manifests directly, so it works when Dagster is down (that is when it is needed most).

Exit codes: 0 success, 1 failure, 2 refused or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from .catalog import CatalogError, catalog_from_env, load_catalog
from .core import BackupError
from .core.backup import repository_for


class UsageError(Exception):
    """Refused: bad arguments or a missing confirmation (exit code 2)."""


def _catalog(args):
    return load_catalog(args.catalog) if args.catalog else catalog_from_env()


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def cmd_list(args) -> int:
    catalog = _catalog(args)
    repo = repository_for(catalog)
    rows = []
    for b in repo.backups(source=args.source, group=args.group, tier=args.tier, partition=args.partition):
        m = b.manifest
        rows.append({
            "source": m.source, "group": m.group, "tier": m.tier, "partition": m.partition,
            "created": m.timestamp, "size": m.size_human, "size_bytes": m.size_bytes, "rows": m.total_rows,
            "where": "local", "path": str(b.artifact_path),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        _print_table(rows, ["source", "group", "tier", "partition", "created", "size", "rows", "where", "path"])
    else:
        print("no backups match", file=sys.stderr)
    return 0


def cmd_backup(args) -> int:
    """Materialize partitions through Dagster (recorded in DAGSTER_HOME, visible in the UI)."""
    import dagster as dg

    from .defs.assets import backup_key
    from .defs.build import build_definitions

    catalog = _catalog(args)
    targets = [t for t in catalog.backup_targets() if t[2] == args.tier]
    if args.select:
        targets = [t for t in targets if f"{t[0]}/{t[1]}" in args.select or t[0] in args.select]
    if not targets:
        raise UsageError(f"no {args.tier} backup assets match {args.select or 'the catalog'}")
    defs = build_definitions(catalog)
    instance = dg.DagsterInstance.get()
    failed = 0
    for source, group, tier in targets:
        asset = defs.resolve_assets_def(backup_key(source, group, tier))
        partition = args.partition or asset.partitions_def.get_last_partition_key()
        result = dg.materialize([asset], partition_key=partition, instance=instance, raise_on_error=False,
                                tags={"backup_assets/trigger": "cli"},
                                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        latest = repository_for(catalog).latest(source, group, tier, partition)
        if result.success and latest:
            print(f"{source}/{group}/{tier} {partition}: {latest.artifact_path} ({latest.manifest.size_human})")
        else:
            failed += 1
            errors = [e.event_specific_data.error.message.strip() for e in result.all_events
                      if e.is_step_failure and e.event_specific_data and e.event_specific_data.error]
            print(f"{source}/{group}/{tier} {partition}: FAILED {errors[0] if errors else ''}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", help="catalog file (default: $BACKUP_ASSETS_CATALOG, else the demo catalog)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list backups in the repository")
    p.add_argument("--source")
    p.add_argument("--group")
    p.add_argument("--tier", choices=["daily", "weekly", "monthly"])
    p.add_argument("--partition")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("backup", help="back up now through Dagster (default: the newest complete partition)")
    p.add_argument("--tier", default="daily", choices=["daily", "weekly", "monthly"])
    p.add_argument("--partition", help="partition key, e.g. 2026-11-20 (default: the newest complete one)")
    p.add_argument("--select", nargs="*", help="source or source/group names")
    p.set_defaults(func=cmd_backup)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"backup-assets: {exc}", file=sys.stderr)
        return 2
    except (CatalogError, BackupError) as exc:
        print(f"backup-assets: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("backup-assets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

