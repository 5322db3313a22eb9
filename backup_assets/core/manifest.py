"""The manifest: the `.meta` JSON beside every artifact, and the contract between steps.

Backup writes it once; checks, replication, retention and restore read it. It holds the Miyabi
runbook's fields (timestamp, database, host, port, backup_type, size_bytes, size_human,
compression, format) plus what later steps need to prove a restore exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from backup_assets.core import BackupError

MANIFEST_SUFFIX = ".meta"
# 2: table keys in the exact text form (core.names), partitions, owners, the manifest's own checksum
FORMAT_VERSION = 2
CHECKSUM_FIELD = "manifest_sha256"


@dataclass
class Manifest:
    # the runbook's fields
    timestamp: str
    database: str
    host: str | None
    port: int | None
    backup_type: str  # the tier
    size_bytes: int
    size_human: str
    compression: str
    format: str  # "pg_dump-custom" or "sqlite"
    # identity
    engine: str
    source: str
    group: str
    tier: str
    partition: str
    asset_key: str
    artifact: str  # file name, in the same folder as the manifest
    sha256: str
    raw_size_bytes: int
    # what the snapshot held
    whole_database: bool = False  # else a table group: the whole schema, the data of `tables`
    tables: list[str] = field(default_factory=list)
    row_counts: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    indexes: list[dict[str, str]] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)
    snapshot_at: str | None = None
    server_version: str | None = None
    tool_version: str | None = None
    duration_s: float = 0.0
    promoted_from: str | None = None
    # partitioned table -> its leaf partitions, whose data blocks hold its rows
    partitions: dict[str, list[str]] = field(default_factory=dict)
    # table -> owning role (a restore onto a fresh server needs these roles)
    owners: dict[str, str] = field(default_factory=dict)
    # the roles backup (format roles-json): role names only, never their passwords
    roles: list[str] = field(default_factory=list)
    # SQLite: the store's file settings (journal mode, page size, auto_vacuum, user_version, application_id,
    # encoding), given back to a restored copy and compared by the drill
    file_settings: dict[str, Any] = field(default_factory=dict)
    # age encryption: {"format": "age", "recipients": [{type, fingerprint, recipient}],
    # "identity_file_env": NAME}; None when the artifact is plain zstd
    encryption: dict | None = None
    format_version: int = FORMAT_VERSION

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data[CHECKSUM_FIELD] = checksum(data)
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "Manifest":
        if not isinstance(data, dict):
            raise BackupError(f"manifest {where}: not a JSON object")
        recorded = data.get(CHECKSUM_FIELD)
        if recorded is None:
            raise BackupError(f"manifest {where}: has no {CHECKSUM_FIELD} (written before format 2, or edited); "
                              "it cannot be trusted")
        if checksum(data) != recorded:
            raise BackupError(f"manifest {where}: its content does not match its {CHECKSUM_FIELD} "
                              "(edited or damaged); this backup is not used")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise BackupError(f"manifest {where}: missing key(s) {', '.join(missing)}")
        unknown = sorted(data.keys() - names - {CHECKSUM_FIELD})
        if unknown:
            raise BackupError(f"manifest {where}: unknown key(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def checksum(data: dict[str, Any]) -> str:
    """SHA-256 over every field but the checksum itself, in a canonical JSON form."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


def manifest_path_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def read_manifest(path: Path) -> Manifest:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"manifest {path} is missing") from None
    except OSError as exc:
        raise BackupError(f"manifest {path} cannot be read: {exc}") from None
    return parse_manifest(data, where=str(path))


def parse_manifest(data: bytes, *, where: str) -> Manifest:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise BackupError(f"manifest {where} cannot be read: {exc}") from None
    return Manifest.from_json(payload, where=where)
