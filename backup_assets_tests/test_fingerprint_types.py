"""The content fingerprint equals what COPY writes, for every type and NULL pattern.

A drill compares the fingerprint of the archive's data blocks (COPY text written by pg_dump) with the
one PostgreSQL computes over the restored table. If the SQL side prints a value differently from COPY,
every drill and every whole restore of such a database fails. Here both sides are computed on one real
server over generated tables: types x NULL patterns x table shapes (no columns, dropped columns).
"""

from __future__ import annotations

import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from backup_assets.core.engines import pg_content
from backup_assets.core.engines.pgarchive import CopyFingerprint
from backup_assets.core.names import TableName

TYPES_SQL = """
CREATE TYPE pr AS (a int, b text);
CREATE TYPE nest AS (p pr, q pr[], t text);
CREATE TYPE withdrop AS (a int, gone text, c text);
ALTER TYPE withdrop DROP ATTRIBUTE gone;
CREATE DOMAIN prd AS pr;
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy ''quoted''');
CREATE TYPE floatrange AS RANGE (subtype = float8);
"""

# a type and the SQL expressions of values it may hold (NULL is added to every pool)
VALUES: dict[str, list[str]] = {
    "pr": ["ROW(NULL, NULL)::pr", "ROW(1, 'x')::pr", "ROW(NULL, '')::pr", "ROW(2, E'tab\\there\\\\ \"q\" (,)')::pr"],
    "pr[]": ["ARRAY[ROW(NULL,NULL)::pr, NULL, ROW(1,'a b')::pr]", "'{}'::pr[]", "ARRAY[NULL::pr]"],
    "nest": ["ROW(ROW(NULL,NULL), ARRAY[ROW(NULL,NULL)::pr], NULL)::nest", "ROW(NULL, NULL, NULL)::nest",
             "ROW(ROW(1,'z'), NULL, E'new\\nline')::nest"],
    "withdrop": ["ROW(1, 'c')::withdrop", "ROW(NULL, NULL)::withdrop"],
    "prd": ["ROW(NULL, NULL)::prd", "ROW(3, 'd')::prd"],
    "posint": ["1", "2147483647"],
    "mood": ["'sad'", "'happy ''quoted'''"],
    "int4range": ["'[1,5)'::int4range", "'empty'::int4range", "'(,)'::int4range"],
    "floatrange": ["'[1.5,2.25]'::floatrange", "'(-Infinity,NaN]'::floatrange"],
    "int4multirange": ["'{}'::int4multirange", "'{[1,2),[5,9)}'::int4multirange"],
    "tstzrange": ["tstzrange('2026-01-01 00:00+05', NULL)", "'[\"2026-03-29 02:30+02\",infinity)'::tstzrange"],
    "money": ["12.34::money", "'-0.01'::money"],
    "tsvector": ["to_tsvector('simple', 'The quick \\ brown fox''s')", "'a:1A b\\\\c:2'::tsvector", "''::tsvector"],
    "tsquery": ["'a & !b'::tsquery"],
    "aclitem": ["'postgres=arwdDxt/postgres'::aclitem", "'=r/postgres'::aclitem"],
    "point": ["point(1.5, -2)", "point('NaN', 'Infinity')"],
    "box": ["box(point(0,0), point(1,1))"],
    "polygon": ["'((0,0),(1,1),(1,0))'::polygon"],
    "circle": ["'<(1,1),2>'::circle"],
    "line": ["'{1,-1,0}'::line"],
    "path": ["'[(0,0),(1,2)]'::path"],
    "bit varying": ["B'10110'::varbit", "B''::varbit"],
    "bit(3)": ["B'101'"],
    "bytea": ["'\\x00ff5c0a'::bytea", "''::bytea"],
    "text": ["''", "E'\\\\N'", "E'a\\tb\\nc\\rd\\\\e\\bf\\fg\\vh'", "'日本 ß'", "E'\\\\.'"],
    "\"char\"": ["'x'::\"char\"", "E'\\\\'::\"char\""],
    "char(4)": ["'ab'"],
    "float8": ["'NaN'::float8", "'-Infinity'::float8", "'-0'::float8", "0.1::float8", "1e-310::float8"],
    "float4": ["0.1::float4", "'Infinity'::float4"],
    "numeric": ["'NaN'::numeric", "1.000::numeric", "'-Infinity'::numeric"],
    "interval": ["'1 year 2 mons -3 days 04:05:06.7'::interval", "'P-1Y'::interval"],
    "timestamptz": ["'2026-03-29 02:30:00+02'::timestamptz", "'infinity'::timestamptz", "'0001-01-01 BC'::timestamptz"],
    "timetz": ["'23:59:59.999999+14'::timetz"],
    "json": ["'{\"a\": [1, \"\\\\n\"]}'::json", "'null'::json"],
    "jsonb": ["'{\"b\": null, \"a\": \"\\t\"}'::jsonb"],
    "int[]": ["ARRAY[1,NULL,3]", "'{}'::int[]", "'[0:1]={7,8}'::int[]"],
    "text[]": ["ARRAY['a b', NULL, 'NULL', '', E'q\"\\\\']"],
    "mood[]": ["ARRAY['sad','ok']::mood[]"],
    "inet": ["'::1/128'::inet", "'10.0.0.1/8'::inet"],
    "uuid": ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid"],
    "bool": ["true", "false"],
    "pg_lsn": ["'16/B374D848'::pg_lsn"],
    "oid": ["4294967295::oid"],
    "regclass": ["'pg_class'::regclass"],
}
XML_VALUES = ["'<a b=\"1\">x &amp; y</a>'::xml", "'<!-- c -->text'::xml"]
VECTOR_VALUES = ["'[1,2.5,-3]'::vector(3)", "'[0,0,0]'::vector(3)"]


def copy_fingerprint(conn, table: TableName) -> tuple[int, str]:
    """What pg_dump's data block for the table holds, fingerprinted as the archive reader does."""
    pg_content.use_output_settings(conn)
    fp = CopyFingerprint()
    with conn.cursor().copy(sql.SQL("COPY {} TO STDOUT").format(table.ident())) as copy:
        for chunk in copy:
            fp.feed(bytes(chunk))
    fp.feed(b"\\.\n")
    fp.finish()
    return fp.rows, fp.hex


def _database(cluster, *, xml: bool, vector: bool) -> str:
    name = "fp_" + secrets.token_hex(4)
    cluster.create_database(name)
    with cluster.connect(name) as conn:
        conn.execute(TYPES_SQL)
        if vector:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return name


def _pools(cluster) -> dict[str, list[str]]:
    pools = dict(VALUES)
    with cluster.connect() as conn:
        if conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]:
            pools["vector(3)"] = VECTOR_VALUES
        try:
            conn.execute("SELECT '<a/>'::xml")
            pools["xml"] = XML_VALUES
        except Exception:  # a server built without libxml (the embedded 18) has the type but cannot parse it
            pass
    return pools


@pytest.fixture(params=["pg18", "pg15"])
def typed_db(request):
    cluster = request.getfixturevalue(request.param)
    pools = _pools(cluster)
    name = _database(cluster, xml="xml" in pools, vector="vector(3)" in pools)
    yield cluster, name, pools
    with cluster.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_every_type_and_null_pattern_prints_as_copy_writes(typed_db):
    """One table with a column of every type, and rows where each column is NULL, each value of its pool."""
    cluster, db, pools = typed_db
    types = sorted(pools)
    table = TableName("public", "all types")
    with cluster.connect(db) as conn:
        columns = [sql.SQL("{} {}").format(sql.Identifier(f"c {i}"), sql.SQL(t)) for i, t in enumerate(types)]
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table.ident(), sql.SQL(", ").join(columns)))
        depth = max(len(v) for v in pools.values()) + 1
        for row in range(depth):
            values = []
            for t in types:
                pool = pools[t] + ["NULL"]
                values.append(sql.SQL(pool[row % len(pool)] if pool[row % len(pool)] == "NULL" else
                                      f"({pool[row % len(pool)]})::{t}"))
            conn.execute(sql.SQL("INSERT INTO {} VALUES ({})").format(table.ident(), sql.SQL(", ").join(values)))
        assert pg_content.fingerprint(conn, table) == copy_fingerprint(conn, table)
        # the reported case: a composite whose fields are all NULL beside one that is NULL itself
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, p pr)")
        conn.execute("INSERT INTO t VALUES (1, ROW(NULL, NULL)), (2, ROW(1,'x')), (3, NULL)")
        assert pg_content.fingerprint(conn, TableName("public", "t")) == copy_fingerprint(conn, TableName("public", "t"))
        assert pg_content.fingerprint(conn, TableName("public", "t"))[1] != _fingerprint_without_row_semantics(conn)


def _fingerprint_without_row_semantics(conn) -> str:
    """The table t with its all-NULL composite turned into a SQL NULL: must fingerprint differently."""
    conn.execute("CREATE TABLE t2 AS SELECT id, CASE WHEN p IS NULL THEN NULL ELSE p END AS p FROM t")
    return pg_content.fingerprint(conn, TableName("public", "t2"))[1]


SHAPES = st.sampled_from(["plain", "no columns", "dropped columns", "inheritance child", "partition"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), shape=SHAPES)
def test_generated_tables_fingerprint_as_copy_writes(pg18, data, shape):
    pools = _pools(pg18)
    types = data.draw(st.lists(st.sampled_from(sorted(pools)), min_size=0 if shape == "no columns" else 1,
                               max_size=0 if shape == "no columns" else 5, unique=True), label="types")
    rows = data.draw(st.lists(st.lists(st.integers(min_value=0, max_value=6), min_size=len(types),
                                       max_size=len(types)), max_size=6), label="rows")
    db = _database(pg18, xml="xml" in pools, vector="vector(3)" in pools)
    try:
        with pg18.connect(db) as conn:
            cols = [sql.SQL("{} {}").format(sql.Identifier(f"c{i}"), sql.SQL(t)) for i, t in enumerate(types)]
            if shape == "dropped columns":
                cols = [sql.SQL("gone0 int")] + cols + [sql.SQL("gone1 text")]
            body = sql.SQL(", ").join(cols)
            table = TableName("public", "g")
            if shape == "inheritance child":
                conn.execute(sql.SQL("CREATE TABLE parent ({})").format(body))
                conn.execute("CREATE TABLE g (extra pr) INHERITS (parent)")
            elif shape == "partition":
                conn.execute(sql.SQL("CREATE TABLE parent (k int, {}) PARTITION BY LIST (k)").format(body))
                conn.execute("CREATE TABLE g PARTITION OF parent FOR VALUES IN (1)")
                table = TableName("public", "parent")
            else:
                conn.execute(sql.SQL("CREATE TABLE g ({})").format(body))
            if shape == "dropped columns":
                conn.execute("ALTER TABLE g DROP COLUMN gone0, DROP COLUMN gone1")
            for picks in rows:
                names = [sql.Identifier(f"c{i}") for i in range(len(types))]
                values = []
                for t, pick in zip(types, picks):
                    pool = pools[t] + ["NULL"]
                    value = pool[pick % len(pool)]
                    values.append(sql.SQL("NULL" if value == "NULL" else f"({value})::{t}"))
                if shape == "partition":
                    names, values = [sql.Identifier("k")] + names, [sql.SQL("1")] + values
                if shape == "inheritance child":
                    names, values = names + [sql.Identifier("extra")], values + [sql.SQL("ROW(NULL, NULL)::pr")]
                if names:
                    conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        table.ident(), sql.SQL(", ").join(names), sql.SQL(", ").join(values)))
                else:
                    conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(table.ident()))
            leaf = TableName("public", "g")
            assert pg_content.fingerprint(conn, leaf) == copy_fingerprint(conn, leaf)
            if shape == "inheritance child":  # the parent's own rows: none (COPY reads ONLY the table)
                assert pg_content.fingerprint(conn, TableName("public", "parent")) == \
                    copy_fingerprint(conn, TableName("public", "parent"))
    finally:
        with pg18.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), shape=SHAPES)
def test_generated_tables_restore_exactly_with_tables(pg18, write_catalog, data, shape):
    """`--tables` of a generated table (types x NULL patterns x shapes) gives back exactly its backed-up rows
    and leaves every other table (an inheritance parent's children, the other partitions) as it is."""
    from backup_assets.cli import main
    from backup_assets.core.backup.take import run_backup

    from .conftest import pg_source
    from .zoo import content

    pools = _pools(pg18)
    types = [] if shape == "no columns" else data.draw(
        st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=4, unique=True), label="types")
    rows = data.draw(st.lists(st.lists(st.integers(0, 6), min_size=len(types), max_size=len(types)),
                              min_size=1, max_size=5), label="rows")
    db = _database(pg18, xml="xml" in pools, vector="vector(3)" in pools)
    try:
        with pg18.connect(db) as conn:
            cols = [sql.SQL("{} {}").format(sql.Identifier(f"c{i}"), sql.SQL(t)) for i, t in enumerate(types)]
            if shape == "dropped columns":
                cols = [sql.SQL("gone0 int")] + cols
            body = sql.SQL(", ").join(cols)
            named = "g"
            if shape == "inheritance child":  # restore the parent: its own rows only
                conn.execute(sql.SQL("CREATE TABLE g ({})").format(body))
                conn.execute("CREATE TABLE g_child (extra pr) INHERITS (g)")
            elif shape == "partition":
                conn.execute(sql.SQL("CREATE TABLE g (k int, {}) PARTITION BY LIST (k)").format(body))
                conn.execute("CREATE TABLE g_1 PARTITION OF g FOR VALUES IN (1)")
                conn.execute("CREATE TABLE g_2 PARTITION OF g FOR VALUES IN (2)")
            else:
                conn.execute(sql.SQL("CREATE TABLE g ({})").format(body))
            if shape == "dropped columns":
                conn.execute("ALTER TABLE g DROP COLUMN gone0")
            conn.execute("CREATE TABLE other (id int)")
            conn.execute("INSERT INTO other VALUES (1)")

            def insert(table: str, picks, k: int = 1) -> None:
                names = [sql.Identifier(f"c{i}") for i in range(len(types))]
                values = [sql.SQL("NULL" if (pools[t] + ["NULL"])[p % (len(pools[t]) + 1)] == "NULL" else
                                  f"({(pools[t] + ['NULL'])[p % (len(pools[t]) + 1)]})::{t}")
                          for t, p in zip(types, picks)]
                if shape == "partition":
                    names, values = [sql.Identifier("k")] + names, [sql.SQL(str(k))] + values
                if names:
                    conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        sql.Identifier(table), sql.SQL(", ").join(names), sql.SQL(", ").join(values)))
                else:
                    conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(table)))

            for n, picks in enumerate(rows):
                insert(named, picks, 1 + n % 2)
                if shape == "inheritance child":
                    insert("g_child", picks)
            before = content(conn)
        catalog = write_catalog({"s": pg_source(pg18, db, groups={"full": {}})})
        run_backup(catalog, "s", "full", "daily", "2026-11-20")
        with pg18.connect(db) as conn:
            conn.execute("DELETE FROM g")  # the whole hierarchy: children too, which the restore must not bring back
            conn.execute("UPDATE other SET id = 2")
            changed = content(conn)
        assert main(["--catalog", catalog.catalog_path, "restore", "--source", "s", "--group", "full",
                     "--tables", "public.g", "--confirm"]) == 0
        with pg18.connect(db) as conn:
            after = content(conn)
        for key in after:
            if key.startswith("before_restore_"):
                continue
            restored = key in ("public.g", "public.g_1", "public.g_2")
            assert after[key] == (before[key] if restored else changed[key]), key
    finally:
        with pg18.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
