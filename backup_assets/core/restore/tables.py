"""Restoring selected tables of a PostgreSQL backup into a live database: the current rows kept in a safety
schema, the restored ones loaded and proven, other tables untouched."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import replace

import psycopg
import zstandard
from psycopg import sql

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto
from backup_assets.core.verify import archive_scan
from backup_assets.core.artifact import open_decompressed
from backup_assets.core.engines import postgres
from backup_assets.core.engines import pg_content
from backup_assets.core.engines import pg_databases
from backup_assets.core.engines.pgarchive import ArchiveFormatError, CopyFingerprint, TocEntry, combine, read_archive
from backup_assets.core.names import TableName
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.restore_drill import compare_content, compare_with_manifest
from backup_assets.core.restore.choose import RestoreResult


def safety_table_name(table: TableName) -> str:
    """The name of a table's copy in the safety schema: its text form, shortened with a hash
    when it would pass PostgreSQL's 63 bytes."""
    text = str(table)
    if len(text.encode()) <= 63:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return text.encode()[:50].decode(errors="ignore") + "_" + digest


def _free_schema_name(conn) -> str:
    """`before_restore_<UTC time>`, a second later when that name is taken."""
    at = dt.datetime.now(dt.timezone.utc)
    while True:
        name = f"before_restore_{at.strftime('%Y%m%d%H%M%S')}"
        if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone():
            return name
        at += dt.timedelta(seconds=1)


def _owned_sequences(conn, table: TableName) -> list[tuple[TableName, str]]:
    """Sequences owned by a column of the table (serial and identity columns), with the column."""
    return [(TableName(s, n), col) for s, n, col in conn.execute(
        """
        SELECT sn.nspname, s.relname, a.attname
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_namespace sn ON sn.oid = s.relnamespace
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
          AND d.refobjid = %s::regclass AND d.deptype IN ('a', 'i')
        """, (postgres._regclass(table),)).fetchall()]


def _not_valid_constraints(conn, tables: list[TableName]) -> list[tuple[TableName, str, str]]:
    """(table, name, definition) of the CHECK and NOT NULL constraints defined on the tables themselves
    (not inherited: those go with their parent's) that are NOT VALID: old rows may violate them."""
    found = []
    for table in tables:
        for name, definition in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
                "AND contype IN ('c', 'n') AND NOT convalidated AND coninhcount = 0 ORDER BY conname",
                (postgres._regclass(table),)).fetchall():
            found.append((table, name, definition))
    return found


class _TableLoader:
    """Streams the archive's data blocks of the chosen tables into COPY, in the caller's
    transaction, fingerprinting exactly what it loads."""

    def __init__(self, conn, members: dict[tuple[str, str], TableName]):
        self.conn = conn
        self.members = members
        self.loaded: dict[TableName, CopyFingerprint] = {}
        self._copy_cm = None
        self._copy = None
        self._fp: CopyFingerprint | None = None

    def on_data(self, entry: TocEntry):
        table = self.members.get((entry.namespace or "", entry.tag))
        if table is None:
            return None
        columns = pg_content.copy_columns(self.conn, table)
        # a table without columns has rows all the same (empty lines); COPY takes no empty column list
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table.ident(), sql.SQL(", ").join(sql.Identifier(c) for c in columns)) if columns else \
            sql.SQL("COPY {} FROM STDIN").format(table.ident())
        self._copy_cm = self.conn.cursor().copy(statement)
        self._copy = self._copy_cm.__enter__()
        self._fp = self.loaded[table] = CopyFingerprint()
        return self._feed

    def _feed(self, data: bytes) -> None:
        rows = self._fp.feed(data)
        if rows:
            self._copy.write(rows)

    def on_end(self, entry: TocEntry) -> None:
        if self._copy_cm is not None:
            self._fp.finish()
            cm, self._copy_cm, self._copy = self._copy_cm, None, None
            cm.__exit__(None, None, None)

    def abort(self) -> None:
        if self._copy_cm is not None:
            cm, self._copy_cm, self._copy = self._copy_cm, None, None
            try:
                cm.__exit__(BackupError, BackupError("aborted"), None)
            except Exception:
                pass


def _restore_tables(catalog: Catalog, backup: StoredBackup, ep: postgres.Endpoint, tables: list[TableName], *,
                    safety_copy: bool, say) -> RestoreResult:
    """Replace the rows of exactly `tables` (a partitioned table with its partitions) in one
    transaction, and commit only when every table's row count equals the manifest's and its
    content fingerprint equals the archive's; otherwise roll back: nothing changes."""
    m = backup.manifest
    members: dict[tuple[str, str], TableName] = {}
    for table in tables:
        # a partitioned table's rows are in its leaf partitions' data blocks (it has none itself)
        parts = m.partitions.get(str(table))
        for member in [TableName.parse(p) for p in parts] if parts is not None else [table]:
            members[(member.schema, member.name)] = member
    conn = postgres.connect(ep, autocommit=False, what=f"restore of {m.source}: ")
    loader = _TableLoader(conn, members)
    try:
        missing = postgres.missing_tables(conn, members.values())
        if missing:
            raise BackupError(f"table(s) {', '.join(map(str, missing))} do not exist in {ep.dbname}: restore the "
                              "whole backup into another database (--target-db) instead; nothing was changed")
        pg_content.use_output_settings(conn)  # the archive's text is UTF-8, printed with these settings
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("SET LOCAL lock_timeout = '30s'")
        safety_schema = _free_schema_name(conn) if safety_copy else None
        if safety_schema:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(safety_schema)))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(safety_schema),
                sql.Literal(pg_databases.marker(postgres.SAFETY_MARK, tables=[str(t) for t in tables], artifact=m.artifact))))
        for table in tables:
            # an inheritance parent's rows are its own (ONLY): its children keep theirs, with their own columns;
            # a partitioned table has no rows of its own and is replaced with all its partitions
            only = sql.SQL("") if postgres.relkind(conn, table) == "p" else sql.SQL("ONLY ")
            conn.execute(sql.SQL("LOCK TABLE {}{} IN ACCESS EXCLUSIVE MODE").format(only, table.ident()))
            if safety_schema:
                conn.execute(sql.SQL("CREATE TABLE {} AS SELECT * FROM {}{}").format(
                    sql.Identifier(safety_schema, safety_table_name(table)), only, table.ident()))
            conn.execute(sql.SQL("DELETE FROM {}{}").format(only, table.ident()))
        # rows kept under a NOT VALID constraint may violate it: load without it, then add it back NOT VALID
        not_valid = _not_valid_constraints(conn, list(dict.fromkeys([*tables, *members.values()])))
        for table, name, _definition in not_valid:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table.ident(), sql.Identifier(name)))
        say(f"loading {', '.join(map(str, tables))} in one transaction")
        with open_decompressed(backup.artifact_path, m.raw_size_bytes,
                               crypto.identities_for(catalog, m, artifact=str(backup.artifact_path))) as reader:
            read_archive(reader, loader.on_data, loader.on_end)
        not_loaded = [str(t) for t in members.values() if t not in loader.loaded]
        if not_loaded:
            raise BackupError(f"the archive has no data block for {', '.join(not_loaded)}; nothing was changed")
        for table, name, definition in not_valid:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table.ident(), sql.Identifier(name), sql.SQL(definition)))
        for table in tables:
            for sequence, column in _owned_sequences(conn, table):
                # never move a sequence backwards: ids handed out since the backup stay unused
                last, called = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sequence.ident())).fetchone()
                top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), table.ident())).fetchone()[0]
                value = max(last if called else last - 1, top or 0)
                if value >= 1:
                    conn.execute("SELECT setval(%s::regclass, %s, true)", (postgres._regclass(sequence), value))
        facts = postgres.table_facts(conn, tables)
        restored = {str(t): pg_content.fingerprint(conn, t) for t in tables}
        expected = {str(t): m.row_counts[str(t)] for t in tables}
        archive_content = {}
        for table in tables:
            parts = [TableName.parse(p) for p in m.partitions.get(str(table), [])] or [table]
            fps = [loader.loaded[p] for p in parts]
            archive_content[str(table)] = archive_scan.TableContent(sum(f.rows for f in fps), combine([f.hex for f in fps]))
        sub = replace(m, row_counts=expected, vectors={k: v for k, v in m.vectors.items() if k in expected}, indexes=[])
        problems = compare_with_manifest(sub, facts.row_counts, facts.vectors, [])
        problems += compare_content(archive_content, restored)
        if problems:
            raise BackupError(f"the loaded rows differ from the backup, rolled back, nothing changed: "
                              f"{'; '.join(problems[:5])}")
        conn.commit()
    except BaseException as exc:
        loader.abort()
        try:
            conn.rollback()
        except Exception:
            pass
        if isinstance(exc, psycopg.Error):
            detail = ep.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise BackupError(f"loading {', '.join(map(str, tables))} failed, rolled back, nothing changed: {detail}") from None
        if isinstance(exc, (zstandard.ZstdError, ArchiveFormatError)):
            raise BackupError(f"{backup.artifact_path}: {exc}; rolled back, nothing changed") from None
        raise
    finally:
        conn.close()
    return RestoreResult(ep.dbname, facts.row_counts, expected, [],
                         f"{ep.dbname}.{safety_schema}" if safety_schema else None, 0.0, m.artifact,
                         extra={"fingerprints": {k: v[1] for k, v in restored.items()}})
