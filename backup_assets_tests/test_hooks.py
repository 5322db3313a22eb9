"""The runbooks' steps around a restore (catalog hooks) and who may restore in place from the UI."""

from __future__ import annotations

import json
import sys
import time

import dagster as dg
import pytest

from backup_assets.catalog import CatalogError, parse_catalog
from backup_assets.cli import main
from backup_assets.core.backup.take import run_backup
from backup_assets.core.verify.checks import find_backup
from backup_assets.core.verify.restore_drill import restore_drill
from backup_assets.defs.build import build_definitions

from .conftest import pg_source

P = "2026-11-20"

# a hook that records its stage and what it was told, and proves it can reach the target with libpq's
# environment alone (no password on its command line)
RECORD = f"""{sys.executable} -c '
import json, os, sys
import psycopg
env = {{k: os.environ.get(k, "") for k in ("BACKUP_ASSETS_HOOK", "BACKUP_ASSETS_TARGET", "BACKUP_ASSETS_SOURCE",
       "BACKUP_ASSETS_GROUP", "BACKUP_ASSETS_RESTORE_OK", "BACKUP_ASSETS_SAFETY_COPY", "BACKUP_ASSETS_DRILL",
       "PGDATABASE", "BACKUP_ASSETS_DATABASE_URL")}}
env["has_password"] = bool(os.environ.get("PGPASSWORD"))
if os.environ.get("PGDATABASE"):
    with psycopg.connect(os.environ["BACKUP_ASSETS_DATABASE_URL"]) as conn:
        env["runs"] = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
open(sys.argv[1], "a").write(json.dumps(env) + "\\n")
print("hook saw password", os.environ.get("PGPASSWORD"))
' """


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def count(cluster, db, table) -> int:
    with cluster.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def databases(cluster) -> set[str]:
    with cluster.connect() as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def drop_like(cluster, pattern: str) -> None:
    with cluster.connect() as conn:
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)).fetchall():
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def hooked(pg18, myloware_db, write_catalog, tmp_path):
    """A catalog whose source has hooks; returns (make, log): make(**hooks) writes it and backs up core."""
    log = tmp_path / "hooks.jsonl"
    yield_ = _make(pg18, myloware_db, write_catalog)
    yield yield_, log
    drop_like(pg18, f"{myloware_db[:40]}_before_restore_%")


def _make(pg18, myloware_db, write_catalog):

    def make(backup: bool = True, top: dict | None = None, **hooks):
        catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, hooks=hooks)}, **(top or {}))
        if backup:
            run_backup(catalog, "myloware", "core", "daily", P)
        return catalog

    return make


def test_hooks_run_around_an_in_place_restore_with_the_target_in_their_environment(pg18, myloware_db, hooked, capsys):
    make, log = hooked
    cmd = RECORD + str(log)
    catalog = make(pre_restore=[cmd], post_restore=[cmd], verify=[cmd, ["true"]])
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM runs WHERE id > 250")
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "core", "--confirm"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    seen = records(log)
    assert [r["BACKUP_ASSETS_HOOK"] for r in seen] == ["pre_restore", "post_restore", "verify"]
    assert all(r["PGDATABASE"] == myloware_db and r["BACKUP_ASSETS_TARGET"] == myloware_db for r in seen)
    assert all(r["has_password"] and pg18.password not in r["BACKUP_ASSETS_DATABASE_URL"] for r in seen)
    assert [r["runs"] for r in seen] == [250, 300, 300]  # pre sees the old data, post and verify the restored
    assert seen[1]["BACKUP_ASSETS_RESTORE_OK"] == "1" and "_before_restore_" in seen[1]["BACKUP_ASSETS_SAFETY_COPY"]
    # the hook printed the password: the log shows it scrubbed
    assert "hook saw password ***" in captured.err and pg18.password not in captured.err + captured.out


def test_a_failing_pre_restore_hook_aborts_before_anything_is_touched(pg18, myloware_db, hooked, capsys):
    make, log = hooked
    catalog = make(pre_restore=["echo stopping app; exit 3"], post_restore=[RECORD + str(log)])
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM runs WHERE id > 250")
    before = databases(pg18)
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "core", "--confirm"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("backup-assets:")]
    assert len(lines) == 1 and "pre_restore hook failed, nothing was changed" in lines[0] and "exited with 3" in lines[0]
    assert "stopping app" in err
    assert databases(pg18) == before and count(pg18, myloware_db, "runs") == 250
    assert records(log) == []  # nothing was stopped by us, so nothing to bring back


def test_a_hook_that_hangs_is_killed_at_its_timeout(pg18, myloware_db, hooked, capsys):
    make, _ = hooked
    catalog = make(pre_restore=["sleep 60 & sleep 60"], timeout_s=1)
    started = time.monotonic()
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "core", "--confirm"])
    assert code == 1 and time.monotonic() - started < 30
    assert "did not finish within 1s (killed)" in capsys.readouterr().err


def test_post_restore_runs_after_a_failed_restore_to_bring_the_application_back(pg18, myloware_db, hooked, capsys):
    make, log = hooked
    catalog = make(backup=False, pre_restore=["true"], post_restore=[RECORD + str(log)])
    run_backup(catalog, "myloware", "full", "daily", P)
    with pg18.connect(myloware_db):  # the application is still connected: the whole restore refuses
        code = main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "full",
                     "--confirm"])
    err = capsys.readouterr().err
    assert code == 1 and "other session(s) connected" in err
    assert [(r["BACKUP_ASSETS_HOOK"], r["BACKUP_ASSETS_RESTORE_OK"]) for r in records(log)] == [("post_restore", "0")]


def test_a_failing_verify_hook_is_loud_and_names_the_safety_copy(pg18, myloware_db, hooked, capsys):
    make, _ = hooked
    catalog = make(verify=["echo health check: 503; exit 1"])
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM runs WHERE id > 250")
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "core", "--confirm"])
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("HOOK FAILED")][0]
    assert "the verify hook failed" in line and "health check: 503" in line
    assert f"the previous data is kept as {myloware_db[:40]}_before_restore_" in line
    assert count(pg18, myloware_db, "runs") == 300  # the restore itself happened


def test_restores_into_another_database_skip_the_application_hooks(pg18, myloware_db, hooked, capsys):
    make, log = hooked
    cmd = RECORD + str(log)
    catalog = make(pre_restore=[cmd], post_restore=[cmd], verify=[cmd])
    target = f"{myloware_db[:40]}_other"
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "myloware", "--group", "core",
                 "--target-db", target, "--confirm"]) == 0
    assert records(log) == []
    assert "hooks skipped" in capsys.readouterr().err
    drop_like(pg18, target)


def test_the_drill_runs_the_verify_hook_against_its_scratch_database(pg18, myloware_db, hooked):
    make, log = hooked
    catalog = make(verify=[RECORD + str(log)], verify_in_drill=True)
    backup = find_backup(catalog, "myloware", "core", "daily", P)
    outcome = restore_drill(catalog, backup)
    assert outcome.passed, outcome.message
    [seen] = records(log)
    assert seen["BACKUP_ASSETS_DRILL"] == "1" and seen["PGDATABASE"].startswith("drill_") and seen["runs"] == 300
    assert seen["PGDATABASE"] not in databases(pg18)  # the scratch database is gone again
    assert outcome.metadata["verify_hook"][0]["ok"]

    failing = make(backup=False, verify=["exit 7"], verify_in_drill=True)
    outcome = restore_drill(failing, backup)
    assert not outcome.passed and "verify hook failed on the drill's copy" in outcome.message


def test_sqlite_hooks_get_the_file(miyabi_db, write_catalog, tmp_path, capsys):
    log = tmp_path / "hooks.log"
    hook = f'echo "$BACKUP_ASSETS_HOOK $BACKUP_ASSETS_ENGINE $BACKUP_ASSETS_TARGET" >> {log}'
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db),
                                        "hooks": {"pre_restore": [hook], "post_restore": [hook], "verify": [hook]}}})
    run_backup(catalog, "miyabi", "full", "daily", P)
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "miyabi", "--group", "full", "--confirm"]) == 0
    assert log.read_text().splitlines() == [f"{stage} sqlite {miyabi_db}" for stage in ("pre_restore", "post_restore", "verify")]


@pytest.mark.parametrize("hooks, problem", [
    ({"pre_restore": [""]}, "sources.a.hooks.pre_restore"),
    ({"verify": [[]]}, "sources.a.hooks.verify"),
    ({"timeout_s": 0}, "sources.a.hooks.timeout_s"),
    ({"post_restor": ["x"]}, "sources.a.hooks.post_restor: unknown key"),
])
def test_bad_hooks_are_one_line_errors(hooks, problem, tmp_path):
    data = {"repository": {"root": str(tmp_path)}, "sources": {"a": {"engine": "sqlite", "path": "a.db", "hooks": hooks}}}
    with pytest.raises(CatalogError) as err:
        parse_catalog(data, source_name="c.yaml")
    assert str(err.value).startswith(f"c.yaml: {problem}") and "\n" not in str(err.value)


def test_the_restore_job_refuses_in_place_restores_unless_the_catalog_opts_in(pg18, myloware_db, hooked, miyabi_db,
                                                                               write_catalog):
    make, _ = hooked
    catalog = make()
    job = build_definitions(catalog).resolve_job_def("restore")
    config = {"source": "myloware", "group": "core", "confirm": True, "tables": ["runs"]}
    with pg18.connect(myloware_db) as conn:
        conn.execute("DELETE FROM runs WHERE id > 250")
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    message = [e for e in result.all_events if e.is_step_failure][0].event_specific_data.error.message
    assert "its own database in the catalog" in message and "refusing to replace database" in message
    assert "restore.allow_in_place_from_ui: true" in message and catalog.catalog_path in message
    assert count(pg18, myloware_db, "runs") == 250
    # naming the source's own database explicitly is the same thing
    config["target_database"] = myloware_db
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success and count(pg18, myloware_db, "runs") == 250

    allowed = make(backup=False, top={"restore": {"allow_in_place_from_ui": True}})
    job = build_definitions(allowed).resolve_job_def("restore")
    assert job.execute_in_process(run_config={"ops": {"restore_backup": {"config": config}}},
                                  instance=dg.DagsterInstance.ephemeral()).success
    assert count(pg18, myloware_db, "runs") == 300

    # SQLite: the source's own file is refused, another file is fine
    lite = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}})
    run_backup(lite, "miyabi", "full", "daily", P)
    job = build_definitions(lite).resolve_job_def("restore")
    own = {"source": "miyabi", "confirm": True}
    result = job.execute_in_process(run_config={"ops": {"restore_backup": {"config": own}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    other = {**own, "target_file": str(miyabi_db.parent / "copy.db")}
    assert job.execute_in_process(run_config={"ops": {"restore_backup": {"config": other}}},
                                  instance=dg.DagsterInstance.ephemeral()).success
    assert (miyabi_db.parent / "copy.db").exists()
