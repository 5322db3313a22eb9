"""Restores through the CLI and the Dagster job: real round trips, safety copies, every refusal."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import dagster as dg
import pytest

from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.defs.build import build_definitions

from .conftest import pg_source

P = "2026-11-20"


def databases(cluster) -> set[str]:
    with cluster.connect() as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def count(cluster, db, table) -> int:
    with cluster.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def cli(catalog, *args) -> int:
    return main(["--catalog", catalog.catalog_path, *args])


@pytest.fixture
def pg_catalog(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    for group in ("full", "core", "kb"):
        run_backup(catalog, "myloware", group, "daily", P)
    return catalog


def drop_like(cluster, pattern: str) -> None:
    with cluster.connect() as conn:
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)).fetchall():
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_full_restore_in_place_keeps_a_usable_safety_copy(pg18, myloware_db, pg_catalog, capsys):
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM hitl_approvals")
        conn.execute("CREATE TABLE scratch_after_backup (x int)")
    assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "full", "--confirm") == 0
    out = capsys.readouterr().out
    assert "public.hitl_approvals" in out and "differs" not in out
    assert count(pg18, myloware_db, "hitl_approvals") == 100
    with pg18.connect(myloware_db) as conn:
        assert conn.execute("SELECT to_regclass('scratch_after_backup')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexdef ILIKE '%hnsw%'").fetchone()[0] == 1
    safety = [d for d in databases(pg18) if d.startswith(f"{myloware_db[:40]}_before_restore_")]
    assert len(safety) == 1
    assert count(pg18, safety[0], "hitl_approvals") == 0
    assert count(pg18, safety[0], "scratch_after_backup") == 0
    assert not [d for d in databases(pg18) if "_restoring_" in d]
    drop_like(pg18, f"{myloware_db[:40]}_before_restore_%")


def test_restore_to_another_database_leaves_the_source_alone(pg18, myloware_db, pg_catalog):
    target = f"{myloware_db[:40]}_staging"
    with pg18.connect(myloware_db) as conn:
        conn.execute("INSERT INTO runs (project, persona, status) VALUES ('p', 'editor', 'running')")
    assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "kb", "--target-db", target, "--confirm") == 0
    assert count(pg18, target, "kb_embeddings") == 200
    with pg18.connect(myloware_db) as a, pg18.connect(target) as b:
        q = "SELECT embedding::text FROM kb_embeddings WHERE embedding IS NOT NULL ORDER BY id LIMIT 1 OFFSET 3"
        assert a.execute(q).fetchone() == b.execute(q).fetchone()
        assert b.execute("SELECT indexname FROM pg_indexes WHERE indexdef ILIKE '%USING hnsw%'").fetchone()
        assert b.execute("SELECT to_regclass('runs')").fetchone()[0] is None
    assert count(pg18, myloware_db, "runs") == 301
    drop_like(pg18, target)


def test_core_tables_only_replaces_them_and_nothing_else(pg18, myloware_db, pg_catalog, capsys):
    with pg18.connect(myloware_db) as conn:
        checkpoints = conn.execute("SELECT count(*) FROM orchestration_checkpoints").fetchone()[0]
        conn.execute("DELETE FROM artifacts WHERE id % 2 = 0")
        conn.execute("UPDATE runs SET status = 'cancelled'")
        conn.execute("INSERT INTO socials (platform, handle) VALUES ('x', '@after_backup')")
    assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "core",
               "--tables", "runs", "artifacts", "webhook_events", "hitl_approvals", "--confirm") == 0
    assert "public.artifacts" in capsys.readouterr().out
    with pg18.connect(myloware_db) as conn:
        assert conn.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 900
        assert conn.execute("SELECT count(*) FROM runs WHERE status = 'cancelled'").fetchone()[0] == 60
        # tables outside the subset are untouched, although they reference runs with ON DELETE CASCADE
        assert conn.execute("SELECT count(*) FROM orchestration_checkpoints").fetchone()[0] == checkpoints
        assert conn.execute("SELECT count(*) FROM socials WHERE handle = '@after_backup'").fetchone()[0] == 1
        # the sequences moved past the restored ids: new rows do not collide
        conn.execute("INSERT INTO runs (project, persona, status) VALUES ('p', 'editor', 'running')")
        schema = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'before_restore_%'").fetchone()[0]
        assert conn.execute(f'SELECT count(*) FROM "{schema}"."public.artifacts"').fetchone()[0] == 450


def test_sqlite_round_trip_with_safety_copy(miyabi_db, write_catalog, capsys):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    run_backup(catalog, "miyabi", "full", "daily", P)
    with sqlite3.connect(miyabi_db) as conn:
        conn.execute("DELETE FROM checkpoints")
    assert cli(catalog, "restore", "--source", "miyabi", "--group", "full", "--confirm") == 0
    with sqlite3.connect(miyabi_db) as conn:
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 900
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    safety = list(miyabi_db.parent.glob("miyabi.db.before-restore-*"))
    assert len(safety) == 1
    with sqlite3.connect(safety[0]) as conn:
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0
    assert not list(miyabi_db.parent.glob("*.partial-*"))


KILLABLE_RESTORE = r"""
import sys
from backup_assets.cli import main
sys.exit(main(["--catalog", sys.argv[1], "restore", "--source", "myloware", "--group", "full", "--confirm"]))
"""


def test_restore_killed_midway_leaves_the_target_unchanged(pg18, myloware_db, pg_catalog):
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM webhook_events WHERE id <= 100")
    before = count(pg18, myloware_db, "webhook_events")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_RESTORE, pg_catalog.catalog_path], start_new_session=True)
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and seen is None:
        seen = next((d for d in databases(pg18) if "_restoring_" in d), None)
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, "the restore never created its temporary database"
    assert count(pg18, myloware_db, "webhook_events") == before
    assert not [d for d in databases(pg18) if "_before_restore_" in d]
    # the next restore removes the leftover and succeeds
    assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "full", "--confirm") == 0
    assert not [d for d in databases(pg18) if "_restoring_" in d]
    assert count(pg18, myloware_db, "webhook_events") == 500
    drop_like(pg18, f"{myloware_db[:40]}_before_restore_%")


def test_without_confirm_and_without_a_terminal_it_refuses(pg18, myloware_db, pg_catalog, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    before = databases(pg18)
    assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "full") == 2
    err = capsys.readouterr().err
    assert "refusing without --confirm" in err and "this would replace database" in err
    assert databases(pg18) == before


def test_connected_sessions_are_refused_unless_terminated(pg18, myloware_db, pg_catalog, capsys):
    holder = pg18.connect(myloware_db)
    try:
        assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "full", "--confirm") == 1
        assert "other session(s) connected" in capsys.readouterr().err
        assert not [d for d in databases(pg18) if "_restoring_" in d or "_before_restore_" in d]
        assert cli(pg_catalog, "restore", "--source", "myloware", "--group", "full", "--confirm",
                   "--terminate-connections") == 0
    finally:
        holder.close()
    drop_like(pg18, f"{myloware_db[:40]}_before_restore_%")


def _errors(pg18, pg_catalog, write_catalog, myloware_db, tmp_path):
    repo = LocalRepository(pg_catalog.repository_root)
    full = repo.latest("myloware", "full", "daily")
    from backup_assets.demo.cluster import free_port

    def flipped():
        data = bytearray(full.artifact_path.read_bytes())
        data[len(data) // 3] ^= 0x01
        full.artifact_path.write_bytes(bytes(data))
        return pg_catalog, ["--source", "myloware", "--group", "full", "--partition", P]

    def missing():
        full.artifact_path.unlink()
        return pg_catalog, ["--file", str(full.artifact_path)]

    def old_pg_restore():
        cat = write_catalog({"myloware": pg_source(pg18, myloware_db, pg_bin_dir="/usr/lib/postgresql/15/bin")})
        return cat, ["--source", "myloware", "--group", "full"]

    def unreachable():
        src = pg_source(pg18, myloware_db)
        src["connection"]["port"] = free_port()
        return write_catalog({"myloware": src}), ["--source", "myloware", "--group", "full"]

    return {
        "no backup matches": (lambda: (pg_catalog, ["--source", "myloware", "--group", "full", "--partition", "2026-11-02"]),
                              "no backup of myloware/full for partition 2026-11-02"),
        "checksum mismatch": (flipped, "refusing to restore: .* sha256 .* differs"),
        "artifact missing": (missing, "artifact is missing"),
        "pg_restore older than the dump": (old_pg_restore, r"pg_restore 15 in pg_bin_dir .* does not fit: this needs pg_restore of major version 18"),
        "server unreachable": (unreachable, "cannot connect to PostgreSQL at 127.0.0.1"),
        "bad target name": (lambda: (pg_catalog, ["--source", "myloware", "--group", "full", "--target-db", "x; DROP"]),
                            "target database name 'x; DROP' is not a valid identifier"),
        "file outside the repository": (lambda: (pg_catalog, ["--file", "/etc/passwd"]), "outside the backup repository"),
        "path tricks": (lambda: (pg_catalog, ["--file", f"{pg_catalog.repository_root}/postgres/../../catalog.yaml"]),
                        "must not contain '..'"),
        "postgres backup onto a sqlite target": (
            lambda: (pg_catalog, ["--source", "myloware", "--group", "core", "--target-file", str(tmp_path / "x.db")]),
            "is a PostgreSQL backup and cannot be restored onto a SQLite file"),
        "unknown table": (lambda: (pg_catalog, ["--source", "myloware", "--group", "core", "--tables", "kb_documents"]),
                          "does not hold table\\(s\\) public.kb_documents"),
    }


ERROR_CASES = ["no backup matches", "checksum mismatch", "artifact missing", "pg_restore older than the dump",
               "server unreachable", "bad target name", "file outside the repository", "path tricks",
               "postgres backup onto a sqlite target", "unknown table"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_restore_errors_are_one_line_nonzero_and_change_nothing(case, pg18, myloware_db, pg_catalog, write_catalog,
                                                                 tmp_path, capsys):
    import re

    if case == "pg_restore older than the dump" and not os.path.exists("/usr/lib/postgresql/15/bin/pg_restore"):
        pytest.fail("Debian's PostgreSQL 15 client is needed for this case")
    make, pattern = _errors(pg18, pg_catalog, write_catalog, myloware_db, tmp_path)[case]
    catalog, args = make()
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM runs WHERE id > 250")
    before_dbs = databases(pg18)
    code = main(["--catalog", catalog.catalog_path, "restore", *args, "--confirm"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("backup-assets:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert databases(pg18) == before_dbs
    assert count(pg18, myloware_db, "runs") == 250
    assert pg18.password not in err


def test_sqlite_backup_onto_postgres_target_is_refused(miyabi_db, write_catalog, capsys):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    run_backup(catalog, "miyabi", "full", "daily", P)
    assert cli(catalog, "restore", "--source", "miyabi", "--group", "full", "--target-db", "x", "--confirm") == 1
    assert "is a SQLite backup" in capsys.readouterr().err


def test_list_and_verify_commands(pg_catalog, capsys):
    import json

    assert cli(pg_catalog, "verify", "--source", "myloware", "--group", "core", "--drill", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and [c["check"] for c in report["checks"]] == ["artifact_intact", "archive_readable", "restore_drill"]
    assert cli(pg_catalog, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["group"], r["verified"]) for r in rows} == {("full", "unknown"), ("core", "drilled"), ("kb", "unknown")}
    assert cli(pg_catalog, "list", "--group", "core") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["SOURCE", "GROUP", "TIER", "PARTITION", "CREATED"]
    assert "drilled" in out


def test_restore_job_refuses_without_confirm_and_restores_with_it(pg18, myloware_db, pg_catalog):
    job = build_definitions(pg_catalog).resolve_job_def("restore")
    target = f"{myloware_db[:40]}_job"
    config = {"source": "myloware", "group": "core", "target_database": target}
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "refusing without confirm: true" in failure.event_specific_data.error.message
    assert target not in databases(pg18)
    config["confirm"] = True
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert count(pg18, target, "runs") == 300
    drop_like(pg18, target)


def test_pg_restore_into_a_fresh_database_does_not_wait_for_a_wal_flush_per_object(pg18, tmp_path):
    """pg_restore into a drill's scratch or a restore's temporary database runs its sessions with
    synchronous_commit off (a commit per object otherwise waits for its WAL flush: thousands for a schema-rich
    database); what it restored is all there, and the commit that follows (a restore's swap) flushes it."""
    import secrets

    from psycopg import sql

    from backup_assets.core.engines import postgres
    from backup_assets.demo.cluster import embedded_bin_dir

    src, dst = "sc_src_" + secrets.token_hex(3), "sc_dst_" + secrets.token_hex(3)
    pg18.create_database(src)
    pg18.create_database(dst)
    with pg18.connect(src) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)")
        conn.execute("CREATE FUNCTION setting() RETURNS text LANGUAGE sql AS $$ SELECT current_setting('synchronous_commit') $$")
    archive = tmp_path / "src.dump"
    env = dict(os.environ, PGPASSWORD=pg18.password)
    subprocess.run([str(embedded_bin_dir() / "pg_dump"), "-Fc", "-h", pg18.host, "-p", str(pg18.port), "-U",
                    pg18.superuser, "-f", str(archive), src], check=True, env=env)
    seen = tmp_path / "seen"
    tool = tmp_path / "pg_restore"  # the real pg_restore, telling what its sessions were given
    tool.write_text(f'#!/bin/sh\nprintf "%s" "$PGOPTIONS" > {seen}\nexec {embedded_bin_dir() / "pg_restore"} "$@"\n')
    tool.chmod(0o755)
    ep = postgres.Endpoint(pg18.host, pg18.port, pg18.superuser, dst, pg18.password)
    postgres.pg_restore(ep, archive, tool=tool, jobs=2)
    assert seen.read_text() == "-c synchronous_commit=off"
    with pg18.connect(dst) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM t").fetchone() == (100, 5050)
        assert conn.execute("SELECT setting()").fetchone() == ("on",)  # a later session: the server's default
    with pg18.connect() as conn:
        for db in (src, dst):
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
