"""PostgreSQL's own regression database round-trips, to pg_upgrade's standard.

The database `make installcheck` leaves (see regression.py: about 680 tables, every kind of object the
server has) is backed up, checked and drilled; a whole restore into PostgreSQL 15 dumps to the same text
as the source (`pg_dump --schema-only` and `--data-only`, the same pg_dump, diff 0 lines); a group of its
oddest tables restores with `--tables` into a changed copy exactly, everything else untouched; into the
embedded PostgreSQL 18 it restores as far as 18 can hold it (its tables' rows equal, every object present).
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess

import pytest
from psycopg import sql

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.engines import postgres
from backup_assets.core.names import TableName
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.readable import archive_readable
from backup_assets.core.verify.restore_drill import restore_drill

from . import regression, zoo
from .conftest import PG15_PASSWORD_ENV, pg_source

P = "2026-11-20"
# the regression database's oddest tables: every core type, nested composites, xml, tsvector, two-level
# partitioning, generated columns over domains, inheritance
ODD = ["public.tab_core_types", "public.onek", "public.test_tsvector", "public.xmltest", "public.mlparted",
       "public.gtest1", "public.a_star", "public.b_star", "public.emp", "public.domview"]


@pytest.fixture(scope="module")
def regression_db(pg15):
    if not regression.available():
        if os.environ.get("CI"):
            pytest.fail(f"the regression database is not built ({regression.DUMP}): .ci/run builds it")
        pytest.skip(f"the regression database is not built: python -m backup_assets_tests.regression build SRC")
    regression.load(pg15, "regression")
    yield "regression"
    with pg15.connect() as conn:
        for name in ("regression", "regression_copy", "regression_odd"):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _odd_tables(pg15, db: str) -> list[str]:
    with pg15.connect(db) as conn:
        present = [t for t in ODD if postgres.relkind(conn, TableName.parse(t))]
    assert len(present) >= 6, present
    return present


@pytest.fixture
def catalog(pg15, regression_db, write_catalog):
    return write_catalog({"reg": pg_source(pg15, regression_db, PG15_PASSWORD_ENV,
                                           groups={"full": {}, "odd": {"tables": _odd_tables(pg15, regression_db)}})})


def pg_dump_text(pg15, db: str, *flags: str) -> list[str]:
    env = {**os.environ, "PGPASSWORD": pg15.password}
    out = subprocess.run([str(pg15.bin_dir / "pg_dump"), "--no-password", f"--host={pg15.host}", f"--port={pg15.port}",
                          f"--username={pg15.superuser}", *flags, db], env=env, check=True, capture_output=True,
                         text=True).stdout
    # \restrict carries a random key per run; nothing else may differ
    return [line for line in out.splitlines() if not re.match(r"\\(un)?restrict ", line)]


def _diff(a: list[str], b: list[str]) -> list[str]:
    return [line for line in difflib.unified_diff(a, b, lineterm="", n=0)]


def test_the_regression_database_backs_up_drills_and_restores_to_a_zero_line_diff(pg15, regression_db, catalog):
    m = run_backup(catalog, "reg", "full", "daily", P)
    assert len(m.row_counts) > 400  # tables without partitions (those count under their parent)
    backup = LocalRepository(catalog.repository_root).latest("reg", "full", "daily")
    for check in (artifact_intact(backup), archive_readable(catalog, backup)):
        assert check.passed, check.message
    readable = archive_readable(catalog, backup)
    assert readable.metadata["objects"]["FUNCTION"] > 100 and readable.metadata["objects"]["TABLE"] > 400
    drill = restore_drill(catalog, backup)
    assert drill.passed, drill.message
    assert drill.metadata["objects_compared"] == "definitions"
    assert drill.metadata["objects"]["TRIGGER"] > 10 and drill.metadata["objects"]["POLICY"] > 5
    assert drill.metadata["large_objects"]["count"] >= 1
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "reg", "--group", "full",
                 "--target-db", "regression_copy", "--confirm"]) == 0
    for flags in (("--schema-only",), ("--data-only",)):
        assert _diff(pg_dump_text(pg15, regression_db, *flags), pg_dump_text(pg15, "regression_copy", *flags)) == [], flags


def test_a_group_of_the_oddest_tables_restores_exactly_into_a_changed_copy(pg15, regression_db, catalog):
    odd = _odd_tables(pg15, regression_db)
    run_backup(catalog, "reg", "odd", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("reg", "odd", "daily")
    drill = restore_drill(catalog, backup)
    assert drill.passed, drill.message
    with pg15.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS regression_odd WITH (FORCE)")
        conn.execute("CREATE DATABASE regression_odd TEMPLATE regression")
    with pg15.connect("regression_odd") as conn:
        before = zoo.content(conn)
        # change every odd table (rows of each leaf deleted), and one table outside the group
        for key in before:
            schema, _, name = key.partition(".")
            table = TableName(schema, name)
            parents = {TableName.parse(t) for t in odd}
            top = conn.execute("SELECT n.nspname, c.relname FROM pg_partition_ancestors(%s::regclass) a "
                               "JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
                               (postgres._regclass(table),)).fetchall()
            if table in parents or any(TableName(s, n) in parents for s, n in top):
                conn.execute(sql.SQL("DELETE FROM ONLY {}").format(table.ident()))
        conn.execute("DELETE FROM public.tenk1 WHERE unique1 < 10")
        changed = zoo.content(conn)
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "reg", "--group", "odd", "--target-db",
                 "regression_odd", "--tables", *odd, "--confirm"]) == 0
    with pg15.connect("regression_odd") as conn:
        after = zoo.content(conn)
    for key in after:
        if key.startswith("before_restore_"):
            continue
        touched = after[key] != changed[key]
        if touched:
            assert after[key] == before[key], key  # what was restored is exactly as backed up
        else:
            assert after[key] == changed[key]
    assert after["public.tenk1"] == changed["public.tenk1"] != before["public.tenk1"]  # not asked for: untouched
    assert sum(after[k] == before[k] != changed[k] for k in after) >= len(odd)


# what the embedded PostgreSQL 18 cannot hold: the suite's C functions (built for 15), ICU collations and
# lz4 compression (not built in), xml values (no libxml); everything else of the regression database goes over
LEAVE_OUT_FOR_18 = [
    "SELECT format('DROP FUNCTION IF EXISTS %s CASCADE', p.oid::regprocedure) FROM pg_proc p "
    "WHERE p.probin LIKE '%regress-lib%'",
    "SELECT format('DROP COLLATION IF EXISTS %s CASCADE', c.oid::regcollation) FROM pg_collation c "
    "WHERE c.collprovider = 'i' AND c.oid >= 16384",
    "SELECT format('ALTER %s %s ALTER COLUMN %I SET COMPRESSION pglz', CASE c.relkind WHEN 'm' THEN "
    "'MATERIALIZED VIEW' ELSE 'TABLE' END, a.attrelid::regclass, a.attname) FROM pg_attribute a "
    "JOIN pg_class c ON c.oid = a.attrelid WHERE a.attcompression = 'l' AND c.relkind IN ('r', 'p', 'm') "
    "AND NOT a.attisdropped",
    "SELECT format('ALTER TABLE %s DROP COLUMN IF EXISTS %I CASCADE', a.attrelid::regclass, a.attname) "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid "
    "WHERE c.relkind IN ('r', 'p') AND NOT a.attisdropped AND a.attnum > 0 AND a.attinhcount = 0 "
    "AND (t.typname IN ('xml', '_xml') OR (t.typtype = 'd' AND t.typbasetype = 'xml'::regtype))",
    # what 16 and later refuse that 15 allowed (as pg_upgrade's AdjustUpgrade.pm also drops): an inheritance
    # child's own generation expression for a generated column
    "SELECT DISTINCT format('DROP TABLE IF EXISTS %s CASCADE', i.inhrelid::regclass) FROM pg_inherits i "
    "JOIN pg_attribute a ON a.attrelid = i.inhrelid WHERE a.attgenerated <> '' AND a.attislocal",
    "SELECT format('DROP %s IF EXISTS %s CASCADE', CASE c.relkind WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'VIEW' END, "
    "c.oid::regclass) FROM pg_class c WHERE c.relkind IN ('v', 'm') AND pg_get_viewdef(c.oid) ILIKE '%xml%' "
    "AND c.relnamespace <> 'pg_catalog'::regnamespace AND c.relnamespace <> 'information_schema'::regnamespace",
    "SELECT format('DROP FUNCTION IF EXISTS %s CASCADE', p.oid::regprocedure) FROM pg_proc p WHERE p.oid >= 16384 "
    "AND (p.prosrc ILIKE '%xml%' OR 'xml'::regtype = ANY(p.proargtypes::oid[]) OR p.prorettype = 'xml'::regtype)",
    "SELECT format('DROP DOMAIN IF EXISTS %s CASCADE', t.oid::regtype) FROM pg_type t WHERE t.typtype = 'd' "
    "AND t.typbasetype = 'xml'::regtype",
]


def test_the_regression_database_restores_into_18_as_far_as_18_can_hold_it(pg15, pg18, regression_db, write_catalog):
    """15 -> 18: whatever the embedded 18 can hold (see LEAVE_OUT_FOR_18) restores, every table's rows equal
    (the restore's fingerprints) and every object of the archive is there (its definitions are printed by
    another major, so their presence is compared)."""
    import secrets

    with pg15.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS regression_to18 WITH (FORCE)")
        conn.execute("CREATE DATABASE regression_to18 TEMPLATE regression")
    with pg15.connect("regression_to18") as conn:
        for query in LEAVE_OUT_FOR_18:
            for (statement,) in conn.execute(query).fetchall():
                conn.execute(statement)
    catalog = write_catalog({"reg": pg_source(pg15, "regression_to18", PG15_PASSWORD_ENV, groups={"full": {}},
                                              globals=False)})
    m = run_backup(catalog, "reg", "full", "daily", P)
    target = "regression_on_18_" + secrets.token_hex(3)
    moved = write_catalog({"reg": pg_source(pg18, target, groups={"full": {}}, globals=False)})
    try:
        regression.load_roles(pg18)  # the suite's roles, with their memberships
        assert main(["--catalog", moved.catalog_path, "restore", "--source", "reg", "--group", "full",
                     "--confirm"]) == 0
        with pg15.connect("regression_to18") as conn:
            source = zoo.content(conn)
        with pg18.connect(target) as conn:
            restored = zoo.content(conn)
        assert restored == source and len(restored) > 400
        assert sum(m.row_counts.values()) > 10_000
    finally:
        with pg18.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target)))
        with pg15.connect() as conn:
            conn.execute("DROP DATABASE IF EXISTS regression_to18 WITH (FORCE)")
