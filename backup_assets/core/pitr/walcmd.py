"""The fast path of `wal-push` and `wal-fetch`: PostgreSQL runs one of them per WAL segment, so their start-up is
the archive's throughput. Loading the catalog (YAML, pydantic) costs more than archiving a segment; here it is
loaded fully once per catalog version and what the WAL commands need (repository root, each PostgreSQL source's
encryption recipients and identity variable, whether S3 is involved) is cached in a private per-user folder,
keyed by the catalog file's bytes, its path and the values of the environment variables it references. Any
other shape of command line, an S3 step, or a cache that cannot be trusted goes through the full CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE_VERSION = 1
ENV_NAMES = re.compile(rb"\$\{([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class _Encryption:
    recipients: list[str]
    identity_file_env: str | None


@dataclass
class _Pitr:
    wal_push_s3: bool = False


@dataclass
class _Source:
    engine: str
    encryption: _Encryption | None = None
    pitr: _Pitr | None = None


@dataclass
class _Replication:
    s3: object | None = None  # True: the catalog has a replica (which ones: the full catalog's business)

    def replicas(self) -> dict:
        return {"replica": self.s3} if self.s3 else {}


@dataclass
class LightCatalog:
    """The few catalog facts the WAL commands read, with the same names as the full Catalog's."""
    catalog_path: str
    repository_root: Path
    sources: dict[str, _Source]
    replication: _Replication = field(default_factory=_Replication)

    def encryption_for(self, source: str) -> _Encryption | None:
        src = self.sources.get(source)
        return src.encryption if src is not None else None


def _cache_dir() -> Path | None:
    """A folder only this user can write; None when it cannot be made so (then nothing is cached)."""
    folder = Path(tempfile.gettempdir()) / f"backup-assets-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return folder


def _key(path: Path) -> str:
    raw = path.read_bytes()
    names = sorted({n.decode() for n in ENV_NAMES.findall(raw)})
    material = json.dumps({"v": CACHE_VERSION, "path": str(path.resolve()), "env": {n: os.environ.get(n) for n in names}})
    return hashlib.sha256(raw + b"\0" + material.encode()).hexdigest()


def _facts(catalog) -> dict:
    sources = {}
    for name, src in catalog.sources.items():
        enc = catalog.encryption_for(name)
        sources[name] = {"engine": src.engine,
                         "encryption": {"recipients": list(enc.recipients), "identity_file_env": enc.identity_file_env}
                         if enc is not None else None,
                         "wal_push_s3": bool(src.pitr is not None and src.pitr.wal_push_s3)}
    return {"repository_root": str(catalog.repository_root), "s3": bool(catalog.replication.replicas()),
            "sources": sources}


def light_catalog(path: str) -> LightCatalog:
    catalog_path = Path(path)
    facts = None
    folder = _cache_dir()
    cached = folder / f"wal-{_key(catalog_path)}.json" if folder is not None else None
    if cached is not None and cached.is_file():
        try:
            facts = json.loads(cached.read_text())
        except (OSError, ValueError):
            facts = None
    if facts is None:
        from backup_assets.catalog import load_catalog

        facts = _facts(load_catalog(catalog_path))
        if cached is not None:
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps(facts))
                os.replace(tmp, cached)
            except OSError:
                tmp.unlink(missing_ok=True)
    sources = {name: _Source(s["engine"], _Encryption(**s["encryption"]) if s["encryption"] else None,
                             _Pitr(s["wal_push_s3"])) for name, s in facts["sources"].items()}
    return LightCatalog(str(catalog_path.resolve()), Path(facts["repository_root"]), sources,
                        _Replication(True if facts["s3"] else None))


def _parse(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(catalog path, command, positional arguments) of `[--catalog P] wal-push|wal-fetch --source S ...`."""
    args = list(argv)
    catalog = os.environ.get("BACKUP_ASSETS_CATALOG")
    if args[:1] == ["--catalog"] and len(args) > 1:
        catalog, args = args[1], args[2:]
    if not catalog or not args or args[0] not in ("wal-push", "wal-fetch"):
        return None
    command, rest = args[0], args[1:]
    if len(rest) < 2 or rest[0] != "--source" or any(a.startswith("-") for a in rest[2:]):
        return None
    want = 1 if command == "wal-push" else 2
    if len(rest) != 2 + want:
        return None
    return catalog, command, rest[1:]


def main(argv: list[str] | None = None) -> int | None:
    """Runs a plain wal-push / wal-fetch; None for anything else (the full CLI takes it)."""
    parsed = _parse(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return None
    catalog_path, command, args = parsed
    from backup_assets.core import BackupError

    try:
        from backup_assets.core.pitr import wal

        catalog = light_catalog(catalog_path)
        source = args[0]
        src = catalog.sources.get(source)
        if command == "wal-push":
            if src is not None and src.pitr.wal_push_s3 and catalog.replication.s3:
                return None  # the replicas' copies need the full catalog (their client settings)
            done = wal.push(catalog, source, args[1])
            print(f"{done.name} already archived (identical)" if done.already
                  else f"archived {done.name} ({done.raw_size} bytes) as {done.stored}")
            return 0
        if catalog.replication.s3 and src is not None and wal.read_meta(wal.wal_dir(catalog, source), args[1]) is None:
            return None  # not here: a replica may have it (the full catalog's replica settings)
        wal.fetch(catalog, source, args[1], args[2])
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one scrubbed line, non-zero
        from backup_assets.core.secrets import scrub

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, (BackupError, OSError, ValueError)):
            text = f"{type(exc).__name__}: {text}"
        print(f"backup-assets: {scrub(text)}", file=sys.stderr)
        return 1
