"""Restores and drills are exact for what a database holds beyond plain rows.

Each case was found by hand on a database nobody here designed, and each failed before its fix:
composites whose fields are all NULL, inheritance parents, triggers whose function nothing else selects,
tables without columns, NOT VALID constraints over old rows, a hardened database's privileges, a WAL-mode
SQLite store, and PostgreSQL's own race in parallel restores.
"""

from __future__ import annotations

import secrets
import sqlite3

import pytest
from psycopg import sql

from backup_assets.cli import main
from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.engines import postgres
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.restore_drill import restore_drill

from . import zoo
from .conftest import PG15_PASSWORD_ENV, PG18_PASSWORD_ENV, pg_source

P = "2026-11-20"

HOSTILE = r"""
CREATE TYPE pr AS (a int, b text);
CREATE TABLE comp (id int PRIMARY KEY, p pr, ps pr[]);
INSERT INTO comp VALUES (1, ROW(NULL, NULL), ARRAY[ROW(NULL, NULL)::pr]), (2, ROW(1, 'x'), NULL), (3, NULL, '{}');
CREATE TABLE p (id int, v text);
CREATE TABLE ca (x int) INHERITS (p);
INSERT INTO p VALUES (1, 'parent');
INSERT INTO ca VALUES (2, 'child', 20), (3, 'child', 30);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.v := coalesce(NEW.v, 'stamped'); RETURN NEW; END$$;
CREATE TABLE trig (id int PRIMARY KEY, v text);
CREATE TRIGGER trig_stamp BEFORE INSERT ON trig FOR EACH ROW EXECUTE FUNCTION stamp();
COMMENT ON TRIGGER trig_stamp ON trig IS 'stamps rows';
INSERT INTO trig (id) VALUES (1), (2);
CREATE TABLE nocols ();
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
CREATE TABLE nv (id int, n int);
INSERT INTO nv VALUES (1, -5), (2, 3);
ALTER TABLE nv ADD CONSTRAINT positive CHECK (n > 0) NOT VALID;
CREATE POLICY positive_ids ON trig USING (id > 0);
ALTER TABLE trig ENABLE ROW LEVEL SECURITY;
REVOKE EXECUTE ON FUNCTION stamp() FROM PUBLIC;
COMMENT ON TABLE comp IS 'composites';
SELECT lo_from_bytea(0, '\x00ff5c'::bytea);
"""
GROUPS = {"full": {}, "trig": {"tables": ["trig"]}, "comp": {"tables": ["comp"]}}


def _drop(cluster, *names):
    with cluster.connect() as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["pg18", "pg15"])
def hostile(request, write_catalog):
    """(cluster, database, catalog): the hostile database on PostgreSQL 18 and 15, hardened (no CONNECT or
    TEMPORARY for PUBLIC), with settings and a comment of its own."""
    cluster = request.getfixturevalue(request.param)
    name = "hostile_" + secrets.token_hex(4)
    cluster.create_database(name)
    with cluster.connect(name) as conn:
        conn.execute(HOSTILE)
    with cluster.connect() as conn:
        zoo.ensure_role(conn, zoo.READER_ROLE)
        for statement in ("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC",
                          "GRANT CONNECT ON DATABASE {} TO {}",
                          "ALTER DATABASE {} SET work_mem TO '7MB'",
                          "COMMENT ON DATABASE {} IS 'the app''s own comment'"):
            conn.execute(sql.SQL(statement).format(sql.Identifier(name), sql.Identifier(zoo.READER_ROLE)))
    with cluster.connect(name) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON comp TO {}").format(sql.Identifier(zoo.READER_ROLE)))
    env = PG18_PASSWORD_ENV if request.param == "pg18" else PG15_PASSWORD_ENV
    catalog = write_catalog({"h": pg_source(cluster, name, env, groups=GROUPS)})
    yield cluster, name, catalog
    _drop(cluster, name, f"{name}_copy")
    with cluster.connect() as conn:
        for (leftover,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                        (f"{name}\\_before\\_restore%",)).fetchall():
            _drop(cluster, leftover)


def cli(catalog, *args) -> int:
    return main(["--catalog", catalog.catalog_path, *args])


def latest(catalog, group: str):
    return LocalRepository(catalog.repository_root).latest("h", group, "daily")


def database_facts(cluster, db: str) -> tuple:
    """Privileges, owner, settings and comment of a database, as the server keeps them."""
    with cluster.connect() as conn:
        acl, owner, comment = conn.execute(
            "SELECT datacl::text, pg_get_userbyid(datdba), shobj_description(oid, 'pg_database') "
            "FROM pg_database WHERE datname = %s", (db,)).fetchone()
        settings = conn.execute(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = %s AND s.setrole = 0", (db,)).fetchone()
    # the ACL names its grantor, the owner: compare it as written
    return acl, owner, comment, settings[0] if settings else None


def test_drill_passes_and_whole_restores_are_exact_with_privileges(hostile):
    """Items 1 and 6: composites with all-NULL fields drill and restore; the database's REVOKEs, grants,
    settings and comment come back, into another database and in place."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "full", "daily", P)
    outcome = restore_drill(catalog, latest(catalog, "full"))
    assert outcome.passed, outcome.message
    with cluster.connect(db) as conn:
        before = zoo.content(conn)
    facts = database_facts(cluster, db)
    assert "=Tc/" not in facts[0] and zoo.READER_ROLE in facts[0]
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--target-db", f"{db}_copy", "--confirm") == 0
    with cluster.connect(f"{db}_copy") as conn:
        assert zoo.content(conn) == before
    copy = database_facts(cluster, f"{db}_copy")
    assert copy[0] == facts[0].replace(db, f"{db}_copy") or copy[0] == facts[0], (copy, facts)
    assert copy[1:] == facts[1:]
    # in place: the swapped-in database is the hardened one, not a fresh one open to PUBLIC
    with cluster.connect(db) as conn:
        conn.execute("DELETE FROM comp")
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--confirm", "--terminate-connections") == 0
    with cluster.connect(db) as conn:
        assert zoo.content(conn) == before
    assert database_facts(cluster, db) == facts


def test_tables_restore_of_an_inheritance_parent_leaves_its_children(hostile, capsys):
    """Item 2: `--tables public.p` replaced the rows of p's children too, and their own columns were lost."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "full", "daily", P)
    with cluster.connect(db) as conn:
        conn.execute("UPDATE ONLY p SET v = 'changed'")
        conn.execute("INSERT INTO ca VALUES (4, 'new child', 40)")
        children = conn.execute("SELECT * FROM ONLY ca ORDER BY id").fetchall()
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--tables", "public.p", "--confirm") == 0
    with cluster.connect(db) as conn:
        assert conn.execute("SELECT * FROM ONLY p").fetchall() == [(1, "parent")]
        assert conn.execute("SELECT * FROM ONLY ca ORDER BY id").fetchall() == children  # untouched, all columns
        schema = postgres.safety_schemas(conn)[-1]
        saved = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "public.p"))).fetchall()
        assert saved == [(1, "changed")]  # the replaced rows, and only those


def test_tables_restore_of_a_table_without_columns(hostile):
    """Item 4: COPY "public"."nocols" () FROM STDIN was a syntax error."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "full", "daily", P)
    with cluster.connect(db) as conn:
        conn.execute("INSERT INTO nocols DEFAULT VALUES")
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--tables", "public.nocols", "--confirm") == 0
    with cluster.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM nocols").fetchone()[0] == 2


def test_tables_restore_keeps_old_rows_under_a_not_valid_constraint(hostile):
    """Item 5: rows older than a NOT VALID check could not be loaded; the constraint stays NOT VALID."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "full", "daily", P)
    with cluster.connect(db) as conn:
        conn.execute("DELETE FROM nv")
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--tables", "public.nv", "--confirm") == 0
    with cluster.connect(db) as conn:
        assert conn.execute("SELECT * FROM nv ORDER BY id").fetchall() == [(1, -5), (2, 3)]
        assert conn.execute("SELECT convalidated, pg_get_constraintdef(oid) FROM pg_constraint "
                            "WHERE conname = 'positive'").fetchone() == (False, "CHECK ((n > 0)) NOT VALID")
        with pytest.raises(Exception, match="positive"):
            conn.execute("INSERT INTO nv VALUES (3, -1)")


def test_group_restore_and_drill_keep_a_trigger_whose_function_nothing_else_selects(hostile):
    """Item 3: the group `trig` lost its trigger (and the trigger's comment); the drill passed."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "trig", "daily", P)
    outcome = restore_drill(catalog, latest(catalog, "trig"))
    assert outcome.passed, outcome.message
    assert cli(catalog, "restore", "--source", "h", "--group", "trig", "--target-db", f"{db}_copy", "--confirm") == 0
    with cluster.connect(f"{db}_copy") as conn:
        assert conn.execute("SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE tgname = 'trig_stamp'"
                            ).fetchone() == ("stamps rows",)
        conn.execute("INSERT INTO trig (id) VALUES (3)")
        assert conn.execute("SELECT v FROM trig WHERE id = 3").fetchone() == ("stamped",)
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'nv'").fetchone() == (0,)


def test_a_failed_parallel_restore_is_tried_once_serially(hostile, monkeypatch):
    """Item 8: PostgreSQL races in some parallel restores; the catalog sets the jobs (for archives of 64 MiB and
    more; smaller ones restore serially unless --jobs asks otherwise), and a failed parallel restore is tried
    again serially into a fresh database (said in the metadata) before it counts."""
    cluster, db, catalog = hostile
    run_backup(catalog, "h", "full", "daily", P)
    real, seen = postgres.pg_restore, []

    def racy(ep, archive, *, jobs=2, **kw):
        seen.append(jobs)
        real(ep, archive, jobs=jobs, **kw)  # leaves a populated database behind, as a failed restore would
        if jobs > 1:
            raise BackupError('pg_restore failed: there is no unique constraint matching given keys for "x"')

    monkeypatch.setattr(postgres, "pg_restore", racy)
    # a small archive restores serially unless jobs are asked for (parallelism only costs there)
    outcome = restore_drill(catalog, latest(catalog, "full"))
    assert outcome.passed and seen == [1] and "pg_restore_retried_serially" not in outcome.metadata
    # an archive as big as the threshold gets the catalog's jobs
    from backup_assets.core.verify import restore_drill as drill_module

    monkeypatch.setattr(drill_module, "SERIAL_BELOW_BYTES", 0)
    seen.clear()
    outcome = restore_drill(catalog, latest(catalog, "full"))
    assert outcome.passed, outcome.message
    assert seen == [2, 1]
    assert "no unique constraint" in outcome.metadata["pg_restore_retried_serially"]
    # the catalog's jobs: 1 never needs the retry
    data = catalog.model_dump()
    data["restore"]["jobs"] = 1
    from backup_assets.catalog import parse_catalog

    serial = parse_catalog({k: v for k, v in data.items() if k != "catalog_path"})
    seen.clear()
    assert restore_drill(serial, latest(catalog, "full")).passed and seen == [1]
    seen.clear()
    assert cli(catalog, "restore", "--source", "h", "--group", "full", "--target-db", f"{db}_copy", "--confirm",
               "--jobs", "3") == 0
    assert seen == [3, 1]


def test_a_wal_mode_sqlite_store_comes_back_in_wal_mode(write_catalog, tmp_path):
    """Item 7: the artifact is in rollback-journal mode; the restored store must be as it was."""
    store = tmp_path / "data" / "app.db"
    store.parent.mkdir()
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA user_version = 7")
        conn.execute("PRAGMA application_id = 1096174411")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO t (v) VALUES (?)", [("a",), ("b",)])
    catalog = write_catalog({"s": {"engine": "sqlite", "path": str(store), "tables": ["t"]}})
    m = run_backup(catalog, "s", "full", "daily", P)
    assert m.file_settings["journal_mode"] == "wal" and m.file_settings["user_version"] == 7
    backup = LocalRepository(catalog.repository_root).latest("s", "full", "daily")
    outcome = restore_drill(catalog, backup)
    assert outcome.passed, outcome.message
    target = tmp_path / "restored.db"
    assert cli(catalog, "restore", "--source", "s", "--group", "full", "--target-file", str(target), "--confirm") == 0
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (7,)
        assert conn.execute("PRAGMA application_id").fetchone() == (1096174411,)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_the_sqlite_drill_fails_when_a_setting_cannot_come_back(write_catalog, tmp_path, monkeypatch):
    store = tmp_path / "app.db"
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    catalog = write_catalog({"s": {"engine": "sqlite", "path": str(store), "tables": ["t"]}})
    run_backup(catalog, "s", "full", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("s", "full", "daily")
    from backup_assets.core.engines import sqlite as engine

    monkeypatch.setattr(engine, "apply_file_settings", lambda path, settings: engine.settings_differences(path, settings))
    outcome = restore_drill(catalog, backup)
    assert not outcome.passed and "SQLite journal_mode is False after the restore, the store had True" in outcome.message


# a statement on the privileges of the large object (its oid, and the reader role, spelled as an identifier)
LO_PRIVILEGE = ("DO $$BEGIN EXECUTE format('{statement}', (SELECT oid FROM pg_largeobject_metadata), "
                "{{reader_literal}}); END$$")
DAMAGE = {
    "trigger": ("DROP TRIGGER trig_stamp ON trig", "TRIGGER trig trig_stamp in schema public is missing"),
    "trigger comment": ("COMMENT ON TRIGGER trig_stamp ON trig IS NULL", "COMMENT TRIGGER trig_stamp ON trig"),
    "policy": ("DROP POLICY positive_ids ON trig", "POLICY trig positive_ids in schema public is missing"),
    "row security": ("ALTER TABLE trig DISABLE ROW LEVEL SECURITY", "ROW SECURITY trig in schema public is missing"),
    "grant": ("REVOKE SELECT ON comp FROM {reader}", "ACL TABLE comp in schema public is missing"),
    "revoke": ("GRANT EXECUTE ON FUNCTION stamp() TO PUBLIC", "ACL FUNCTION stamp() in schema public"),
    "comment": ("COMMENT ON TABLE comp IS 'changed'", "COMMENT TABLE comp in schema public differs after the restore"),
    "not valid": ("ALTER TABLE nv DROP CONSTRAINT positive", "CONSTRAINT nv positive in schema public is missing"),
    "column default": ("ALTER TABLE p ALTER COLUMN v SET DEFAULT 'x'", "TABLE p in schema public differs"),
    "large object": ("SELECT lo_unlink(oid) FROM pg_largeobject_metadata", "large objects: 0 (0 bytes) after the restore, "
                                                                        "the archive holds 1 (3 bytes)"),
    "large object content": ("SELECT lo_put(oid, 0, '\\x01'::bytea) FROM pg_largeobject_metadata",
                             "large objects differ in content"),
    "large object grant": (LO_PRIVILEGE.format(statement="REVOKE SELECT ON LARGE OBJECT %s FROM %s"),
                           "privileges differ after the restore: the archive grants SELECT to "),
    "large object public": (LO_PRIVILEGE.format(statement="GRANT UPDATE ON LARGE OBJECT %s TO PUBLIC"),
                            "UPDATE to PUBLIC"),
    "extra function": ("CREATE FUNCTION extra() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                       "FUNCTION extra() in schema public exists after the restore but not in the archive"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_drill_names_what_a_restored_copy_lost(pg18, write_catalog, damage, monkeypatch):
    """Rows and counts alone would pass: the drill compares every definition, privilege and large object."""
    name = "damaged_" + secrets.token_hex(4)
    pg18.create_database(name)
    try:
        with pg18.connect(name) as conn:
            conn.execute(HOSTILE)
            zoo.ensure_role(conn, zoo.READER_ROLE)
            conn.execute(sql.SQL("GRANT SELECT ON comp TO {}").format(sql.Identifier(zoo.READER_ROLE)))
            conn.execute(LO_PRIVILEGE.format(statement="GRANT SELECT ON LARGE OBJECT %s TO %s").format(
                reader_literal=sql.Literal(sql.Identifier(zoo.READER_ROLE).as_string(conn)).as_string(conn)))
        catalog = write_catalog({"h": pg_source(pg18, name, groups=GROUPS)})
        run_backup(catalog, "h", "full", "daily", P)
        good = restore_drill(catalog, latest(catalog, "full"))
        assert good.passed, good.message
        assert good.metadata["objects"]["TRIGGER"] == 1 and good.metadata["large_objects"] == {"count": 1, "bytes": 3}
        assert good.metadata["objects_compared"] == "definitions"
        from backup_assets.core.verify import restore_drill as verify_restore_drill

        real = verify_restore_drill.pg_restore_archive
        statement, expected = DAMAGE[damage]

        def restore_then_damage(catalog_, backup_, target, raw, **kw):
            real(catalog_, backup_, target, raw, **kw)
            with postgres.connect(target) as conn:
                reader = sql.Identifier(zoo.READER_ROLE).as_string(conn)
                conn.execute(statement.format(reader=reader, reader_literal=sql.Literal(reader).as_string(conn)))

        monkeypatch.setattr(verify_restore_drill, "pg_restore_archive", restore_then_damage)
        outcome = restore_drill(catalog, latest(catalog, "full"))
        assert not outcome.passed
        assert expected in outcome.message, outcome.message
    finally:
        _drop(pg18, name)
