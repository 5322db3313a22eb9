"""Finding and repairing what interrupted operations left, and the safety copies restores keep.

`backup-assets doctor` (and, for their own part, every backup, drill and restore) removes the
leftovers of dead operations: partial files, scratch folders (decoded archives are plaintext
copies of a database), scratch databases, the swap state of a restore (a database left refusing
connections), and artifacts without a manifest. It never touches what a live operation owns, and
says what it did.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.backup.take import repository_for
from backup_assets.core.engines import postgres
from backup_assets.core.engines import pg_databases

ORPHAN_AGE_S = 600  # an artifact renamed into place gets its manifest within moments
SAFETY_DB = re.compile(r".+_before_restore_(\d{14})$")
SAFETY_SCHEMA = re.compile(r"before_restore_(\d{14})$")
SAFETY_FILE = re.compile(r".+\.before-restore-(\d{14})$")


def servers(catalog: Catalog, problems: list[str] | None = None) -> dict[str, postgres.Endpoint]:
    """Every PostgreSQL server the catalog names (sources and drill servers), by host:port; a
    source whose credentials are not at hand is said in `problems` and skipped."""
    from backup_assets.catalog import CatalogError
    from backup_assets.core.backup.take import endpoint_for, primary_endpoint_for
    from backup_assets.core.verify.restore_drill import drill_endpoint

    found: dict[str, postgres.Endpoint] = {}
    for name, src in catalog.sources.items():
        if src.engine != "postgres":
            continue
        try:
            endpoints = (endpoint_for(catalog, name), primary_endpoint_for(catalog, name), drill_endpoint(catalog, name))
        except CatalogError as exc:
            if problems is not None:
                problems.append(f"source {name}: not checked: {exc}")
            continue
        for ep in endpoints:
            found.setdefault(f"{ep.host}:{ep.port}", ep.with_db("postgres"))
    return found


def doctor(catalog: Catalog, *, say=lambda _m: None) -> list[str]:
    from backup_assets.core.restore.postgres import repair_interrupted_swaps
    from backup_assets.core.verify.restore_drill import DRILL_MARK

    done: list[str] = []
    repo = repository_for(catalog)
    for path in repo.sweep():
        done.append(f"removed {path} (left by an operation that is no longer running)")
    for path in repo.orphans(min_age_s=ORPHAN_AGE_S):
        path.unlink(missing_ok=True)
        done.append(f"removed {path}: an artifact without a manifest is never a backup")
    for name in catalog.replication.replicas():  # the replicas' too: a kill between an upload's two objects
        from backup_assets.catalog import REPLICA_LABELS
        from backup_assets.core.replica import replica_repository

        try:
            replica = replica_repository(catalog, replica=name)
            for key in replica.orphan_keys(min_age_s=ORPHAN_AGE_S):
                held = replica.storage.delete([key])
                if held:  # under Object Lock: it goes when its lock ends (a later doctor or retention run)
                    done.append(f"kept {replica.storage.uri(key)}: an artifact without a manifest (never a backup), "
                                f"locked until {held[0][1]:%Y-%m-%d %H:%M} UTC")
                else:
                    done.append(f"removed {replica.storage.uri(key)}: an artifact without a manifest is never a backup")
        except BackupError as exc:
            done.append(f"{REPLICA_LABELS[name]} replica not checked: {exc}")
    for _path, error in repo.unreadable():  # evidence of damage or tampering: reported, kept
        done.append(f"not counted as a backup (left for you to look at): {error}")
    for where, ep in servers(catalog, done).items():
        try:
            with postgres.connect(ep, what="doctor: ") as admin:
                done += [f"{where}: {line}" for line in repair_interrupted_swaps(admin)]
                for name in pg_databases.drop_marked_databases(admin, like="drill\\_%", mark=DRILL_MARK):
                    done.append(f"{where}: dropped {name}, the scratch database of an interrupted drill")
        except BackupError as exc:
            done.append(f"{where}: not checked: {exc}")
    return done


@dataclass
class SafetyCopy:
    kind: str  # database, schema, file
    where: str
    name: str
    created: dt.datetime

    @property
    def age_days(self) -> float:
        return round((dt.datetime.now(dt.timezone.utc) - self.created).total_seconds() / 86400, 1)


def _stamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=dt.timezone.utc)


def safety_copies(catalog: Catalog) -> list[SafetyCopy]:
    """The copies restores kept of what they replaced: databases, schemas and SQLite files."""
    found: list[SafetyCopy] = []
    for where, ep in servers(catalog).items():
        with postgres.connect(ep, what="safety copies: ") as admin:
            for (name,) in admin.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall():
                if (m := SAFETY_DB.fullmatch(name)):
                    found.append(SafetyCopy("database", where, name, _stamp(m.group(1))))
    for source, src in catalog.sources.items():
        if src.engine == "postgres":
            from backup_assets.core.backup.take import primary_endpoint_for

            ep = primary_endpoint_for(catalog, source)  # restores (and their safety copies) go there
            try:
                with postgres.connect(ep, what="safety copies: ") as conn:
                    for schema in postgres.safety_schemas(conn):
                        if (m := SAFETY_SCHEMA.fullmatch(schema)):
                            found.append(SafetyCopy("schema", f"{ep.host}:{ep.port}/{ep.dbname}", schema,
                                                    _stamp(m.group(1))))
            except BackupError:
                continue
        else:
            path = catalog.resolve_path(src.path)
            if path.parent.is_dir():
                for f in sorted(path.parent.glob(path.name + ".before-restore-*")):
                    if (m := SAFETY_FILE.fullmatch(f.name)):
                        found.append(SafetyCopy("file", str(path.parent), f.name, _stamp(m.group(1))))
    return found


def drop_safety_copy(catalog: Catalog, copy: SafetyCopy) -> None:
    if copy.kind == "file":
        Path(copy.where, copy.name).unlink(missing_ok=True)
        return
    host, _, rest = copy.where.partition(":")
    port, _, dbname = rest.partition("/")
    for ep in servers(catalog).values():
        if ep.host == host and str(ep.port) == port:
            with postgres.connect(ep.with_db(dbname or "postgres"), what="dropping a safety copy: ") as conn:
                if copy.kind == "database":
                    pg_databases.drop_database(conn, copy.name)
                else:
                    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(copy.name)))
            return
    raise BackupError(f"server {host}:{port} of {copy.name} is not in the catalog")

