"""Asset keys of backups and replicas: `<source>/<group>_<tier>` and `<source>/<group>_<tier>_<replica>` (s3, gcs,
azure).

The lineage view labels a node with the last part of its key, so that part names the group and the
tier ("core_daily", "kb_weekly_s3"); the first part is the source (the UI's folder and asset group).
Tiers are a fixed set, so a key reads back unambiguously even when a group name holds underscores.
"""

from __future__ import annotations

import dagster as dg

from backup_assets.catalog import REPLICA_KINDS, TIER_NAMES

REPLICA_SUFFIX = "_s3"  # the S3 replica's; each replica's is `_<its name>` (REPLICA_KINDS)


def backup_key(source: str, group: str, tier: str) -> dg.AssetKey:
    return dg.AssetKey([source, f"{group}_{tier}"])


def replica_key(source: str, group: str, tier: str, replica: str = "s3") -> dg.AssetKey:
    return dg.AssetKey([source, f"{group}_{tier}_{replica}"])


def parse_key(key: dg.AssetKey) -> tuple[str, str, str, str | None] | None:
    """(source, group, tier, replica) of a backup or replica key (replica: None for a backup, else the replica's
    name); None for any other asset."""
    if len(key.path) != 2:
        return None
    source, name = key.path
    for replica in REPLICA_KINDS:
        if name.endswith("_" + replica) and (parts := _split(name[: -len(replica) - 1])) is not None:
            return source, parts[0], parts[1], replica
    parts = _split(name)
    return None if parts is None else (source, parts[0], parts[1], None)


def _split(name: str) -> tuple[str, str] | None:
    group, sep, tier = name.rpartition("_")
    return (group, tier) if sep and group and tier in TIER_NAMES else None


def tier_op_name(tier: str, sources: list[str]) -> str:
    """The step that backs up one server's sources in a tier, named so the run page reads what it does:
    `daily_backups_of_myloware_and_miyabi_pg` (past three sources: the first two and how many more)."""
    shown = sources if len(sources) <= 3 else [*sources[:2], f"{len(sources) - 2}_more"]
    return f"{tier}_backups_of_{'_and_'.join(shown)}"
