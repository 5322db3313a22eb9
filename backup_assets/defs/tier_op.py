"""One op per database server (pool) × tier: the backups of every source and table group on it,
one after another, each followed by its checks and its S3 replica.

Users still see one asset per source × group × tier (and one replica asset each), every check per
partition, checks that can be run on their own, backfills of one partition per run. Underneath,
a server's tier is one multi-asset with subsetting: a fleet of 100 sources × 3 groups × 3 tiers on
3 servers is 9 ops instead of about 6,000 (one per asset and per check), so definitions load fast
in every process that loads them; servers run side by side, each one dump at a time (its pool);
and a backup's checks run where the backup was just written, reading it once
(`core.verify.checks.evaluate`).

A failure of one group does not stop the others; the op fails at the end, naming each asset that
failed (the run-failure sensor alerts per asset from that list).
"""


import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import dagster as dg
from dagster import AssetExecutionContext

from backup_assets.catalog import REPLICA_LABELS, Catalog
from backup_assets.core.backup.head_start import backup_check_names
from backup_assets.defs.assets import backup_key, backup_metadata, backup_spec
from backup_assets.defs.checks import failure_line, keyed_check_result
from backup_assets.defs.keys import tier_op_name
from backup_assets.defs.partitions import partitions_for
from backup_assets.defs.replication import _storage, replica_key, replica_spec
from backup_assets.defs.checks import FAILED_ASSETS


CHECK_DESCRIPTIONS = {  # the check table of docs/checks.md, in short
    "artifact_intact": "The manifest parses and its checksum holds; the artifact's size and SHA-256 match it; the zstd "
                       "stream decodes to its end (an encrypted one is decrypted when the identity is at hand; "
                       "without it only the ciphertext's size and SHA-256 are checked, and it says so).",
    "archive_readable": "The archive read by structure in one pass: every table of the manifest has its definition "
                        "and its data with exactly the snapshot's row count, pg_restore --list reads the same "
                        "stream, a content fingerprint per table is recorded (SQLite: integrity_check and every "
                        "table; roles: the JSON and its role names).",
    "size_anomaly": "Warns when the compressed size changed by more than {threshold:.0%} against the previous "
                    "partition.",
    "restore_drill": "Restores the artifact into a scratch database (SQLite: a temporary file): row counts, vectors, "
                     "extensions and indexes equal the manifest's, every table's content fingerprint matches the "
                     "archive's (one changed value fails it), every definition, privilege and large object the "
                     "archive holds is in the copy as the archive defines it; records the restore time (RTO) and "
                     "drops the scratch target.",
}


REPLICA_CHECK = {
    "s3": "The S3 object exists, its size is the manifest's and S3's own SHA-256 checksum of the stored bytes equals "
          "the manifest's (an object without one is downloaded and hashed); metadata alone never passes it. "
          "operations/replica_audit proves every replica by its bytes at least every deep_verify_days.",
    "gcs": "The GCS object exists, its size is the manifest's and the MD5 GCS computed of the stored bytes equals the "
           "local artifact's (without the local artifact: downloaded and hashed); metadata alone never passes it.",
    "azure": "The blob exists, its size is the manifest's and the MD5 Azure checked on its upload equals the local "
             "artifact's (a blob committed from blocks, or without the local artifact: downloaded and hashed); "
             "metadata alone never passes it.",
}


def backup_check_specs(catalog: Catalog, source: str, group: str, tier: str, partitions) -> list[dg.AssetCheckSpec]:
    """The checks of one backup asset; partitioned like it, so every partition shows its own results."""
    key = backup_key(source, group, tier)
    return [dg.AssetCheckSpec(name, asset=key, blocking=name != "size_anomaly", partitions_def=partitions,
                              description=CHECK_DESCRIPTIONS[name].format(threshold=catalog.size_anomaly_threshold))
            for name in backup_check_names(catalog, tier)]


def build_tier_asset(catalog: Catalog, pool: str, tier: str, targets: list[tuple[str, str]],
                     partitions) -> dg.AssetsDefinition:
    """The op of one server (pool) and tier: the backups of every source and group on it."""
    replicas = list(catalog.replication.replicas())
    specs, check_specs = [], []
    for source, group in targets:
        specs.append(backup_spec(catalog, source, group, tier))
        check_specs += backup_check_specs(catalog, source, group, tier, partitions)
        for replica in replicas:
            specs.append(replica_spec(catalog, source, group, tier, replica))
            check_specs.append(dg.AssetCheckSpec(
                "replica_intact", asset=replica_key(source, group, tier, replica), blocking=True,
                partitions_def=partitions, description=REPLICA_CHECK[replica]))
    sources = list(dict.fromkeys(s for s, _ in targets))

    @dg.multi_asset(
        name=tier_op_name(tier, sources),
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions,
        can_subset=True,
        pool=pool,
        backfill_policy=dg.BackfillPolicy.multi_run(1),
        required_resource_keys={"s3"} if "s3" in replicas else set(),
        description=f"The {tier} backups of {', '.join(sources)} (the server {pool}), one after another, each with its checks"
                    f"{' and ' + ', '.join(REPLICA_LABELS[r] for r in replicas) + ' replicas' if replicas else ''}.",
    )
    def tier_backups(context: AssetExecutionContext):
        yield from run_tier(catalog, context, tier, targets, s3=context.resources.s3 if "s3" in replicas else None)

    return tier_backups


def run_tier(catalog: Catalog, context: AssetExecutionContext, tier: str, targets: list[tuple[str, str]], *, s3):
    """A server's backups of a tier, one dump at a time; each backup's checks and replica run in a
    follow-up thread while the next backup dumps (they read the local artifact, not the server), in order,
    and every event is yielded from this thread as the follow-ups finish."""
    # the core is imported when a backup runs, not by every process that loads the definitions
    from backup_assets.core import BackupError
    from backup_assets.core.backup import head_start
    from backup_assets.core.backup.take import repository_for, run_backup
    from backup_assets.core.verify.checks import find_backup, stream_check

    selected = context.selected_asset_keys
    checks = context.selected_asset_check_keys
    partition = context.partition_key
    failed: dict[str, str] = {}
    pending: deque = deque()
    storages: dict = {}  # one client per replica for the whole step (S3: one Object Lock probe, not one a backup)

    def finished(wait: bool):
        while pending and (wait or pending[0].done()):
            events, logs, errors = pending.popleft().result()
            for level, message in logs:
                getattr(context.log, level)(message)
            failed.update(errors)
            yield from events

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="follow-up") as follow_ups:
        for source, group in targets:
            yield from finished(wait=False)
            key = backup_key(source, group, tier)
            backup = stream = early = None
            if key in selected:
                # this process's command started this very backup while Dagster started: taken over, not redone
                early = head_start.take(source, group, tier, partition)
                # the backup's checks read its stream while it is written, where they can
                stream = None if early else stream_check(catalog, source, group,
                                                         [c.name for c in checks if c.asset_key == key])
                try:
                    if early:
                        try:
                            backup = early.dumped.result()
                        finally:
                            for line in early.lines:
                                context.log.info(line)
                    else:
                        run_backup(catalog, source, group, tier, partition, log=context.log.info, stream=stream)
                        backup = find_backup(catalog, source, group, tier, partition)
                except BaseException as exc:
                    if stream is not None:
                        stream.close()
                    if not isinstance(exc, BackupError):
                        raise
                    context.log.error(f"{key.to_user_string()}: {exc}")
                    failed[key.to_user_string()] = str(exc)
                    continue  # its checks and replica have nothing to look at
                path = repository_for(catalog).folder(catalog.sources[source].engine, tier) / backup.manifest.artifact
                yield dg.MaterializeResult(asset_key=key, metadata=backup_metadata(backup.manifest, str(path)))
            pending.append(follow_ups.submit(_follow_up, catalog, source, group, tier, partition, backup,
                                             selected, checks, s3, stream, storages, early))
        yield from finished(wait=True)
    if failed:
        raise dg.Failure(description="; ".join(f"{k}: {v}" for k, v in failed.items()),
                         metadata={FAILED_ASSETS: dg.MetadataValue.json(failed)})


def _follow_up(catalog: Catalog, source: str, group: str, tier: str, partition: str, backup, selected, checks, s3,
               stream=None, storages=None, early=None):
    """A backup's checks (from the `stream` that read it while it was written, when there is one),
    then its replica and the replica's check. Returns (events, log lines, failures); logs are
    written by the op's thread."""
    try:
        return _follow_up_steps(catalog, source, group, tier, partition, backup, selected, checks, s3, stream,
                                {} if storages is None else storages, early)
    finally:
        if stream is not None:
            stream.close()


def _follow_up_steps(catalog: Catalog, source: str, group: str, tier: str, partition: str, backup, selected, checks,
                     s3, stream, storages: dict, early=None):
    from backup_assets.core import BackupError
    from backup_assets.core.backup.head_start import record
    from backup_assets.core.replica import replica_intact, replicate
    from backup_assets.core.verify.checks import Outcome, evaluate, find_backup

    key = backup_key(source, group, tier)
    events, logs, failed = [], [], {}
    say = lambda message: logs.append(("info", message))  # noqa: E731
    names = [c.name for c in checks if c.asset_key == key]
    if names:
        try:
            backup = backup or find_backup(catalog, source, group, tier, partition)
            # the head start's checks of this backup (its thread ran them), and any it did not run
            outcomes = {n: o for n, o in early.checked.result().items() if n in names} if early else {}
            if rest := [n for n in names if n not in outcomes]:
                outcomes |= evaluate(catalog, backup, rest, stream=stream)
        except BackupError as exc:
            outcomes = {n: Outcome(False, str(exc)) for n in names}
        if backup is not None:  # one write of the backup's .checks.json for all of them
            record(backup, outcomes)
        for name, outcome in outcomes.items():
            if line := failure_line(name, outcome):
                logs.append(line)
            events.append(keyed_check_result(key, name, outcome))
    def storage(replica: str):  # built on first use, inside the step that needs it (its errors are the step's)
        if replica not in storages:
            storages[replica] = _storage(catalog, s3, replica)
        return storages[replica]

    for replica in catalog.replication.replicas():
        rkey = replica_key(source, group, tier, replica)
        if rkey in selected:
            try:
                backup = backup or find_backup(catalog, source, group, tier, partition)
                result = replicate(catalog, backup, storage(replica), say=say)
            except BackupError as exc:
                logs.append(("error", f"{rkey.to_user_string()}: {exc}"))
                failed[rkey.to_user_string()] = str(exc)
            else:
                events.append(dg.MaterializeResult(asset_key=rkey, metadata={
                    "uri": dg.MetadataValue.text(result.uri),
                    "mode": dg.MetadataValue.text(result.mode),
                    "dagster/size_bytes": dg.MetadataValue.int(result.size_bytes),
                    "duration_s": dg.MetadataValue.float(result.duration_s),
                    "sha256": dg.MetadataValue.text(backup.manifest.sha256),
                }))
        if any(c.asset_key == rkey for c in checks):
            try:
                backup = backup or find_backup(catalog, source, group, tier, partition)
                outcome = replica_intact(catalog, backup, storage(replica))
            except BackupError as exc:
                outcome = Outcome(False, str(exc))
            events.append(keyed_check_result(rkey, "replica_intact", outcome))
    return events, logs, failed


def tier_ops(catalog: Catalog) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(pool, tier) -> the (source, group) pairs its op backs up, in catalog order."""
    ops: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for source, group, tier in catalog.backup_targets():
        ops.setdefault((catalog.sources[source].pool_name(), tier), []).append((source, group))
    return ops


def build_tier_assets(catalog: Catalog) -> list[dg.AssetsDefinition]:
    partitions = lru_cache(maxsize=None)(lambda tier: partitions_for(catalog, tier))
    with warnings.catch_warnings():
        # dagster 1.13 calls BackfillPolicy beta and partitioned check specs a preview; one partition
        # per run and checks per partition are what we rely on (not a warning line per asset)
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [build_tier_asset(catalog, pool, tier, targets, partitions(tier))
                for (pool, tier), targets in tier_ops(catalog).items()]
