"""A schema zoo: what production databases hold and the demo does not.

Names with spaces, dots, quotes, capitals, unicode and SQL in them; non-public schemas; enum types
and domains; partitioned tables (with a sub-partition); identity, serial and generated columns;
arrays, json, bytea, intervals, floats, text with tabs, newlines and backslashes; views; a table
owned by a role other than the superuser, with grants; inheritance; and pgvector where the server
has it. Built by SQL that goes through psycopg.sql for every name.
"""

from __future__ import annotations

import hashlib

from psycopg import sql

INJECTION = 'x"; DROP TABLE IF EXISTS plain; --'
OWNER_ROLE = "zoo owner"
READER_ROLE = "Zoo.Reader"

STATEMENTS = [
    "CREATE SCHEMA billing",
    'CREATE SCHEMA "Odd Schema"',
    "CREATE SCHEMA \"ünïcode\"",
    "CREATE TYPE billing.status AS ENUM ('open', 'paid', 'void')",
    "CREATE DOMAIN billing.money_amount AS numeric(12,2) CHECK (VALUE >= 0)",
    """CREATE TABLE billing."Invoices" (id bigserial PRIMARY KEY, status billing.status NOT NULL DEFAULT 'open',
         amount billing.money_amount, note text, created_at timestamptz DEFAULT '2026-01-01 00:00+00')""",
    """CREATE TABLE public."Order Items" (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         invoice_id bigint REFERENCES billing."Invoices"(id), qty int, price numeric,
         total numeric GENERATED ALWAYS AS (qty * price) STORED, tags text[], meta jsonb)""",
    'CREATE INDEX "Order Items by invoice" ON public."Order Items" (invoice_id)',
    'CREATE TABLE public."dotted.name" (k text PRIMARY KEY, v bytea)',
    'CREATE TABLE public."quote""d" (x int)',
    "CREATE TABLE public.plain (id serial PRIMARY KEY, t text)",
    "CREATE TABLE public.t (a int)",
    "CREATE TABLE billing.t (a int)",
    "CREATE TABLE public.u (a int)",
    'CREATE TABLE public."select" ("from" int, "Where" text)',
    "CREATE TABLE \"ünïcode\".\"Grüße\" (\"naïve\" text)",
    "CREATE TABLE public.measurements (id bigint, at date NOT NULL, v double precision) PARTITION BY RANGE (at)",
    "CREATE TABLE public.measurements_2026_01 PARTITION OF public.measurements FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')",
    "CREATE TABLE public.measurements_2026_02 PARTITION OF public.measurements FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') "
    "PARTITION BY RANGE (at)",
    "CREATE TABLE public.\"measurements 2026-02 a\" PARTITION OF public.measurements_2026_02 FOR VALUES FROM ('2026-02-01') TO ('2026-02-15')",
    "CREATE TABLE public.\"measurements 2026-02 b\" PARTITION OF public.measurements_2026_02 FOR VALUES FROM ('2026-02-15') TO ('2026-03-01')",
    "CREATE TABLE public.parent_inh (id int, note text)",
    "CREATE TABLE public.child_inh (extra int) INHERITS (public.parent_inh)",
    "CREATE TABLE public.types_zoo (b boolean, c char(5), f real, d double precision, ts timestamptz, iv interval, "
    "j json, arr int[], n numeric, e text)",
    'CREATE VIEW billing."open invoices" AS SELECT * FROM billing."Invoices" WHERE status = \'open\'',
    # functions used by a default, a check constraint and a trigger; a materialized view; RLS; comments
    "CREATE FUNCTION billing.next_code() RETURNS text LANGUAGE sql AS $$ SELECT 'C-' || floor(random() * 1000)::int $$",
    "CREATE FUNCTION billing.positive(numeric) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT $1 >= 0 $$",
    """CREATE FUNCTION billing.touch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.note := coalesce(NEW.note, '') || ' (touched)'; RETURN NEW; END $$""",
    """CREATE TABLE billing.payments (id serial PRIMARY KEY, invoice_id bigint REFERENCES billing."Invoices"(id)
         ON DELETE CASCADE, code text DEFAULT billing.next_code(), amount numeric CHECK (billing.positive(amount)),
         note text, during tstzrange, EXCLUDE USING gist (invoice_id WITH =, during WITH &&))""",
    "CREATE TRIGGER \"touch it\" BEFORE INSERT ON billing.payments FOR EACH ROW EXECUTE FUNCTION billing.touch()",
    'CREATE MATERIALIZED VIEW billing."paid totals" AS SELECT status, sum(amount) AS total FROM billing."Invoices" GROUP BY status',
    "ALTER TABLE billing.payments ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY \"own rows\" ON billing.payments USING (amount < 1000)",
    'COMMENT ON TABLE billing."Invoices" IS \'what customers owe; it''s "quoted"\'',
    "CREATE UNLOGGED TABLE public.scratch_cache (k text PRIMARY KEY, v text)",
    "CREATE TABLE public.blobs (id int PRIMARY KEY, data oid)",
]

DATA = [
    """INSERT INTO billing."Invoices" (status, amount, note)
       SELECT (ARRAY['open','paid','void']::billing.status[])[1 + g % 3], g * 1.5,
              E'note\\twith tab\\nand newline \\\\ backslash ' || g FROM generate_series(1, 50) g""",
    """INSERT INTO public."Order Items" (invoice_id, qty, price, tags, meta)
       SELECT 1 + g % 50, g, g * 0.25, ARRAY['a b', 'c,d', NULL], jsonb_build_object('k', g, 's', 'x "y"')
       FROM generate_series(1, 80) g""",
    "INSERT INTO public.\"dotted.name\" SELECT 'k' || g, decode(md5(g::text), 'hex') FROM generate_series(1, 10) g",
    'INSERT INTO public."quote""d" SELECT g FROM generate_series(1, 5) g',
    "INSERT INTO public.plain (t) SELECT 'row ' || g FROM generate_series(1, 30) g",
    "INSERT INTO public.t SELECT g FROM generate_series(1, 20) g",
    "INSERT INTO billing.t SELECT g FROM generate_series(1, 7) g",
    "INSERT INTO public.u SELECT g FROM generate_series(1, 3) g",
    'INSERT INTO public."select" SELECT g, \'w\' || g FROM generate_series(1, 4) g',
    "INSERT INTO \"ünïcode\".\"Grüße\" VALUES ('café'), ('日本語'), ('')",
    "INSERT INTO public.measurements SELECT g, DATE '2026-01-01' + (g % 59), g / 3.0 FROM generate_series(1, 200) g",
    "INSERT INTO public.parent_inh VALUES (1, 'parent row')",
    "INSERT INTO billing.payments (invoice_id, amount, during) SELECT g, g * 2, tstzrange('2026-01-01', '2026-01-02') "
    "FROM generate_series(1, 12) g",
    'REFRESH MATERIALIZED VIEW billing."paid totals"',
    "INSERT INTO public.scratch_cache SELECT 'k' || g, 'v' FROM generate_series(1, 3) g",
    "INSERT INTO public.blobs SELECT g, lo_from_bytea(0, convert_to('large object ' || g, 'UTF8')) FROM generate_series(1, 3) g",
    "INSERT INTO public.child_inh VALUES (2, 'child row', 7)",
    """INSERT INTO public.types_zoo VALUES
       (true, 'ab', 1.1, 0.1, '2026-01-01 10:00+02', '1 day 2 hours', '{"a": [1,2]}', '{1,NULL,3}', 'NaN', E'\\b\\f\\v\\r\\x01'),
       (NULL, NULL, 'Infinity', -0.0, NULL, NULL, NULL, NULL, NULL, '')""",
]

VECTOR = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    'CREATE TABLE "Odd Schema"."Mixed Case" ("Weird Col" text, "select" int, emb vector(3))',
    'CREATE INDEX "Mixed Case hnsw" ON "Odd Schema"."Mixed Case" USING hnsw (emb vector_l2_ops)',
    """INSERT INTO "Odd Schema"."Mixed Case" SELECT 'w ' || g, g, ('[' || g || ',' || g + 0.5 || ',1e-7]')::vector
       FROM generate_series(1, 4) g""",
]
PLAIN_ODD = ['CREATE TABLE "Odd Schema"."Mixed Case" ("Weird Col" text, "select" int)',
             """INSERT INTO "Odd Schema"."Mixed Case" SELECT 'w ' || g, g FROM generate_series(1, 4) g"""]


EXTENSIONS = ["CREATE EXTENSION IF NOT EXISTS btree_gist"]


def ensure_role(conn, role: str) -> None:
    if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))


def build(conn, *, vector: bool = True) -> None:
    """Create and fill the zoo in the connected (empty) database."""
    ensure_role(conn, OWNER_ROLE)
    ensure_role(conn, READER_ROLE)
    for statement in EXTENSIONS + STATEMENTS + (VECTOR if vector else PLAIN_ODD) + DATA:
        conn.execute(statement)
    conn.execute(sql.SQL("CREATE TABLE public.{} (id int PRIMARY KEY, v text)").format(sql.Identifier(INJECTION)))
    conn.execute(sql.SQL("INSERT INTO public.{} SELECT g, 'i' || g FROM generate_series(1, 6) g").format(
        sql.Identifier(INJECTION)))
    conn.execute(sql.SQL('ALTER TABLE billing."Invoices" OWNER TO {}').format(sql.Identifier(OWNER_ROLE)))
    conn.execute(sql.SQL('GRANT SELECT ON billing."Invoices" TO {}').format(sql.Identifier(READER_ROLE)))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA billing TO {}").format(sql.Identifier(READER_ROLE)))


def content(conn) -> dict[str, str]:
    """Per table (every user table, partitions included): md5 of all its own rows in a stable order."""
    out = {}
    rows = conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname NOT LIKE 'before\\_restore\\_%%'
           ORDER BY 1, 2""").fetchall()
    for schema, name in rows:
        texts = sorted(r[0] for r in conn.execute(
            sql.SQL("SELECT coalesce(t::text, '\\N') FROM ONLY {} t").format(sql.Identifier(schema, name))).fetchall())
        out[f"{schema}.{name}"] = hashlib.md5("\n".join(texts).encode()).hexdigest() + f":{len(texts)}"
    return out


def owners_and_grants(conn) -> dict[str, tuple]:
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner), coalesce(c.relacl::text, '')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p', 'v') AND n.nspname IN ('billing', 'public', 'Odd Schema')""").fetchall()
    return {name: (owner, acl) for name, owner, acl in rows}


def sequences(conn) -> dict[str, int]:
    return {f"{s}.{n}": v for s, n, v in conn.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL").fetchall()}
