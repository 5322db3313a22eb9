"""Generated identifiers round-trip: backup -> checks -> drill -> full restore -> --tables restore.

Names with spaces, dots, quotes, backslashes, unicode, mixed case, reserved words and 63-byte
lengths, for the schema, the table and a column, all at once.
"""

from __future__ import annotations

import secrets

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from backup_assets.catalog import load_catalog
from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.names import TableName
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.readable import archive_readable
from backup_assets.core.verify.restore_drill import restore_drill

from .conftest import pg_source
from .zoo import content

RESERVED = ["select", "from", "table", "user", "order", "group", "Default", "public", "pg"]
ALPHABET = st.sampled_from(list("aZ _.\"'\\$-;,()é日ß") + ["\u00a0", "x"])


def identifier():
    plain = st.text(ALPHABET, min_size=1, max_size=20).filter(lambda s: s.strip() == s and not s.startswith("pg_"))
    longest = st.integers(min_value=1, max_value=3).map(lambda n: ("ñ" * 31 + "x")[: 63 - n + 1][:63])
    return st.one_of(plain, st.sampled_from(RESERVED), longest).filter(lambda s: len(s.encode()) <= 63)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=identifier(), table=identifier(), column=identifier())
def test_any_identifier_round_trips(pg18, tmp_path_factory, schema, table, column):
    if schema.lower().startswith("pg_") or schema in ("information_schema",):
        return
    db = "ident_" + secrets.token_hex(4)
    name = TableName(schema, table)
    pg18.create_database(db)
    try:
        with pg18.connect(db) as conn:
            if schema != "public":
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, {} text)").format(
                name.ident(), sql.Identifier(column)))
            conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} || g FROM generate_series(1, 9) g").format(
                name.ident(), sql.Identifier(column), sql.Literal(table + "\t\\\n")))
            before = content(conn)
        root = tmp_path_factory.mktemp("ident")
        import yaml

        path = root / "catalog.yaml"
        path.write_text(yaml.safe_dump({"repository": {"root": str(root / "backups")}, "start_date": "2026-10-01",
                                        "sources": {"s": pg_source(pg18, db, groups={
                                            "full": {}, "one": {"tables": [{"schema": schema, "table": table}]}})}}))
        catalog = load_catalog(path)
        repo = LocalRepository(catalog.repository_root)
        for group in ("full", "one"):
            run_backup(catalog, "s", group, "daily", "2026-11-20")
            backup = repo.latest("s", group, "daily")
            assert backup.manifest.row_counts[str(name)] == 9
            for check in (artifact_intact(backup), archive_readable(catalog, backup), restore_drill(catalog, backup)):
                assert check.passed, check.message
        # full restore into another database, compared by content
        assert main(["--catalog", str(path), "restore", "--source", "s", "--group", "full", "--target-db",
                     f"{db}_r", "--confirm"]) == 0
        with pg18.connect(f"{db}_r") as conn:
            assert content(conn) == before
        # --tables restore in place, named in the text form
        with pg18.connect(db) as conn:
            conn.execute(sql.SQL("DELETE FROM {}").format(name.ident()))
        assert main(["--catalog", str(path), "restore", "--source", "s", "--group", "one", "--tables", str(name),
                     "--no-safety-copy", "--confirm"]) == 0
        with pg18.connect(db) as conn:
            assert content(conn) == before
    finally:
        with pg18.connect() as conn:
            for d in (db, f"{db}_r"):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(d)))


def _partitioned_and_inherited(conn) -> None:
    """public.p (15 rows) partitioned into "p 1" (10) and "p 2" (5); public.parent (1 row of its own) and its child (2)."""
    conn.execute('CREATE TABLE public.p (k int, v text) PARTITION BY RANGE (k); '
                 'CREATE TABLE public."p 1" PARTITION OF public.p FOR VALUES FROM (0) TO (10); '
                 'CREATE TABLE public."p 2" PARTITION OF public.p FOR VALUES FROM (10) TO (20); '
                 'INSERT INTO public.p SELECT g, g::text FROM generate_series(0, 14) g')
    conn.execute('CREATE TABLE public.parent (id int); CREATE TABLE public.child () INHERITS (public.parent); '
                 'INSERT INTO public.parent VALUES (1); INSERT INTO public.child VALUES (2), (3)')


def test_table_facts_of_many_awkward_tables_at_once(pg18):
    """What the dump, the drill and the restore read of every table (kind, owner, vector columns, indexes, exact
    counts) comes from one look at the catalog for all the tables: each table still gets its own facts, whatever
    its name, a table named like another in a different schema is not confused with it, and what is not a table
    (a view, a name that does not exist) is left out."""
    from backup_assets.core.engines import postgres

    db = "facts_" + secrets.token_hex(4)
    pg18.create_database(db)
    with pg18.connect(db) as conn:
        conn.execute('CREATE EXTENSION IF NOT EXISTS vector')
        owner = sql.Identifier(f"Facts Owner {db}")
        conn.execute(sql.SQL("CREATE ROLE {}").format(owner))
        conn.execute('CREATE SCHEMA "a.b"; CREATE SCHEMA "Q""s"')
        conn.execute('CREATE TABLE "a.b"."t x" (id int PRIMARY KEY, "E m" vector(3)); '
                     'CREATE INDEX "by e" ON "a.b"."t x" ("E m")')
        conn.execute('INSERT INTO "a.b"."t x" SELECT g, CASE WHEN g % 2 = 0 THEN \'[1,2,3]\'::vector END '
                     'FROM generate_series(1, 5) g')
        conn.execute('CREATE TABLE "Q""s"."t x" (v text); INSERT INTO "Q""s"."t x" VALUES (\'a\'), (\'b\')')
        conn.execute(sql.SQL('ALTER TABLE "Q""s"."t x" OWNER TO {}').format(owner))
        _partitioned_and_inherited(conn)
        conn.execute('CREATE VIEW public.v AS SELECT 1 AS one')
        wanted = [TableName("a.b", "t x"), TableName('Q"s', "t x"), TableName("public", "p"),
                  TableName("public", "p 1"), TableName("public", "parent"), TableName("public", "child"),
                  TableName("public", "v"), TableName("nowhere", "t x")]
        facts = postgres.table_facts(conn, wanted)
        me = conn.execute("SELECT current_user").fetchone()[0]
    with pg18.connect() as conn:  # the role is the cluster's: gone with the database, not left to other tests
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(f"Facts Owner {db}")))
    assert facts.row_counts == {'"a.b"."t x"': 5, '"Q""s"."t x"': 2, "public.p": 15, 'public."p 1"': 10,
                                "public.parent": 1, "public.child": 2}
    assert facts.vectors == {'"a.b"."t x"': {"E m": {"type": "vector", "dims": 3, "non_null": 2}}}
    assert facts.owners['"Q""s"."t x"'] == f"Facts Owner {db}" and facts.owners['"a.b"."t x"'] == me
    assert facts.partitions == {"public.p": ['public."p 1"', 'public."p 2"']}
    assert [(i["table"], i["name"]) for i in facts.indexes] == [('"a.b"."t x"', "by e"), ('"a.b"."t x"', "t x_pkey")]
    assert "vector" in facts.extensions


def test_counts_and_fingerprints_of_more_tables_than_one_query_takes(pg18, monkeypatch):
    """Counts go COUNTS_AT_ONCE tables to a query (UNION ALL): over more tables than one query takes, with awkward
    names in two schemas, a partitioned table and an inheritance parent among them, every table gets its own count,
    the count its fingerprint (over two connections at once) finds, and the same fingerprint it gets alone. The
    biggest tables are fingerprinted first (the sessions would otherwise wait on one that started last)."""
    from backup_assets.core.engines import pg_content, postgres

    db = "many_" + secrets.token_hex(4)
    pg18.create_database(db)
    names = [TableName("S p.a\"ce" if i % 2 else "public", f'T "{i}".x') for i in range(130)]
    rows = {str(t): 3000 if i % 40 == 0 else i * 3 for i, t in enumerate(names)}
    with pg18.connect(db) as conn:
        conn.execute('CREATE SCHEMA "S p.a""ce"')
        for t in names:
            conn.execute(sql.SQL('CREATE TABLE {} (id int, "Note" text, at timestamptz DEFAULT now())').format(t.ident()))
            conn.execute(sql.SQL("INSERT INTO {} (id, \"Note\") SELECT g, repeat(%s, g %% 5) FROM generate_series(1, %s) g")
                         .format(t.ident()), (f"{t.name}\t\\\n", rows[str(t)]))
        _partitioned_and_inherited(conn)
        extra = [TableName("public", "p"), TableName("public", "parent"), TableName("public", "child")]
        rows.update({"public.p": 15, "public.parent": 1, "public.child": 2})
        facts = postgres.table_facts(conn, names + extra)
        alone = {str(t): pg_content.fingerprint(conn, t) for t in names + extra}
        assert len(names) + len(extra) > postgres.COUNTS_AT_ONCE
    ep = postgres.Endpoint(pg18.host, pg18.port, pg18.superuser, db, pg18.password)
    at_once = pg_content.fingerprints(ep, list(reversed(names + extra)))
    order, real = [], pg_content.fingerprint
    monkeypatch.setattr(pg_content, "fingerprint", lambda conn, t, **kw: order.append(str(t)) or real(conn, t, **kw))
    pg_content.fingerprints(ep, list(reversed(names + extra)), workers=1)
    with pg18.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    assert facts.row_counts == rows
    assert at_once == alone
    assert set(order[:4]) == {k for k, n in rows.items() if n == 3000}, order[:6]
    assert {k: n for k, (n, _f) in at_once.items()} == rows
    assert len({f for _n, f in at_once.values()}) == len(at_once)  # different content, different fingerprints
