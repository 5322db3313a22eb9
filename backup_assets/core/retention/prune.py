"""Pruning what the catalog keeps, everywhere: the local repository and every replica by each tier's retention
(the rules in retention.py), and the physical tier's base backups and WAL by each source's window."""

from __future__ import annotations

import datetime as dt

from backup_assets.catalog import Catalog
from backup_assets.core.backup.take import repository_for
from backup_assets.core.retention.rules import prune_repository


def prune(catalog: Catalog, *, dry_run: bool, storage=None, storages: dict | None = None,
          now: dt.datetime | None = None) -> dict:
    """Prune the local repository and every replica, each by its own retention days (`storage`: the S3 replica's
    storage to use, `storages`: any replica's by name; the others are built from the catalog)."""
    from backup_assets.core.replica import (_as_repository, replica_repository)  # SDKs only where there is a replica

    now = now or dt.datetime.now(dt.timezone.utc)
    given = {**({"s3": storage} if storage is not None else {}), **(storages or {})}
    local = repository_for(catalog)
    places = [("local", local)] + [
        (name, _as_repository(given[name]) if name in given else replica_repository(catalog, replica=name))
        for name in catalog.replication.replicas()]
    report: dict = {"dry_run": dry_run}
    for where, repo in places:
        days = {t: catalog.retention_days(t, where) for t in catalog.tiers}
        report[where] = prune_repository(repo, days, dry_run=dry_run, now=now)
    if catalog.pitr_sources():  # base backups and WAL, on disk and on the replicas, each by the source's pitr days
        from backup_assets.core.pitr.base import prune_base

        report["pitr"] = {}
        for source in catalog.pitr_sources():
            report["pitr"][source] = {"local": prune_base(catalog, source, dry_run=dry_run, now=now)}
            if catalog.sources[source].pitr.s3:
                for where, repo in places[1:]:
                    report["pitr"][source][where] = prune_base(catalog, source, dry_run=dry_run, now=now,
                                                               storage=repo.storage)
    if not dry_run:
        local.sweep()
    return report
