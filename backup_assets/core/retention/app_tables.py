"""Application-table pruning (the MyloWare runbook's `retention prune --artifacts-days 90
--webhooks-days 14`), gated on verified backups.

A row is deleted only when it is older than its rule AND older than the snapshot of the newest
backup of the rule's table group that passed its restore drill, so every pruned row exists in a
backup that is known to restore. Deletes run in bounded batches, each its own short transaction
with a lock timeout, so the application never waits long on a lock.
"""

from __future__ import annotations

import datetime as dt
import time

from psycopg import sql

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.backup.take import primary_endpoint_for, repository_for
from backup_assets.core.engines import postgres
from backup_assets.core.names import TableName
from backup_assets.core.verify.records import passed_drill


def verified_snapshot(catalog: Catalog, source: str, group: str) -> tuple[dt.datetime | None, str | None]:
    """Snapshot time and artifact of the newest backup of the group that passed its restore drill."""
    best = None
    for b in repository_for(catalog).backups(source=source, group=group):
        if b.manifest.snapshot_at and passed_drill(b):
            at = dt.datetime.fromisoformat(b.manifest.snapshot_at)
            if best is None or at > best[0]:
                best = (at, b.manifest.artifact)
    return best if best else (None, None)


def prune_tables(catalog: Catalog, source: str, *, dry_run: bool, now: dt.datetime | None = None,
                 say=lambda _m: None) -> dict:
    src = catalog.sources[source]
    if src.engine != "postgres":
        raise BackupError(f"source {source!r} is not a postgres source")
    now = now or dt.datetime.now(dt.timezone.utc)
    ep = primary_endpoint_for(catalog, source)
    report: dict = {"source": source, "dry_run": dry_run, "tables": {}}
    with postgres.connect(ep, what=f"pruning {source}: ") as conn:
        conn.execute("SET lock_timeout = '5s'")
        conn.execute("SET statement_timeout = '60s'")
        for rule in src.prune:
            snapshot, artifact = verified_snapshot(catalog, source, rule.verified_by_group)
            age_cutoff = now - dt.timedelta(days=rule.days)
            entry: dict = {"rule_days": rule.days, "age_cutoff": age_cutoff.isoformat(timespec="seconds"),
                           "verified_backup": artifact,
                           "verified_snapshot": snapshot.isoformat(timespec="seconds") if snapshot else None}
            name = TableName.parse(rule.table)
            table = name.ident()
            column = sql.Identifier(rule.timestamp_column)
            if snapshot is None:
                entry.update(cutoff=None, deleted=0, would_delete=0,
                             skipped=f"no backup of group {rule.verified_by_group!r} has passed a restore drill")
                report["tables"][str(name)] = entry
                say(f"{name}: nothing pruned, {entry['skipped']}")
                continue
            cutoff = min(age_cutoff, snapshot)
            entry["cutoff"] = cutoff.isoformat(timespec="seconds")
            eligible = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} < %s").format(table, column),
                                    (cutoff,)).fetchone()[0]
            if dry_run:
                entry.update(would_delete=eligible, deleted=0, batches=0)
            else:
                deleted = batches = 0
                started = time.monotonic()
                delete = sql.SQL(
                    "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {c} < %s LIMIT %s))"
                ).format(t=table, c=column)
                while True:
                    with conn.transaction():
                        n = conn.execute(delete, (cutoff, rule.batch_size)).rowcount
                    batches += 1
                    deleted += n
                    if n < rule.batch_size:
                        break
                entry.update(would_delete=eligible, deleted=deleted, batches=batches,
                             duration_s=round(time.monotonic() - started, 3))
            report["tables"][str(name)] = entry
            say(f"{name}: {'would delete' if dry_run else 'deleted'} {entry['would_delete'] if dry_run else entry['deleted']} "
                f"row(s) older than {entry['cutoff']}")
    return report
