"""Content fingerprints of PostgreSQL tables: every row printed exactly as COPY prints it (the session's output
settings pinned) and hashed, per table, in parallel sessions; what the drill and restores compare with the
archive's own COPY text."""

from __future__ import annotations

import threading

import psycopg
from psycopg import sql

from backup_assets.core.names import TableName
from backup_assets.core.engines.postgres import (OUTPUT_SETTINGS, VECTOR_TYPES, Endpoint, _regclass, connect,
    leaf_partitions, relkind)


# The settings under which pg_dump writes COPY text, for our sessions and pg_dump's alike, so a
# value prints the same way on both sides (pg_dump itself sets DateStyle, IntervalStyle and
# extra_float_digits; time zone and bytea output are pinned here).
# types whose text output never holds a backslash or a control character: no COPY escaping needed
PLAIN_OUTPUT_CATEGORIES = {"N", "B", "D", "T", "V"}  # numeric, boolean, date/time, timespan, bit strings


PLAIN_OUTPUT_TYPES = set(VECTOR_TYPES) | {"uuid", "oid", "inet", "cidr", "macaddr", "macaddr8", "pg_lsn"}


def _copy_line_sql(columns: list[tuple[str, bool]]) -> sql.Composable:
    """SQL for a row's COPY text line: each column's text output, escaped as COPY TO does
    (backslash, \\b \\f \\n \\r \\t \\v) unless its type never needs it, NULL as \\N,
    joined by tabs.

    NULL is tested with num_nulls(), which asks whether the datum itself is NULL: `col IS NULL` is
    also true for a composite whose fields are all NULL (SQL's row semantics), which COPY writes as
    `(,)`, never as \\N."""
    parts = []
    for col, plain in columns:
        # concat() prints through the type's output function, as COPY does (a cast to text
        # would not: true::text is 'true' where COPY writes 't', char(n) would lose its padding)
        value = sql.SQL("concat({})").format(sql.Identifier(col))
        for raw, escaped in () if plain else (("\\", "\\\\"), ("\b", "\\b"), ("\f", "\\f"), ("\n", "\\n"),
                             ("\r", "\\r"), ("\t", "\\t"), ("\v", "\\v")):
            value = sql.SQL("replace({}, {}, {})").format(value, sql.Literal(raw), sql.Literal(escaped))
        parts.append(sql.SQL("CASE WHEN num_nulls({}) = 1 THEN {} ELSE {} END").format(
            sql.Identifier(col), sql.Literal("\\N"), value))
    if not parts:
        return sql.Literal("")
    return sql.SQL(" || chr(9) || ").join(parts)


def copy_columns(conn: psycopg.Connection, table: TableName) -> list[str]:
    """The columns pg_dump writes for a table, in its order: not dropped, not generated."""
    return [name for name, _plain in _copy_columns(conn, table)]


def _copy_columns(conn: psycopg.Connection, table: TableName) -> list[tuple[str, bool]]:
    """(column, whether its type's output needs no COPY escaping), in pg_dump's order."""
    return [(name, category in PLAIN_OUTPUT_CATEGORIES or typname in PLAIN_OUTPUT_TYPES)
            for name, category, typname in conn.execute(
                "SELECT a.attname, t.typcategory, t.typname FROM pg_attribute a "
                "JOIN pg_type t ON t.oid = a.atttypid "  # a domain has its base type's category
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' "
                "ORDER BY a.attnum", (_regclass(table),)).fetchall()]


def use_output_settings(conn: psycopg.Connection) -> None:
    for name, value in OUTPUT_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))


def fingerprint(conn: psycopg.Connection, table: TableName, *, settings_applied: bool = False,
                columns: list[tuple[str, bool]] | None = None) -> tuple[int, str]:
    """(rows, fingerprint) of a table as its archive's data block would give them (see
    pgarchive.CopyFingerprint; the archive's text is UTF-8, so the rows are hashed as UTF-8
    whatever the database's encoding); a partitioned table sums its leaf partitions. A caller that
    fingerprints many tables on one session sets the output settings once (`settings_applied`) and may
    pass a plain table's `_copy_columns`, read for all of them at once."""
    if not settings_applied:
        use_output_settings(conn)
    if columns is not None:
        parts = [(table, columns)]
    else:
        kind = relkind(conn, table)
        parts = [(leaf, _copy_columns(conn, leaf)) for leaf in (leaf_partitions(conn, table) if kind == "p" else [table])]
    rows, total = 0, 0
    for leaf, leaf_columns in parts:
        line = _copy_line_sql(leaf_columns)
        n, s = conn.execute(sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || substr(md5(convert_to({}, 'UTF8')), 1, 16))::bit(64)::bigint::numeric), 0) "
            "FROM ONLY {}").format(line, leaf.ident())).fetchone()
        rows += n
        total += int(s)
    return rows, f"{total & ((1 << 64) - 1):016x}"


# every table's kind, size and columns in one query: a small database has hundreds of tables, and a query per
# table and fact was most of a drill's fingerprinting time. The size (what the work is ordered by) is that of all
# its data with TOAST, a partitioned table's its partitions' (pg_partition_tree lists nothing for a table that is
# not partitioned: until 2026-12-07 every plain table's size read 0, and the biggest did not go first)
_TABLES_AT_ONCE = """
SELECT c.relkind,
       CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_table_size(relid)), 0) FROM pg_partition_tree(c.oid))
            ELSE pg_table_size(c.oid) END,
       (SELECT coalesce(json_agg(json_build_array(a.attname, t.typcategory, t.typname) ORDER BY a.attnum), '[]')
          FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')
FROM unnest(%s::text[]) WITH ORDINALITY AS u(n, i) JOIN pg_class c ON c.oid = u.n::regclass
ORDER BY u.i"""


def fingerprints(ep: Endpoint, tables: list[TableName], *, workers: int = 2) -> dict[str, tuple[int, str]]:
    """`fingerprint` of many tables, the biggest first, over `workers` connections at once (the
    restored database is otherwise idle: this is what keeps a drill close to a raw restore)."""
    with connect(ep) as conn:
        found = conn.execute(_TABLES_AT_ONCE, ([_regclass(t) for t in tables],)).fetchall()
    sizes = {t: size for t, (_kind, size, _cols) in zip(tables, found)}
    columns = {t: None if kind == "p" else [(name, category in PLAIN_OUTPUT_CATEGORIES or typname in PLAIN_OUTPUT_TYPES)
                                            for name, category, typname in cols]
               for t, (kind, _size, cols) in zip(tables, found)}
    queue = sorted(tables, key=lambda t: -sizes[t])
    out: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with connect(ep) as conn:
                use_output_settings(conn)
                while True:
                    with lock:
                        if not queue or errors:
                            return
                        table = queue.pop(0)
                    result = fingerprint(conn, table, settings_applied=True, columns=columns[table])
                    with lock:
                        out[str(table)] = result
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(workers, len(tables))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
