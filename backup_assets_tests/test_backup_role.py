"""The least privileges a backup role needs, each tested: a role that lacks one fails naming it.

A non-superuser with pg_read_all_data reads every table, except a table under row-level security (pg_dump
turns row_security off and refuses to dump a filtered table: the role needs BYPASSRLS) and large objects
(SELECT on each, or lo_compat_privileges); a drill needs a role that may create its scratch database
(CREATEDB, or a drill_server). With all of them the backup and its drill pass.
"""

from __future__ import annotations

import secrets

import pytest
from psycopg import sql

from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.restore_drill import restore_drill

P = "2026-11-20"
ROLE_PASSWORD_ENV = "BA_TEST_BACKUP_ROLE_PASSWORD"


@pytest.fixture
def least(pg18, write_catalog, monkeypatch):
    db, role = "least_" + secrets.token_hex(4), "backup_ro_" + secrets.token_hex(3)
    password = "ro-" + secrets.token_urlsafe(10)
    monkeypatch.setenv(ROLE_PASSWORD_ENV, password)
    pg18.create_database(db)
    with pg18.connect(db) as conn:
        conn.execute("CREATE TABLE open (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO open SELECT g, 'v' || g FROM generate_series(1, 20) g")
        conn.execute("CREATE TABLE guarded (id int PRIMARY KEY, tenant text)")
        conn.execute("INSERT INTO guarded VALUES (1, 'a'), (2, 'b')")
        conn.execute("ALTER TABLE guarded ENABLE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE guarded FORCE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY tenant_a ON guarded USING (tenant = 'a')")
        oid = conn.execute("SELECT lo_from_bytea(0, 'secret bytes'::bytea)").fetchone()[0]
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_read_all_data").format(
            sql.Identifier(role), sql.Literal(password)))
    catalog = write_catalog({"app": {"engine": "postgres", "groups": {"full": {}, "open": {"tables": ["open"]}},
                                     "globals": False, "connection": {
                                         "host": pg18.host, "port": pg18.port, "dbname": db, "user": role,
                                         "password_env": ROLE_PASSWORD_ENV}}})
    yield pg18, db, role, oid, catalog
    with pg18.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'drill\\_app\\_%'").fetchall():
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_each_missing_privilege_is_named_and_with_all_of_them_backup_and_drill_pass(least):
    cluster, db, role, oid, catalog = least
    with pytest.raises(BackupError, match=rf"role {role} cannot dump public\.guarded: row-level security .* BYPASSRLS"):
        run_backup(catalog, "app", "full", "daily", P)
    with cluster.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(role)))
    with pytest.raises(BackupError, match=rf"role {role} cannot read large object\(s\) {oid}: .*GRANT SELECT ON LARGE"):
        run_backup(catalog, "app", "full", "daily", P)
    with pytest.raises(BackupError, match="cannot read large object"):  # a group's archive holds them too
        run_backup(catalog, "app", "open", "daily", P)
    with cluster.connect(db) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON LARGE OBJECT {} TO {}").format(sql.Literal(oid), sql.Identifier(role)))
    m = run_backup(catalog, "app", "full", "daily", P)
    assert m.row_counts == {"public.open": 20, "public.guarded": 2}  # every row: no policy filtered them
    backup = LocalRepository(catalog.repository_root).latest("app", "full", "daily")
    outcome = restore_drill(catalog, backup)
    assert not outcome.passed
    assert f"role {role} on {cluster.host}:{cluster.port} may not create databases" in outcome.message
    assert "CREATEDB" in outcome.message and "drill_server" in outcome.message
    with cluster.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))
    outcome = restore_drill(catalog, backup)
    assert outcome.passed, outcome.message
    assert "not a superuser" in outcome.message and outcome.metadata["owners_restored"] is False
    assert outcome.metadata["large_objects"] == {"count": 1, "bytes": len("secret bytes")}
