"""The manifest: the `.meta` JSON beside every artifact, and the contract between steps.

Backup writes it once; checks, replication, retention and restore read it. It holds the Miyabi
runbook's fields (timestamp, database, host, port, backup_type, size_bytes, size_human,
compression, format) plus what later steps need to prove a restore exact.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import BackupError

MANIFEST_SUFFIX = ".meta"
FORMAT_VERSION = 1


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
    format_version: int = FORMAT_VERSION

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "Manifest":
        if not isinstance(data, dict):
            raise BackupError(f"manifest {where}: not a JSON object")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise BackupError(f"manifest {where}: missing key(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def manifest_path_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"manifest {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"manifest {path} cannot be read: {exc}") from None
    return Manifest.from_json(data, where=str(path))
