"""Prometheus/OpenMetrics exposition of the repository's state, read fresh at every scrape.

Names follow pgbackrest_exporter where they fit (`*_since_last_completion_seconds`, sizes in bytes,
durations in seconds, one label set per backup kind); ours are per source, group and tier:

    backup_assets_backup_last_success_timestamp_seconds   snapshot time of the newest good backup
    backup_assets_backup_since_last_completion_seconds    its age
    backup_assets_backup_rpo_seconds / _rpo_met           the catalog's recovery point objective, and 1 when met
    backup_assets_backup_size_bytes / _raw_size_bytes     the newest good backup, stored / before compression
    backup_assets_backup_duration_seconds, _rows          how long it took, rows it holds
    backup_assets_backup_count                            backups kept in the local repository
    backup_assets_check_passed{check}                     last outcome of each check (1 pass, 0 fail)
    backup_assets_check_last_run_timestamp_seconds{check}
    backup_assets_drill_rto_seconds                       the last restore drill's recovery time
    backup_assets_wal_last_archived_timestamp_seconds, _wal_since_last_archived_seconds, _wal_segments,
    _wal_gaps, _base_backup_count, _base_backup_last_timestamp_seconds{kind},
    _pitr_window_start_timestamp_seconds        per source with a WAL archive (point-in-time recovery)
    backup_assets_replica_last_replicated_timestamp_seconds{replica}, _replica_last_proven_timestamp_seconds{replica},
    _replica_audit_failures{replica}                per replica (s3, gcs, azure), from this host's records
    backup_assets_repository_bytes, _disk_free_bytes, _disk_total_bytes
    backup_assets_exporter_scrape_duration_seconds

No metric carries a secret: labels are catalog names only.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from backup_assets.catalog import Catalog

PREFIX = "backup_assets_"
LABELS = ["source", "group", "tier"]


class RepositoryCollector:
    """A prometheus_client collector over the catalog's repository (reads it at every collect())."""

    def __init__(self, catalog: Catalog, report: tuple | None = None):
        self.catalog = catalog
        self.report = report  # (rows, forecast) of health.report already read by the caller, used once

    def describe(self):
        return []  # not known before the repository is read; keeps registration cheap

    def collect(self):
        from backup_assets.core.monitoring import health

        started = time.monotonic()
        rows, forecast = self.report or health.report(self.catalog)
        self.report = None

        def gauge(name: str, doc: str, labels=LABELS, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels, unit=unit)

        last = gauge("backup_last_success_timestamp_seconds", "Snapshot time of the newest good (verified) backup.")
        since = gauge("backup_since_last_completion_seconds", "Age of the newest good backup.")
        rpo = gauge("backup_rpo_seconds", "Recovery point objective of the tier (catalog rpo_hours).")
        met = gauge("backup_rpo_met", "1 when the newest good backup is younger than the RPO, else 0.")
        size = gauge("backup_size_bytes", "Stored size of the newest good backup (compressed, encrypted).")
        raw = gauge("backup_raw_size_bytes", "Size of the newest good backup before compression.")
        duration = gauge("backup_duration_seconds", "How long the newest good backup took.")
        rows_ = gauge("backup_rows", "Rows held by the newest good backup.")
        count = gauge("backup_count", "Backups kept in the local repository.")
        passed = gauge("check_passed", "Last outcome of each check (1 passed, 0 failed).", LABELS + ["check"])
        ran = gauge("check_last_run_timestamp_seconds", "When each check last ran.", LABELS + ["check"])
        rto = gauge("drill_rto_seconds", "Recovery time measured by the last restore drill.")
        now = dt.datetime.now(dt.timezone.utc)
        for r in rows:
            labels = [r.source, r.group, r.tier]
            rpo.add_metric(labels, r.rpo_h * 3600)
            met.add_metric(labels, 1.0 if r.rpo_ok else 0.0)
            count.add_metric(labels, r.count)
            if r.newest is not None:
                m = r.newest
                last.add_metric(labels, r.snapshot_at.timestamp())
                since.add_metric(labels, max(0.0, (now - r.snapshot_at).total_seconds()))
                size.add_metric(labels, m.size_bytes)
                raw.add_metric(labels, m.raw_size_bytes)
                duration.add_metric(labels, m.duration_s)
                rows_.add_metric(labels, m.total_rows)
            for check, outcome in sorted(r.latest_checks.items()):
                passed.add_metric(labels + [check], 1.0 if outcome.get("passed") else 0.0)
                at = _timestamp(outcome.get("at"))
                if at is not None:
                    ran.add_metric(labels + [check], at)
            if r.last_rto_s is not None:
                rto.add_metric(labels, r.last_rto_s)
        yield from (last, since, rpo, met, size, raw, duration, rows_, count, passed, ran, rto)
        yield from self._wal(gauge)
        yield from self._replicas(gauge)
        disk = forecast["disk"]
        repo = gauge("repository_bytes", "Bytes stored in the local backup repository.", ["repository"])
        repo.add_metric(["local"], forecast["repository_bytes"])
        free = gauge("disk_free_bytes", "Free bytes on the repository's file system.", ["path"])
        free.add_metric([disk["path"]], disk["free_bytes"])
        total = gauge("disk_total_bytes", "Size of the repository's file system.", ["path"])
        total.add_metric([disk["path"]], disk["total_bytes"])
        scrape = gauge("exporter_scrape_duration_seconds", "How long reading the repository took.", [])
        scrape.add_metric([], time.monotonic() - started)
        yield from (repo, free, total, scrape)


    def _wal(self, gauge):
        """Point-in-time recovery: per PostgreSQL source with a WAL archive, its recovery point (the newest
        archived segment's time), its segments and gaps since the oldest base backup, its base backups."""
        from backup_assets.core.pitr import base as pitr_base
        from backup_assets.core.pitr import wal

        last = gauge("wal_last_archived_timestamp_seconds", "When the newest WAL segment was archived (the RPO).",
                     ["source"])
        age = gauge("wal_since_last_archived_seconds", "Age of the newest archived WAL segment.", ["source"])
        segments = gauge("wal_segments", "Archived WAL segments since the oldest base backup.", ["source"])
        gaps = gauge("wal_gaps", "Missing WAL segments runs since the oldest base backup (0 when continuous).",
                     ["source"])
        bases = gauge("base_backup_count", "Base backups kept for point-in-time recovery.", ["source"])
        newest = gauge("base_backup_last_timestamp_seconds", "When the newest base backup ended.", ["source", "kind"])
        window = gauge("pitr_window_start_timestamp_seconds", "The earliest time a point-in-time restore can reach "
                       "(the oldest kept base backup's end).", ["source"])
        now = time.time()
        for name, src in self.catalog.sources.items():
            if src.engine != "postgres" or not (self.catalog.repository_root / "wal" / name).is_dir():
                continue
            kept = pitr_base.base_backups(self.catalog, name)
            result = wal.verify(self.catalog, name, since=kept[0]["start_wal"] if kept else None)
            segments.add_metric([name], result.segments)
            gaps.add_metric([name], len(result.gaps))
            bases.add_metric([name], len(kept))
            if kept:
                newest.add_metric([name, kept[-1].get("kind", "full")], _timestamp(kept[-1]["finished_at"]))
                window.add_metric([name], _timestamp(kept[0]["finished_at"]))
            at = _timestamp(result.newest_pushed_at)
            if at is not None:
                last.add_metric([name], at)
                age.add_metric([name], max(0.0, now - at))
        yield from (last, age, segments, gaps, bases, newest, window)


    def _replicas(self, gauge):
        """Per replica (s3, gcs, azure), from this host's record of what it replicated and proved (no request to
        the storage at a scrape): the newest copy made and the newest proven by its bytes per source, group and
        tier, and how many copies failed their last byte-level audit."""
        replicas = list(self.catalog.replication.replicas())
        labels = LABELS + ["replica"]
        made = gauge("replica_last_replicated_timestamp_seconds", "When the newest backup was copied to the replica.",
                     labels)
        proven = gauge("replica_last_proven_timestamp_seconds", "When a copy on the replica was last downloaded and "
                       "hashed with its manifest's SHA-256 (replica_audit).", labels)
        failures = gauge("replica_audit_failures", "Copies whose last byte-level audit failed (missing or differing).",
                         ["replica"])
        if replicas:
            from backup_assets.core.replica import read_audit
            from backup_assets.core.repository import parse_artifact_name

            for replica in replicas:
                newest: dict[tuple, list[float]] = {}
                failed = 0
                for key, record in read_audit(self.catalog, replica).items():
                    parts = parse_artifact_name(key.rsplit("/", 1)[-1])
                    if parts is None:
                        continue
                    tier = key.split("/")[1] if key.count("/") >= 2 else ""
                    times = newest.setdefault((parts["source"], parts["group"], tier), [0.0, 0.0])
                    times[0] = max(times[0], _timestamp(record.get("replicated_at")) or 0.0)
                    if record.get("passed"):
                        times[1] = max(times[1], _timestamp(record.get("deep_at")) or 0.0)
                    elif "passed" in record:
                        failed += 1
                for (source, group, tier), (at, deep) in sorted(newest.items()):
                    if at:
                        made.add_metric([source, group, tier, replica], at)
                    if deep:
                        proven.add_metric([source, group, tier, replica], deep)
                failures.add_metric([replica], failed)
        yield from (made, proven, failures)


def _timestamp(text) -> float | None:
    try:
        return dt.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def registry(catalog: Catalog, report: tuple | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RepositoryCollector(catalog, report))
    return reg


def render(catalog: Catalog, *, openmetrics: bool = False) -> bytes:
    reg = registry(catalog)
    return generate_openmetrics(reg) if openmetrics else generate_latest(reg)


def default_textfile(catalog: Catalog) -> Path:
    return catalog.resolve_path(catalog.metrics.textfile) if catalog.metrics.textfile else catalog.repository_root / "metrics" / "backup_assets.prom"


def write_textfile(catalog: Catalog, path: Path | None = None, *, report: tuple | None = None) -> Path:
    """For node_exporter's textfile collector: written to a temporary file and renamed (atomic). `report` is
    health.report's (rows, forecast) when the caller has read the repository already."""
    path = Path(path) if path else default_textfile(catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry(catalog, report))
    return path


def serve(catalog: Catalog, *, port: int, addr: str = "127.0.0.1"):
    """Serve /metrics (OpenMetrics when the scraper asks for it) until the process ends.
    Returns (server, thread) so callers can shut it down."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry(catalog))
