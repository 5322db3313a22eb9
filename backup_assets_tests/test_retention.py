"""Retention: property tests of the selection, a real run over 200 days of backups (local and S3),
and application-table pruning gated on a drilled backup."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from backup_assets.cli import main
from backup_assets.core.verify import records as verification
from backup_assets.core.artifact import ArtifactWriter, human_size, write_json_atomic
from backup_assets.core.backup.take import run_backup
from backup_assets.core.manifest import Manifest, manifest_path_for
from backup_assets.core.retention.app_tables import prune_tables
from backup_assets.core.replica import replicate, storage_for
from backup_assets.core.repository import LocalRepository, StoredBackup
from backup_assets.core.retention.prune import prune
from backup_assets.core.retention.rules import Entry, select
from backup_assets.core.verify.checks import find_backup
from backup_assets.core.verify.restore_drill import restore_drill

from .conftest import pg_source, reseal, s3_replication

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)
DAYS = {"daily": 7, "weekly": 28, "monthly": 180}

entries = st.lists(
    st.builds(
        lambda i, src, grp, tier, age_h, verified: Entry(
            f"e{i}", src, grp, tier, (NOW - dt.timedelta(hours=age_h)).date().isoformat(),
            NOW - dt.timedelta(hours=age_h), verified),
        st.integers(0, 10**9), st.sampled_from(["a", "b"]), st.sampled_from(["full", "core"]),
        st.sampled_from(list(DAYS)), st.integers(0, 400 * 24), st.booleans(),
    ),
    max_size=80, unique_by=lambda e: e.id,
)


@settings(max_examples=300, deadline=None)
@given(entries)
def test_selection_properties(history):
    sel = select(history, DAYS, NOW)
    deleted = {e.id for e in sel.delete}
    kept = {e.id for e in sel.keep}
    assert deleted | kept == {e.id for e in history} and not deleted & kept
    keys = {e.key for e in history}
    for key in keys:
        mine = sorted((e for e in history if e.key == key), key=lambda e: (e.created, e.partition, e.id))
        verified = [e for e in mine if e.verified]
        if verified:
            assert verified[-1].id in kept, "the newest verified backup of every key survives"
        assert mine[-1].id in kept, "the newest backup of every key survives"
    for e in history:
        if e.created >= NOW - dt.timedelta(days=DAYS[e.tier]):
            assert e.id in kept, "nothing inside its retention window is deleted"
        if e.id in deleted:
            assert e.created < NOW - dt.timedelta(days=DAYS[e.tier])


def _fake_backup(repo: LocalRepository, source, group, tier, created: dt.datetime, status: bool | None) -> StoredBackup:
    """A real (small) artifact with its manifest and check record, as if taken at `created`."""
    partition = created.date().isoformat()
    engine = "sqlite"
    final = repo.folder(engine, tier) / f"{source}-{group}-{partition}-{created.strftime('%Y%m%dT%H%M%S%fZ')}.db.zst"
    with ArtifactWriter(final) as w:
        w.write(f"{source} {group} {tier} {partition}".encode() * 100)
        written = w.commit()
    m = Manifest(timestamp=created.isoformat(), database="x.db", host=None, port=None, backup_type=tier,
                 size_bytes=written.size_bytes, size_human=human_size(written.size_bytes), compression="zstd -3",
                 format="sqlite", engine=engine, source=source, group=group, tier=tier, partition=partition,
                 asset_key=f"{source}/{group}/{tier}", artifact=final.name, sha256=written.sha256,
                 raw_size_bytes=written.raw_size_bytes, snapshot_at=created.isoformat())
    write_json_atomic(manifest_path_for(final), m.to_json())
    backup = StoredBackup(m, manifest_path_for(final))
    if status is not None:
        verification.record(backup, "artifact_intact", status, "test")
    return backup


def test_real_prune_over_200_days_local_and_s3(write_catalog, tmp_path, moto_s3, bucket):
    catalog = write_catalog({"app": {"engine": "sqlite", "path": str(tmp_path / "app.db")}},
                            replication=s3_replication(moto_s3, bucket, retention_days={"daily": 30}))
    repo = LocalRepository(catalog.repository_root)
    storage = storage_for(catalog, moto_s3.client())
    start = NOW - dt.timedelta(days=200)
    made = []
    for day in range(201):
        created = (start + dt.timedelta(days=day)).replace(hour=3)
        # the last 40 days of dailies will fail their drills: the newest good one is 40 days old
        made.append(_fake_backup(repo, "app", "full", "daily", created, status=True if day <= 160 else None))
        if created.weekday() == 0:
            made.append(_fake_backup(repo, "app", "full", "weekly", created, status=True))
        if created.day == 1:
            made.append(_fake_backup(repo, "app", "full", "monthly", created, status=True))
    for b in made[-60:]:
        replicate(catalog, b, storage)  # intact when they went off-site...
    for b in made:
        if b.manifest.tier == "daily" and b.manifest.partition > (start + dt.timedelta(days=160)).date().isoformat():
            verification.record(b, "restore_drill", False, "counts differ")  # ...their drills failed later
    total_files = sum(1 for p in catalog.repository_root.rglob("*") if p.is_file())

    dry = prune(catalog, dry_run=True, storage=storage, now=NOW)
    assert sum(1 for p in catalog.repository_root.rglob("*") if p.is_file()) == total_files
    assert dry["local"]["backups"] > 150 and dry["local"]["bytes_freed"] > 0

    code = main(["--catalog", catalog.catalog_path, "retention", "prune", "--dry-run"])
    assert code == 0

    report = prune(catalog, dry_run=False, storage=storage, now=NOW)
    assert report["local"] == {**dry["local"]}
    left = {(b.manifest.tier, b.manifest.partition): b for b in repo.backups()}
    dailies = sorted(p for t, p in left if t == "daily")
    newest_good = (start + dt.timedelta(days=160)).date().isoformat()
    assert newest_good in dailies, "the newest verified daily survives although it is 40 days old"
    assert all(p >= (NOW - dt.timedelta(days=7)).date().isoformat() or p == newest_good for p in dailies)
    weeklies = sorted(p for t, p in left if t == "weekly")
    assert weeklies and min(weeklies) >= (NOW - dt.timedelta(days=28)).date().isoformat()
    monthlies = sorted(p for t, p in left if t == "monthly")
    assert min(monthlies) >= (NOW - dt.timedelta(days=180)).date().isoformat()
    # artifact, manifest and check record went together: no orphans of any kind
    names = [p.name for p in catalog.repository_root.rglob("*") if p.is_file()]
    artifacts = {n for n in names if n.endswith(".zst")}
    assert {n[: -len(".meta")] for n in names if n.endswith(".meta")} == artifacts
    assert {n[: -len(".checks.json")] for n in names if n.endswith(".checks.json")} <= artifacts

    # S3 keeps its own (longer) daily retention
    s3_keys = [k for k, _ in storage.list("sqlite/daily/") if k.endswith(".zst")]
    s3_partitions = sorted(k.rsplit("/", 1)[-1].split("-", 2)[2][:10] for k in s3_keys)
    assert min(s3_partitions) >= (NOW - dt.timedelta(days=30)).date().isoformat() or min(s3_partitions) == newest_good
    assert len(s3_partitions) > len([p for p in dailies])
    assert report["s3"]["backups"] > 0


def test_table_pruning_only_removes_rows_covered_by_a_drilled_backup(pg18, myloware_db, write_catalog):
    source = pg_source(pg18, myloware_db, prune=[
        {"table": "artifacts", "timestamp_column": "created_at", "days": 90, "verified_by_group": "core"},
        {"table": "webhook_events", "timestamp_column": "received_at", "days": 14, "verified_by_group": "core"},
    ])
    catalog = write_catalog({"myloware": source})

    def counts():
        with pg18.connect(myloware_db) as conn:
            return {
                "artifacts_old": conn.execute("SELECT count(*) FROM artifacts WHERE created_at < now() - interval '90 days'").fetchone()[0],
                "artifacts": conn.execute("SELECT count(*) FROM artifacts").fetchone()[0],
                "webhooks_old": conn.execute("SELECT count(*) FROM webhook_events WHERE received_at < now() - interval '14 days'").fetchone()[0],
                "webhooks": conn.execute("SELECT count(*) FROM webhook_events").fetchone()[0],
            }

    start = counts()
    assert start["artifacts_old"] > 100 and start["webhooks_old"] > 100

    # no verified backup yet: nothing is pruned
    report = prune_tables(catalog, "myloware", dry_run=False)
    assert all(t["deleted"] == 0 and "no backup of group 'core'" in t["skipped"] for t in report["tables"].values())
    assert counts() == start

    run_backup(catalog, "myloware", "core", "daily", "2026-11-20")
    backup = find_backup(catalog, "myloware", "core", "daily", "2026-11-20")
    outcome = restore_drill(catalog, backup)
    assert outcome.passed
    verification.record(backup, "artifact_intact", True, "ok")
    verification.record(backup, "restore_drill", True, outcome.message)

    # dry run: JSON counts, nothing changes
    assert main(["--catalog", catalog.catalog_path, "retention", "prune-tables", "--dry-run"]) == 0
    dry = prune_tables(catalog, "myloware", dry_run=True)
    assert dry["tables"]["public.artifacts"]["would_delete"] == start["artifacts_old"]
    assert counts() == start

    # the newest drilled backup is older than the rule: rows newer than its snapshot stay
    manifest = json.loads(backup.manifest_path.read_text())
    manifest["snapshot_at"] = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=120)).isoformat()
    backup.manifest_path.write_text(reseal(manifest))
    report = prune_tables(catalog, "myloware", dry_run=False)
    with pg18.connect(myloware_db) as conn:
        between = conn.execute("SELECT count(*) FROM artifacts WHERE created_at < now() - interval '90 days' "
                               "AND created_at >= now() - interval '120 days'").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM artifacts WHERE created_at < now() - interval '120 days'").fetchone()[0] == 0
    assert between > 0 and counts()["artifacts_old"] == between
    # webhooks: every one is newer than 120 days, so none could be covered by that backup
    assert counts()["webhooks"] == start["webhooks"]

    # with a fresh drilled snapshot, everything past the rules goes, in batches
    manifest["snapshot_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    backup.manifest_path.write_text(reseal(manifest))
    catalog_small_batches = write_catalog({"myloware": {**source, "prune": [
        {**r, "batch_size": 50} for r in source["prune"]]}})
    report = prune_tables(catalog_small_batches, "myloware", dry_run=False)
    after = counts()
    assert after["artifacts_old"] == 0 and after["webhooks_old"] == 0
    assert after["artifacts"] == start["artifacts"] - start["artifacts_old"]
    assert after["webhooks"] == start["webhooks"] - start["webhooks_old"]
    assert report["tables"]["public.webhook_events"]["batches"] > 2


def test_s3_retention_costs_one_listing_not_a_request_per_object(write_catalog, tmp_path, moto_s3, bucket):
    catalog = write_catalog({"app": {"engine": "sqlite", "path": str(tmp_path / "app.db")}},
                            replication=s3_replication(moto_s3, bucket, retention_days={"daily": 5}))
    repo = LocalRepository(catalog.repository_root)
    storage = storage_for(catalog, moto_s3.client())
    for day in range(30):
        b = _fake_backup(repo, "app", "full", "daily", NOW - dt.timedelta(days=30 - day), status=True)
        replicate(catalog, b, storage)
    calls = []
    storage.client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.append(model.name))
    report = prune(catalog, dry_run=False, storage=storage, now=NOW)
    assert report["s3"]["backups"] == 25
    assert set(calls) == {"ListObjectsV2", "DeleteObjects"}, calls
    left = sorted(k for k, _ in storage.list("") if k.endswith(".zst"))
    assert len(left) == 5 and all(f"{k}.meta" in dict(storage.list("")) for k in left)
