"""Exact on the schemas users have (issue: identifiers, schemas, partitions, subsets, roles, versions).

Every test runs real backups of the schema zoo (see zoo.py) and compares restores by content:
an md5 of every table's rows, sequences, owners and grants.
"""

from __future__ import annotations

import secrets

import pytest
from psycopg import sql

from backup_assets.catalog import CatalogError, parse_catalog
from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.names import TableName
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.readable import archive_readable
from backup_assets.core.verify.restore_drill import restore_drill

from . import zoo
from .conftest import PG15_PASSWORD_ENV, PG18_PASSWORD_ENV, pg_source
from .test_checks import check_evaluations, run_with_checks

P = "2026-11-20"
GROUPS = {
    "full": {},
    # a non-public schema with an enum type and a domain, a mapping and a quoted name
    "billing": {"tables": ['billing."Invoices"', {"schema": "public", "table": "Order Items"}, "billing.t"]},
    # a partitioned table (with a sub-partitioned partition) and a name with a dot
    "parts": {"tables": ["measurements", 'public."dotted.name"']},
}


def _create(cluster, name: str, *, vector: bool) -> str:
    with cluster.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with cluster.connect(name) as conn:
        zoo.build(conn, vector=vector)
    return name


def _drop(cluster, *names: str) -> None:
    with cluster.connect() as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def zoo18(pg18, request):
    name = "zoo_" + secrets.token_hex(4)
    yield _create(pg18, name, vector=True)
    _drop(pg18, name, f"{name}_copy", f"{name}_x")


@pytest.fixture
def zoo15(pg15, request):
    name = "zoo_" + secrets.token_hex(4)
    yield _create(pg15, name, vector=False)
    _drop(pg15, name, f"{name}_copy")


def cli(catalog, *args) -> int:
    return main(["--catalog", catalog.catalog_path, *args])


def snapshot(cluster, db) -> tuple:
    with cluster.connect(db) as conn:
        return zoo.content(conn), zoo.owners_and_grants(conn), zoo.sequences(conn)


def test_catalog_takes_any_identifier_in_an_unambiguous_form():
    catalog = parse_catalog({"repository": {"root": "/tmp/x"}, "sources": {"z": {
        "engine": "postgres", "connection": {"dbname": "z"},
        "groups": {"g": {"tables": ['public."Order Items"', {"schema": "billing", "table": "Invoices"},
                                    'public."dotted.name"', "runs", 'public."quote""d"', '"Odd Schema"."Mixed Case"']}}}}})
    assert catalog.sources["z"].groups["g"].tables == [
        'public."Order Items"', 'billing."Invoices"', 'public."dotted.name"', "public.runs", 'public."quote""d"',
        '"Odd Schema"."Mixed Case"']
    assert TableName.parse('public."dotted.name"') == TableName("public", "dotted.name")
    assert TableName.parse('"a.b"."c ""d"" e"') == TableName("a.b", 'c "d" e')
    for bad in ['a.b.c', 'public."open', 'public.', '"x"y', {"table": 3}, {"schema": "s", "name": "t"}]:
        with pytest.raises(CatalogError, match="bad table name"):
            parse_catalog({"repository": {"root": "/tmp/x"}, "sources": {"z": {
                "engine": "postgres", "connection": {"dbname": "z"}, "groups": {"g": {"tables": [bad]}}}}})


def test_every_check_passes_on_the_zoo_and_drills_prove_content(pg18, zoo18, write_catalog):
    """Failures 1-4: spaces, partitions, dots, non-public schemas with enums and domains."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)}, tiers={"daily": {"drill": True}})
    for group in GROUPS:
        result = run_with_checks(catalog, f"zoo/{group}/daily")
        evals = check_evaluations(result)
        assert result.success, {k: e.description for k, e in evals.items()}
        assert set(evals) == {"artifact_intact", "archive_readable", "size_anomaly", "restore_drill"}
        assert all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
        drill = evals["restore_drill"].metadata
        assert drill["archive_fingerprints"].value == drill["restored_fingerprints"].value
    m = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily").manifest
    assert m.row_counts['public."Order Items"'] == 80 and m.row_counts['public."dotted.name"'] == 10
    assert m.row_counts["public.measurements"] == 200  # its rows live in (sub-)partitions
    assert set(m.partitions["public.measurements"]) == {
        "public.measurements_2026_01", 'public."measurements 2026-02 a"', 'public."measurements 2026-02 b"'}
    assert m.row_counts[str(TableName("public", zoo.INJECTION))] == 6
    assert m.owners['billing."Invoices"'] == zoo.OWNER_ROLE
    # restore without --partition takes the newest verified backup: it is verified now
    assert cli(catalog, "verify", "--source", "zoo", "--group", "full") == 0


@pytest.mark.parametrize("rows_hashed", ["here", "apart"])
def test_drill_fails_when_a_restored_value_differs(pg18, zoo18, write_catalog, monkeypatch, rows_hashed):
    """Counts alone would pass: one changed value must fail the drill, and only that table's (the archive's
    rows hashed by the reader itself, or by its second process as a big archive's are)."""
    if rows_hashed == "apart":
        from backup_assets.core.verify import row_hasher

        monkeypatch.setattr(row_hasher, "wanted", lambda _decoded: True)
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "billing", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("zoo", "billing", "daily")
    from backup_assets.core.verify import restore_drill as verify_restore_drill

    real = verify_restore_drill.pg_restore_archive

    def restore_then_tamper(catalog_, backup_, target, raw, **kw):
        real(catalog_, backup_, target, raw, **kw)
        from backup_assets.core.engines import postgres

        with postgres.connect(target) as conn:
            conn.execute('UPDATE billing."Invoices" SET note = note || \'!\' WHERE id = 7')

    monkeypatch.setattr(verify_restore_drill, "pg_restore_archive", restore_then_tamper)
    outcome = restore_drill(catalog, backup)
    assert not outcome.passed
    assert 'billing."Invoices": restored rows differ in content from the archive' in outcome.message
    archive, restored = outcome.metadata["archive_fingerprints"], outcome.metadata["restored_fingerprints"]
    assert len(archive) > 1 and [k for k in archive if archive[k] != restored[k]] == ['billing."Invoices"']


def test_full_restore_of_the_zoo_is_exact(pg18, zoo18, write_catalog):
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "full", "daily", P)
    before = snapshot(pg18, zoo18)
    assert cli(catalog, "restore", "--source", "zoo", "--group", "full", "--target-db", f"{zoo18}_copy", "--confirm") == 0
    assert snapshot(pg18, f"{zoo18}_copy") == before


def test_group_restore_creates_schemas_and_types_it_needs(pg18, zoo18, write_catalog):
    """Failure 4: a group outside public restores into an empty database (schema, enum, domain)."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "billing", "daily", P)
    assert cli(catalog, "restore", "--source", "zoo", "--group", "billing", "--target-db", f"{zoo18}_copy",
               "--confirm") == 0
    source, copy = snapshot(pg18, zoo18)[0], snapshot(pg18, f"{zoo18}_copy")[0]
    for table in ('billing.Invoices', 'public.Order Items', 'billing.t'):
        assert copy[table] == source[table]
    assert "public.plain" not in copy  # only the group's tables
    with pg18.connect(f"{zoo18}_copy") as conn:
        assert conn.execute("SELECT 'paid'::billing.status").fetchone()[0] == "paid"
        assert conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'Invoices'").fetchone()[0] \
            == zoo.OWNER_ROLE


def test_tables_restore_of_a_partitioned_table_restores_its_partitions(pg18, zoo18, write_catalog):
    """Failure 5: `--tables public.measurements` used to empty it and commit."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "parts", "daily", P)
    before = snapshot(pg18, zoo18)[0]
    with pg18.connect(zoo18) as conn:
        conn.execute("DELETE FROM public.measurements WHERE id % 3 = 0")
        conn.execute("UPDATE public.measurements SET v = -1 WHERE id = 5")
        conn.execute("INSERT INTO public.t VALUES (999)")
    assert cli(catalog, "restore", "--source", "zoo", "--group", "parts", "--tables", "public.measurements",
               "--confirm") == 0
    after = snapshot(pg18, zoo18)[0]
    for leaf in ("public.measurements_2026_01", "public.measurements 2026-02 a", "public.measurements 2026-02 b"):
        assert after[leaf] == before[leaf]
    assert after["public.t"] != before["public.t"]  # not asked for: left as it is


def test_a_tables_restore_that_cannot_match_changes_nothing(pg18, zoo18, write_catalog, capsys):
    """Failure 5: nothing changes unless everything matches (here: a column added since the backup)."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "full", "daily", P)
    with pg18.connect(zoo18) as conn:
        conn.execute("DELETE FROM public.u")
        conn.execute("ALTER TABLE public.t ADD COLUMN b int NOT NULL DEFAULT 1")
    before = snapshot(pg18, zoo18)
    assert cli(catalog, "restore", "--source", "zoo", "--group", "full", "--tables", "public.u", "public.t",
               "--confirm") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("backup-assets:")]
    assert len(err) == 1 and "rolled back, nothing changed" in err[0] and 'column "b"' in err[0], err
    assert snapshot(pg18, zoo18) == before
    with pg18.connect(zoo18) as conn:
        assert not conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'before_restore_%'").fetchall()


def test_tables_restore_touches_exactly_the_named_tables(pg18, zoo18, write_catalog):
    """Failure 6: `--tables billing.t public.u` also loaded public.t."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "full", "daily", P)
    with pg18.connect(zoo18) as conn:
        conn.execute("DELETE FROM billing.t")
        conn.execute("DELETE FROM public.u")
        conn.execute("INSERT INTO public.t VALUES (-1)")
    assert cli(catalog, "restore", "--source", "zoo", "--group", "full", "--tables", "billing.t", "public.u",
               "--confirm") == 0
    with pg18.connect(zoo18) as conn:
        assert conn.execute("SELECT count(*) FROM billing.t").fetchone()[0] == 7
        assert conn.execute("SELECT count(*) FROM public.u").fetchone()[0] == 3
        assert conn.execute("SELECT count(*) FROM public.t").fetchone()[0] == 21
        safety = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'before_restore_%'").fetchone()[0]
        copies = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (safety,))}
        assert copies == {"billing.t", "public.u"}
    # the safety copy is never part of the next backup of that database
    m = run_backup(catalog, "zoo", "full", "daily", "2026-11-21")
    assert not [t for t in m.row_counts if "before_restore" in t]


def test_hostile_names_are_data_not_sql(pg18, zoo18, write_catalog):
    """Failure 7: quotes in names broke restores, and a name could inject SQL."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "full", "daily", P)
    before = snapshot(pg18, zoo18)[0]
    evil = str(TableName("public", zoo.INJECTION))
    with pg18.connect(zoo18) as conn:
        conn.execute('DELETE FROM public."quote""d"')
        conn.execute(sql.SQL("DELETE FROM public.{}").format(sql.Identifier(zoo.INJECTION)))
    assert cli(catalog, "restore", "--source", "zoo", "--group", "full", "--tables", 'public."quote""d"', evil,
               "--no-safety-copy", "--confirm") == 0
    after = snapshot(pg18, zoo18)[0]
    assert after == before  # plain is still there, and both tables have their rows back


def _matrix_catalog(write_catalog, cluster, db, env):
    return write_catalog({"zoo": pg_source(cluster, db, env, groups={
        "full": {}, "some": {"tables": ['billing."Invoices"', "public.measurements", 'public."dotted.name"']}})},
        tiers={"daily": {"drill": True}})


def test_postgres_15_backups_restore_into_15_and_18(pg15, pg18, zoo15, write_catalog):
    """Failure 8: a 15 backup could not be restored into 15 (pg_restore 18's settings)."""
    catalog = _matrix_catalog(write_catalog, pg15, zoo15, PG15_PASSWORD_ENV)
    for group in ("full", "some"):
        result = run_with_checks(catalog, f"zoo/{group}/daily")
        evals = check_evaluations(result)
        assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
    m = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily").manifest
    assert "(PostgreSQL) 15." in m.tool_version
    before = snapshot(pg15, zoo15)
    # 15 -> 15: whole database and a subset
    assert cli(catalog, "restore", "--source", "zoo", "--group", "full", "--target-db", f"{zoo15}_copy",
               "--confirm") == 0
    assert snapshot(pg15, f"{zoo15}_copy") == before
    with pg15.connect(zoo15) as conn:
        conn.execute("DELETE FROM public.measurements")
    assert cli(catalog, "restore", "--source", "zoo", "--group", "some", "--tables", "public.measurements",
               "--confirm") == 0
    assert snapshot(pg15, zoo15)[0] == before[0]
    # 15 -> 18: the same repository, the source moved to a PostgreSQL 18 server
    target = "zoo15_on_18_" + secrets.token_hex(3)
    moved = _matrix_catalog(write_catalog, pg18, target, PG18_PASSWORD_ENV)
    try:
        assert cli(moved, "restore", "--source", "zoo", "--group", "full", "--confirm") == 0
        assert snapshot(pg18, target)[0] == before[0]
    finally:
        _drop(pg18, target)


def test_restore_into_an_older_major_is_refused_before_anything(pg15, pg18, zoo18, write_catalog, capsys):
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "full", "daily", P)
    target = "zoo18_on_15_" + secrets.token_hex(3)
    moved = write_catalog({"zoo": pg_source(pg15, target, PG15_PASSWORD_ENV, groups=GROUPS)})
    assert cli(moved, "restore", "--source", "zoo", "--group", "full", "--confirm") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("backup-assets:")]
    assert len(err) == 1 and "PostgreSQL 18" in err[-1] and "PostgreSQL 15" in err[-1] and "older major" in err[-1]
    with pg15.connect() as conn:
        assert not conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE %s", (target + "%",)).fetchall()


def test_restore_onto_a_server_without_the_roles_recreates_them_from_the_roles_backup(pg15, pg18, write_catalog):
    """Failure 9: restoring into a server that lacks the owner role of a table failed; owners,
    logins, memberships and database grants must survive a restore onto a fresh server."""
    tag = secrets.token_hex(3)
    owner, login, team = f"Owner {tag}", f"app.login_{tag}", f"team_{tag}"
    db = "owned_" + tag
    pg15.create_database(db)
    with pg15.connect(db) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(team)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 7 PASSWORD 'app-secret' IN ROLE {}").format(
            sql.Identifier(login), sql.Identifier(team)))
        conn.execute("CREATE TABLE public.owned (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.owned SELECT g, 'v' || g FROM generate_series(1, 25) g")
        conn.execute(sql.SQL("ALTER TABLE public.owned OWNER TO {}").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("GRANT SELECT ON public.owned TO {}").format(sql.Identifier(team)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(db), sql.Identifier(login)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET work_mem = '7MB'").format(sql.Identifier(db)))
        conn.execute(sql.SQL('ALTER ROLE {} SET search_path = "$user", "Odd Schema", public').format(sql.Identifier(login)))
        conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET statement_timeout = '5s'").format(
            sql.Identifier(login), sql.Identifier(db)))
        password_hash = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (login,)).fetchone()[0]
    catalog = write_catalog({"o": pg_source(pg15, db, PG15_PASSWORD_ENV, groups={"full": {}})},
                            tiers={"daily": {"drill": True}})
    for group in ("full", "globals"):
        result = run_with_checks(catalog, f"o/{group}/daily")
        evals = check_evaluations(result)
        assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
    roles_backup = LocalRepository(catalog.repository_root).latest("o", "globals", "daily")
    assert login in roles_backup.manifest.roles
    assert "app-secret" not in roles_backup.manifest_path.read_text() and password_hash not in roles_backup.manifest_path.read_text()
    assert oct(roles_backup.artifact_path.stat().st_mode & 0o777) == "0o600"
    target = "owned_on_18_" + tag
    moved = write_catalog({"o": pg_source(pg18, target, PG18_PASSWORD_ENV, groups={"full": {}})})
    try:
        # without permission to create roles, the refusal names them and nothing is touched
        assert cli(moved, "restore", "--source", "o", "--group", "full", "--confirm", "--no-create-roles") == 1
        with pg18.connect() as conn:
            assert not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = ANY(%s)", ([owner, login, team],)).fetchone()
            assert not conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE %s", (target + "%",)).fetchone()
        assert cli(moved, "restore", "--source", "o", "--group", "full", "--confirm") == 0
        with pg18.connect(target) as conn:
            assert conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'owned'").fetchone()[0] == owner
            assert conn.execute("SELECT count(*) FROM public.owned").fetchone()[0] == 25
            assert conn.execute("SELECT has_table_privilege(%s, 'public.owned', 'SELECT')", (login,)).fetchone()[0]
            assert conn.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')", (login, target)).fetchone()[0]
            assert conn.execute("SELECT rolcanlogin, rolconnlimit, rolpassword FROM pg_authid WHERE rolname = %s",
                                (login,)).fetchone() == (True, 7, password_hash)
            assert conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (login, team)).fetchone()[0]
            settings = {(r, d): c for r, d, c in conn.execute(
                "SELECT r.rolname, d.datname, s.setconfig FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole "
                "LEFT JOIN pg_database d ON d.oid = s.setdatabase").fetchall()}
            assert settings[(None, target)] == ["work_mem=7MB"]
            assert settings[(login, None)] == ['search_path="$user", "Odd Schema", public']
            assert settings[(login, target)] == ["statement_timeout=5s"]
    finally:
        _drop(pg18, target)
        _drop(pg15, db)
        for cluster in (pg15, pg18):
            with cluster.connect() as conn:
                for role in (login, team, owner):
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_artifact_checks_on_a_non_archive_fail_clearly(pg18, zoo18, write_catalog):
    """A readable zstd stream that is not a pg_dump archive fails archive_readable with its reason."""
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)})
    run_backup(catalog, "zoo", "billing", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("zoo", "billing", "daily")
    import json

    import zstandard

    from .conftest import reseal

    data = zstandard.ZstdCompressor().compress(b"PGDMP" + b"\x01" * 200)
    backup.artifact_path.write_bytes(data)
    manifest = json.loads(backup.manifest_path.read_text())
    import hashlib

    manifest.update(size_bytes=len(data), raw_size_bytes=205, sha256=hashlib.sha256(data).hexdigest())
    backup.manifest_path.write_text(reseal(manifest))
    backup = LocalRepository(catalog.repository_root).latest("zoo", "billing", "daily")
    assert artifact_intact(backup).passed
    outcome = archive_readable(catalog, backup)
    assert not outcome.passed and backup.artifact_path.name in outcome.message
    assert "archive format 1.1.1 is older than this reader supports" in outcome.message, outcome.message


def test_a_sql_ascii_database_backs_up_checks_and_restores(pg18, write_catalog):
    """What initdb gives without a UTF-8 locale (a plain container): names and text arrive as str anyway."""

    def utf8(db):
        conn = pg18.connect(db)
        conn.execute("SET client_encoding TO 'UTF8'")  # this test's own connections; ours set it themselves
        return conn

    def content(db) -> tuple:
        with utf8(db) as conn:
            return zoo.content(conn), zoo.owners_and_grants(conn), zoo.sequences(conn)

    name = "t_sql_ascii_" + secrets.token_hex(3)
    with pg18.connect() as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with utf8(name) as conn:
            conn.execute('CREATE SCHEMA "Legacy App"')
            conn.execute('CREATE TABLE "Legacy App"."Odd Table" (id int PRIMARY KEY, note text)')
            conn.execute("""INSERT INTO "Legacy App"."Odd Table" SELECT n, 'grüße ' || n FROM generate_series(1, 50) n""")
        catalog = write_catalog({"legacy": pg_source(pg18, name, groups={"full": {}})},
                                tiers={"daily": {"drill": True}})
        result = run_with_checks(catalog, "legacy/full/daily")
        evals = check_evaluations(result)
        assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
        assert cli(catalog, "restore", "--source", "legacy", "--group", "full", "--target-db", f"{name}_copy",
                   "--confirm") == 0
        assert content(f"{name}_copy") == content(name)
    finally:
        with pg18.connect() as conn:
            for db in (name, f"{name}_copy"):
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
