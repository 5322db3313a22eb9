"""PostgreSQL: consistent snapshot dumps, restores and the facts that prove a restore exact.

The dump takes one snapshot: a REPEATABLE READ transaction exports it, `pg_dump --snapshot`
dumps from it, and the row counts, vector facts and index list are read in the same transaction,
so the manifest describes exactly what the archive holds.

Passwords reach child processes through their environment only (PGPASSWORD), and every error
text passes through `scrub` before it leaves this module.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import psycopg
from psycopg import sql

from backup_assets.core import BackupError
from backup_assets.core.names import TableName
from backup_assets.core.secrets import scrub
from backup_assets.core.engines.tools import find_tool
from backup_assets.core.engines.pg_databases import has_marker


CONNECT_TIMEOUT_S = 10


VECTOR_TYPES = ("vector", "halfvec", "sparsevec")


@dataclass(frozen=True)
class Endpoint:
    """Where a PostgreSQL server is, and how to log in (password from the environment)."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None

    def with_db(self, dbname: str) -> "Endpoint":
        return Endpoint(self.host, self.port, self.user, dbname, self.password, self.sslmode, self.sslrootcert)

    def describe(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user, PGDATABASE=self.dbname,
                   PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S), PGAPPNAME="backup_assets")
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        if self.sslmode:
            env["PGSSLMODE"] = self.sslmode
        if self.sslrootcert:
            env["PGSSLROOTCERT"] = self.sslrootcert
        return env

    def scrub(self, text: str) -> str:
        return scrub(text, self.password)


def connect(ep: Endpoint, *, autocommit: bool = True, what: str = "") -> psycopg.Connection:
    try:
        return psycopg.connect(
            host=ep.host, port=ep.port, user=ep.user, dbname=ep.dbname, password=ep.password,
            sslmode=ep.sslmode or "prefer", connect_timeout=CONNECT_TIMEOUT_S,
            **({"sslrootcert": ep.sslrootcert} if ep.sslrootcert else {}),
            application_name="backup_assets", autocommit=autocommit,
            # names and text always arrive as str: a SQL_ASCII database would otherwise hand out bytes
            client_encoding="UTF8",
        )
    except psycopg.Error as exc:
        detail = ep.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise BackupError(f"{what}cannot connect to PostgreSQL at {ep.describe()}: {detail}") from None


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000


def server_version(conn: psycopg.Connection) -> str:
    return conn.execute("SHOW server_version").fetchone()[0].split()[0]


_RELATIONS = """
    SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispartition
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'
      AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""


def user_tables(conn: psycopg.Connection, *, exclude_schemas: Iterable[str] = ()) -> list[TableName]:
    """Ordinary and partitioned tables that belong to the database (not to an extension), without
    partitions (they are part of their parent)."""
    skip = set(exclude_schemas)
    return sorted(TableName(s, t) for _oid, s, t, _kind, part in conn.execute(_RELATIONS).fetchall()
                  if not part and s not in skip)


def all_tables_with_data(conn: psycopg.Connection) -> list[TableName]:
    """Every table pg_dump writes data for: ordinary tables and partitions (leaves)."""
    return sorted(TableName(s, t) for _oid, s, t, kind, _part in conn.execute(_RELATIONS).fetchall() if kind == "r")


def relkind(conn: psycopg.Connection, table: TableName) -> str | None:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (table.schema, table.name),
    ).fetchone()
    return row[0] if row else None


def missing_tables(conn: psycopg.Connection, tables: Iterable[TableName]) -> list[TableName]:
    return [t for t in tables if relkind(conn, t) is None]


def leaf_partitions(conn: psycopg.Connection, table: TableName) -> list[TableName]:
    """The leaf partitions under a partitioned table (through sub-partitions), sorted."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.isleaf AND t.relid <> %s::regclass
        """,
        (_regclass(table), _regclass(table)),
    ).fetchall()
    return sorted(TableName(s, t) for s, t in rows)


def _regclass(table: TableName) -> str:
    # a regclass literal built from quoted parts (quote_ident rules): exact whatever the name holds
    return '"' + table.schema.replace('"', '""') + '"."' + table.name.replace('"', '""') + '"'


@dataclass
class TableFacts:
    row_counts: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    indexes: list[dict[str, str]] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)
    # partitioned table -> its leaf partitions (text form), whose data blocks hold its rows
    partitions: dict[str, list[str]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)


def table_facts(conn: psycopg.Connection, tables: Iterable[TableName]) -> TableFacts:
    """Exact row counts (a table's own rows, as its data block holds them; a partitioned table's
    are those of its partitions), vector columns (dimensions, non-null count), indexes and owners.
    What the catalog knows of all the tables is read in three queries, whatever their number, and the
    counts in one query per COUNTS_AT_ONCE tables; what remains per table is a partitioned table's leaves."""
    facts = TableFacts()
    tables = list(tables)
    found = {i - 1: (oid, kind, owner) for i, oid, kind, owner in conn.execute(
        """
        SELECT w.i, c.oid, c.relkind, pg_get_userbyid(c.relowner)
        FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(nsp, rel, i)
        JOIN pg_namespace n ON n.nspname = w.nsp
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
        WHERE c.relkind IN ('r', 'p')
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()}
    oids = [oid for oid, _kind, _owner in found.values()]
    vec_cols: dict[int, list] = {}
    for relid, col, typname, typmod in conn.execute(
        """
        SELECT a.attrelid, a.attname, t.typname, a.atttypmod
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = ANY(%s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped AND t.typname = ANY(%s)
        ORDER BY a.attrelid, a.attnum
        """,
        (oids, list(VECTOR_TYPES)),
    ).fetchall():
        vec_cols.setdefault(relid, []).append((col, typname, typmod))
    indexes: dict[int, list] = {}
    for relid, idx_name, method, definition in conn.execute(
        """
        SELECT x.indrelid, i.relname, am.amname, pg_get_indexdef(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam
        WHERE x.indrelid = ANY(%s::oid[])
        ORDER BY x.indrelid, i.relname
        """,
        (oids,),
    ).fetchall():
        indexes.setdefault(relid, []).append((idx_name, method, definition))
    counted = _counts(conn, [(i, tables[i], found[i][1], vec_cols.get(found[i][0], [])) for i in sorted(found)])
    for i, table in enumerate(tables):
        if i not in found:
            continue
        oid, kind, owner = found[i]
        key = str(table)
        cols = vec_cols.get(oid, [])
        rows, non_nulls = counted[i]
        facts.row_counts[key] = rows
        for (col, typname, typmod), non_null in zip(cols, non_nulls):
            facts.vectors.setdefault(key, {})[col] = {"type": typname, "dims": typmod, "non_null": non_null}
        if kind == "p":
            facts.partitions[key] = [str(t) for t in leaf_partitions(conn, table)]
        facts.owners[key] = owner
        for idx_name, method, definition in indexes.get(oid, []):
            facts.indexes.append({"table": key, "name": idx_name, "method": method, "definition": definition})
    for ext, version in conn.execute(
        "SELECT extname, extversion FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1"
    ).fetchall():
        facts.extensions[ext] = version
    return facts


COUNTS_AT_ONCE = 100  # tables counted per query: a small database has hundreds, and a round trip each was most of it


def _counts(conn: psycopg.Connection, tables: list[tuple[int, TableName, str, list]]) -> dict[int, tuple[int, list]]:
    """{i: (rows, non-null count of each vector column)} of (i, table, relkind, vector columns), in queries of
    COUNTS_AT_ONCE tables joined by UNION ALL (a plain table's own rows: ONLY; a partitioned table's: its
    partitions')."""
    out: dict[int, tuple[int, list]] = {}
    for at in range(0, len(tables), COUNTS_AT_ONCE):
        selects = []
        for i, table, kind, cols in tables[at:at + COUNTS_AT_ONCE]:
            non_null = sql.SQL(", ").join(sql.SQL("count({})").format(sql.Identifier(col)) for col, _, _ in cols)
            selects.append(sql.SQL("SELECT {}::int, count(*), ARRAY[{}]::bigint[] FROM {}{}").format(
                sql.Literal(i), non_null, sql.SQL("ONLY ") if kind == "r" else sql.SQL(""), table.ident()))
        for i, rows, non_nulls in conn.execute(sql.SQL(" UNION ALL ").join(selects)).fetchall():
            out[i] = (rows, list(non_nulls))
    return out


SAFETY_MARK = "backup_assets safety copy"


def safety_schemas(conn: psycopg.Connection) -> list[str]:
    """Schemas holding the safety copies of `--tables` restores (marked by a comment of ours)."""
    rows = conn.execute("SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace").fetchall()
    return sorted(name for name, comment in rows if has_marker(comment, SAFETY_MARK))


OUTPUT_SETTINGS = {"DateStyle": "ISO", "IntervalStyle": "postgres", "extra_float_digits": "3",
                   "TimeZone": "UTC", "bytea_output": "hex", "client_encoding": "UTF8"}


def output_options() -> str:
    return " ".join(f"-c {k}={v}" for k, v in OUTPUT_SETTINGS.items())



def missing_roles(conn: psycopg.Connection, roles: Iterable[str]) -> list[str]:
    wanted = sorted({r for r in roles if r})
    have = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (wanted,)).fetchall()}
    return [r for r in wanted if r not in have]


@dataclass
class DumpResult:
    tables: list[str]
    facts: TableFacts
    server_version: str
    tool_version: str
    snapshot_at: str


def _drain(stream: BinaryIO, sink: bytearray, limit: int = 64 * 1024) -> None:
    for line in iter(stream.readline, b""):
        if len(sink) < limit:
            sink.extend(line)


def dump(ep: Endpoint, tables: list[str] | None, write: Callable[[BinaryIO], None], *,
         pg_bin_dir: str | None = None, what: str = "", exclude_schemas: Iterable[str] = ()) -> DumpResult:
    """Dump the database (tables=None) or a table group from one snapshot into `write`.

    `write` receives pg_dump's stdout (custom format, uncompressed: compression is ours). A group
    archive holds the definitions of the whole database (schemas, types, functions, every table)
    and the data of the group's tables and their partitions only, so it restores on its own into
    an empty database; `exclude_schemas` (safety copies) are left out entirely.
    """
    conn = connect(ep, autocommit=False, what=what)
    try:
        major = server_major(conn)
        pg_dump, _ = find_tool("pg_dump", major, pg_bin_dir)
        tool_version = subprocess.run([str(pg_dump), "--version"], capture_output=True, text=True).stdout.strip()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot_id, snapshot_at, replayed_at = conn.execute(
            # on a hot standby the snapshot holds what was replayed: when WAL it received is still waiting to be
            # replayed, the data is as of the last transaction replayed, not as of now
            "SELECT pg_export_snapshot(), now(), CASE WHEN pg_is_in_recovery() AND pg_last_wal_receive_lsn() IS "
            "DISTINCT FROM pg_last_wal_replay_lsn() THEN pg_last_xact_replay_timestamp() END").fetchone()
        if replayed_at is not None:
            snapshot_at = min(snapshot_at, replayed_at)
        excluded = sorted(set(exclude_schemas))
        args = [str(pg_dump), f"--snapshot={snapshot_id}", "--format=custom", "--compress=0", "--no-password"]
        args += [f"--exclude-schema={_quoted(s)}" for s in excluded]
        if tables is None:
            group_tables = user_tables(conn, exclude_schemas=excluded)
        else:
            group_tables = [TableName.parse(t) for t in tables]
            missing = missing_tables(conn, group_tables)
            if missing:
                raise BackupError(f"{what}table(s) missing in {ep.describe()}: {', '.join(map(str, missing))}")
            members = set(group_tables)
            for table in group_tables:
                if relkind(conn, table) == "p":
                    members.update(leaf_partitions(conn, table))
            args += [f"--exclude-table-data={t.pattern()}" for t in all_tables_with_data(conn)
                     if t not in members and t.schema not in excluded]
        problem = role_cannot_dump(conn, None if tables is None else members)
        if problem:
            raise BackupError(f"{what}{problem}")
        version = server_version(conn)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**ep.child_env(), "PGOPTIONS": output_options()})
        stderr = bytearray()
        drain = threading.Thread(target=_drain, args=(proc.stderr, stderr), daemon=True)
        drain.start()
        # the counts are read from the same snapshot while pg_dump streams, not before it
        facts_box: dict = {}

        def read_facts() -> None:
            try:
                facts_box["facts"] = table_facts(conn, group_tables)
            except BaseException as exc:  # re-raised in the calling thread
                facts_box["error"] = exc

        counter = threading.Thread(target=read_facts, daemon=True)
        counter.start()
        try:
            write(proc.stdout)
        except BaseException:
            proc.kill()
            proc.wait()
            counter.join()
            raise
        finally:
            proc.stdout.close()
        rc = proc.wait()
        drain.join(timeout=10)
        counter.join()
        if rc != 0:
            detail = ep.scrub(stderr.decode(errors="replace").strip()) or f"exit code {rc}"
            if RECOVERY_CONFLICT in detail:
                raise BackupError(f"{what}{standby_conflict(ep)}")
            raise BackupError(f"{what}pg_dump of {ep.describe()} failed: {detail}")
        if "error" in facts_box:
            raise facts_box["error"]
        facts = facts_box["facts"]
        if tables is not None:
            used = {i["method"] for i in facts.indexes}
            has_vectors = bool(facts.vectors) or bool(used & {"hnsw", "ivfflat"})
            facts.extensions = {k: v for k, v in facts.extensions.items() if k == "vector" and has_vectors}
        conn.commit()
        return DumpResult([str(t) for t in group_tables], facts, version, tool_version,
                          snapshot_at.astimezone(dt.timezone.utc).isoformat())
    except psycopg.Error as exc:
        if RECOVERY_CONFLICT in str(exc):
            raise BackupError(f"{what}{standby_conflict(ep)}") from None
        raise BackupError(f"{what}PostgreSQL error on {ep.describe()}: {ep.scrub(str(exc).strip())}") from None
    finally:
        conn.close()


RECOVERY_CONFLICT = "conflict with recovery"


def standby_conflict(ep: Endpoint) -> str:
    """What to change when a hot standby cancelled a dump to go on replaying the primary's WAL."""
    return (f"the standby {ep.describe()} cancelled the dump to replay WAL (conflict with recovery): set "
            "hot_standby_feedback = on on the standby (the primary then keeps the rows a running dump still "
            "reads), or max_standby_streaming_delay = -1 (replay waits for the dump; the standby falls behind)")


def role_cannot_dump(conn: psycopg.Connection, tables: set[TableName] | None) -> str | None:
    """Why the connected role cannot dump this database (None: it can), named before pg_dump starts: a
    role that is not a superuser reads a table under row-level security only with BYPASSRLS (pg_dump turns
    row_security off and fails rather than dump a filtered table), and large objects only with SELECT on
    each (or the server's lo_compat_privileges)."""
    user, superuser, bypass = conn.execute(
        "SELECT rolname, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()
    if superuser:
        return None
    if not bypass:
        guarded = [TableName(s, t) for s, t in conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity "
            "AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')) "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2").fetchall()]
        guarded = [t for t in guarded if tables is None or t in tables]
        if guarded:
            return (f"role {user} cannot dump {', '.join(map(str, guarded[:5]))}{' ...' if len(guarded) > 5 else ''}: "
                    "row-level security applies to it and it lacks BYPASSRLS (ALTER ROLE ... BYPASSRLS, or back up "
                    "as the tables' owner without FORCE ROW LEVEL SECURITY)")
    # a group's archive holds the large objects too (pg_dump includes them unless it dumps named tables only)
    if conn.execute("SELECT current_setting('lo_compat_privileges')").fetchone()[0] != "on":
        unreadable = [r[0] for r in conn.execute(
            "SELECT m.oid FROM pg_largeobject_metadata m WHERE NOT pg_has_role(m.lomowner, 'USAGE') AND NOT EXISTS "
            "(SELECT 1 FROM aclexplode(m.lomacl) a WHERE a.privilege_type = 'SELECT' "
            "AND (a.grantee = 0 OR pg_has_role(a.grantee, 'USAGE'))) ORDER BY 1 LIMIT 6").fetchall()]
        if unreadable:
            return (f"role {user} cannot read large object(s) {', '.join(map(str, unreadable[:5]))}"
                    f"{' ...' if len(unreadable) > 5 else ''}: grant it SELECT on them (GRANT SELECT ON LARGE OBJECT "
                    "...), or set lo_compat_privileges, or back up as their owner")
    return None


def _quoted(ident: str) -> str:
    """An exact pg_dump pattern for one name (double-quoted: no character is a wildcard)."""
    return '"' + ident.replace('"', '""') + '"'


def pg_restore(ep: Endpoint, archive: Path, *, tool: Path, jobs: int = 2, use_list: Path | None = None,
               no_owner: bool = False, what: str = "") -> None:
    """Run pg_restore of a (decoded) custom-format archive into ep.dbname: all of it, or the
    entries of a --use-list file."""
    args = [str(tool), "--no-password", "--exit-on-error", f"--dbname={ep.dbname}", f"--jobs={max(1, jobs)}"]
    if use_list is not None:
        args.append(f"--use-list={use_list}")
    if no_owner:
        args += ["--no-owner", "--no-privileges"]
    args.append(str(archive))
    # into a database nobody uses yet (a drill's scratch database, a restore's temporary one): its commits need
    # not each wait for a WAL flush (one per object: thousands for a schema-rich database). Nothing is lost by
    # it: a crash before the end fails the restore, which drops that database; a restore's swap that follows is
    # an ordinary commit, and its flush makes everything written before it durable.
    env = {**ep.child_env(), "PGOPTIONS": "-c synchronous_commit=off"}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        if proc.returncode != 0:
            err.seek(0)
            lines = [line for line in err.read().decode(errors="replace").strip().splitlines()
                     if line.strip() and not line.startswith("pg_restore: warning")]
            # pg_restore names the failing command after the error: the error itself is the line that says ERROR
            errors = [line for line in lines if "ERROR:" in line or "error:" in line]
            detail = ep.scrub((errors[0] if errors else (lines[-1] if lines else f"exit code {proc.returncode}"))
                              .removeprefix("pg_restore: error: ").strip())
            raise BackupError(f"{what}pg_restore into {ep.describe()} failed: {detail}")
