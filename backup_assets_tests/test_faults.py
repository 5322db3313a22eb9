"""Faults: kill -9 at named points and at seeded random moments, corrupted backups, bad input.

After every kill the next operation (or `backup-assets doctor`) must leave: no partial counted
good, no leftovers (partial files, scratch folders, scratch databases), the target usable and
either as it was or fully restored.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from backup_assets.cli import main
from backup_assets.core.artifact import partial_path
from backup_assets.core.backup.take import run_backup
from backup_assets.core.failpoints import ENV as FAILPOINTS
from backup_assets.core.owner import Owner
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.records import read_status

from . import zoo
from .conftest import pg_source, reseal

P = "2026-11-20"
ROOT = Path(__file__).resolve().parents[1]


def child(catalog, *args, failpoint: str | None = None, **kw) -> subprocess.Popen:
    """The CLI in a child process (so it can really be killed)."""
    env = dict(os.environ, **({FAILPOINTS: failpoint} if failpoint else {}))
    env.pop("BACKUP_ASSETS_CATALOG", None)
    return subprocess.Popen([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path, *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def backup_child(catalog, source: str, group: str, partition: str, failpoint: str | None = None) -> subprocess.Popen:
    code = ("import sys; from backup_assets.catalog import load_catalog; from backup_assets.core.backup.take import run_backup; "
            "run_backup(load_catalog(sys.argv[1]), sys.argv[2], sys.argv[3], 'daily', sys.argv[4])")
    env = dict(os.environ, **({FAILPOINTS: failpoint} if failpoint else {}))
    return subprocess.Popen([sys.executable, "-c", code, catalog.catalog_path, source, group, partition], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def leftovers(catalog, cluster) -> list[str]:
    root = catalog.repository_root
    found = [str(p) for p in root.rglob("*") if ".partial-" in p.name]
    scratch = root / ".tmp"
    found += [str(p) for p in scratch.iterdir()] if scratch.is_dir() else []
    with cluster.connect() as conn:
        found += [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'drill\\_%' OR datname LIKE '%\\_restoring\\_%' "
            "OR NOT datallowconn AND datname NOT IN ('template0')").fetchall()]
    return found


def all_good(catalog) -> None:
    """Every backup that counts (has a manifest) verifies."""
    for b in LocalRepository(catalog.repository_root).backups(strict=True):
        assert artifact_intact(b).passed, b.artifact_path


@pytest.fixture
def zoo_db(pg18):
    name = "faults_" + os.urandom(4).hex()
    with pg18.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with pg18.connect(name) as conn:
        zoo.build(conn)
    yield name
    with pg18.connect() as conn:
        # a killed client's backend may still be finishing a DROP DATABASE of its own: tolerate that
        for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",)).fetchall():
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


@pytest.fixture
def catalog(pg18, zoo_db, write_catalog):
    c = write_catalog({"zoo": pg_source(pg18, zoo_db, groups={"full": {}, "some": {"tables": ["public.t", "billing.t"]}})},
                      tiers={"daily": {"drill": True}})
    run_backup(c, "zoo", "full", "daily", P)
    return c


def content_of(cluster, db) -> dict:
    with cluster.connect(db) as conn:
        return zoo.content(conn)


@pytest.mark.parametrize("point", ["artifact.before_rename", "artifact.renamed"])
def test_a_backup_killed_between_writes_never_counts_and_leaves_nothing(pg18, catalog, point):
    proc = backup_child(catalog, "zoo", "full", "2026-11-21", failpoint=point)
    assert proc.wait(timeout=120) == -9
    repo = LocalRepository(catalog.repository_root)
    assert repo.latest("zoo", "full", "daily", "2026-11-21") is None  # nothing partial counts
    if point == "artifact.renamed":
        [orphan] = repo.orphans()
        # a newer artifact without manifest hides nothing: the older complete backup is found
        run_backup(catalog, "zoo", "full", "daily", P)
        assert main(["--catalog", catalog.catalog_path, "verify", "--source", "zoo", "--group", "full"]) == 0
        os.utime(orphan, (time.time() - 3600, time.time() - 3600))
        assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
        assert not repo.orphans()
    else:
        # the next operation of any kind sweeps the dead writer's partial at once
        assert main(["--catalog", catalog.catalog_path, "list"]) == 0
    assert not leftovers(catalog, pg18)
    all_good(catalog)


def test_a_killed_drill_leaves_nothing_after_the_next_operation(pg18, catalog):
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    proc = child(catalog, "verify", "--drill", str(backup.artifact_path), failpoint="drill.decoded")
    assert proc.wait(timeout=120) == -9
    scratch = [p for p in (catalog.repository_root / ".tmp").iterdir()]
    assert scratch, "the killed drill left its scratch folder"
    for folder in scratch:  # plaintext of the database: owner-only
        assert folder.stat().st_mode & 0o777 == 0o700
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in folder.iterdir())
    assert leftovers(catalog, pg18)
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert not leftovers(catalog, pg18)


@pytest.mark.parametrize("point", ["restore.temp", "restore.swap.renaming", "restore.swap.renamed"])
def test_a_restore_killed_anywhere_leaves_the_target_usable_and_whole(pg18, catalog, zoo_db, point, capsys):
    backup_content = content_of(pg18, zoo_db)
    with pg18.connect(zoo_db) as conn:
        conn.execute("INSERT INTO public.t VALUES (4242)")
    changed = content_of(pg18, zoo_db)
    proc = child(catalog, "restore", "--source", "zoo", "--group", "full", "--confirm", failpoint=point)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()
    # before any repair: the target takes connections and holds the old or the restored data, whole
    with pg18.connect() as conn:
        assert conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (zoo_db,)).fetchone() == (True,)
    with pg18.connect(zoo_db) as conn:
        conn.execute("SELECT 1")
    assert content_of(pg18, zoo_db) == (backup_content if point == "restore.swap.renamed" else changed)
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    said = capsys.readouterr().out
    assert not leftovers(catalog, pg18), said
    assert "connections allowed again" not in said
    # and the next restore works
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--confirm",
                 "--no-safety-copy"]) == 0
    assert content_of(pg18, zoo_db) == backup_content


def test_a_swap_left_by_an_earlier_version_is_repaired(pg18, catalog, zoo_db, capsys):
    """Restores before 2026-12 switched connections off for the swap and marked the target; a kill
    left it refusing connections. The next restore or doctor still gives it back."""
    from backup_assets.core.engines import pg_databases
    from backup_assets.core.restore.choose import SWAP_MARK
    marker = pg_databases.marker(SWAP_MARK, target=zoo_db, temp="x", safety="y", comment="its own", allow=True)
    data = pg_databases.read_marker(marker, SWAP_MARK)
    data.update(pid=999999)  # a dead owner
    with pg18.connect() as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(zoo_db), sql.Literal(json.dumps(data))))
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(zoo_db)))
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert "connections allowed again" in capsys.readouterr().out
    with pg18.connect() as conn:
        assert conn.execute("SELECT datallowconn, shobj_description(oid, 'pg_database') FROM pg_database "
                            "WHERE datname = %s", (zoo_db,)).fetchone() == (True, "its own")


def test_seeded_random_kills_of_backups_and_restores(pg18, catalog, zoo_db):
    rng = random.Random(20261123)
    backup_content = content_of(pg18, zoo_db)
    for i in range(4):
        proc = backup_child(catalog, "zoo", "full", "2026-11-22")
        time.sleep(rng.uniform(0.05, 0.8))
        proc.kill()
        proc.wait()
        run_backup(catalog, "zoo", "some", "daily", "2026-11-22")  # the next operation
        assert not [p for p in catalog.repository_root.rglob("*") if ".partial-" in p.name]
        all_good(catalog)
    for i in range(3):
        proc = child(catalog, "restore", "--source", "zoo", "--group", "full", "--partition", P, "--confirm",
                     "--no-safety-copy")
        time.sleep(rng.uniform(0.1, 2.0))
        proc.kill()
        proc.wait()
        assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
        assert not leftovers(catalog, pg18)
        assert content_of(pg18, zoo_db) == backup_content  # as it was, or restored: the same here


def test_live_leftovers_are_never_touched(pg18, catalog):
    repo = LocalRepository(catalog.repository_root)
    folder = repo.folder("postgres", "daily")
    live = partial_path(folder / "zoo-full-2026-11-22-x.dump.zst")  # this process: alive
    live.write_bytes(b"in progress")
    dead = folder / f".zoo-full-2026-11-22-y.dump.zst.partial-{Owner.me().host}-999999-1-abcd"
    dead.write_bytes(b"left by a killed process")
    with repo.scratch("drill") as mine:
        (mine / "archive.dump").write_bytes(b"x")
        removed = repo.sweep()
        assert dead in removed and live not in removed and mine.exists()
    assert live.exists() and not dead.exists()
    live.unlink()


def test_a_session_that_connects_mid_restore_makes_it_refuse(pg18, catalog, zoo_db, capsys):
    with pg18.connect(zoo_db) as conn:
        conn.execute("INSERT INTO public.t VALUES (4242)")
    before = content_of(pg18, zoo_db)
    held = []

    def connect_when_restoring():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with pg18.connect() as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE %s",
                                (zoo_db[:30] + "\\_restoring\\_%",)).fetchone():
                    held.append(pg18.connect(zoo_db))
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=connect_when_restoring)
    watcher.start()
    code = main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--confirm"])
    watcher.join()
    assert held, "the test did not manage to connect during the restore"
    try:
        assert code == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("backup-assets:")]
        assert len(err) == 1 and "connected to" in err[0] and "nothing was changed" in err[0], err
        assert content_of(pg18, zoo_db) == before
        assert not leftovers(catalog, pg18)
    finally:
        held[0].close()


def _damage(catalog, how: str):
    repo = LocalRepository(catalog.repository_root)
    b = repo.latest("zoo", "full", "daily", P)
    art, meta = b.artifact_path, b.manifest_path
    data = bytearray(art.read_bytes())
    manifest = json.loads(meta.read_text())
    if how == "byte flip":
        data[len(data) // 3] ^= 0x40
        art.write_bytes(bytes(data))
    elif how == "truncation":
        art.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "missing manifest":
        meta.unlink()
    elif how == "edited manifest":
        manifest["row_counts"]["public.t"] = 21
        meta.write_text(json.dumps(manifest))
    elif how == "another partition's artifact":
        other = run_backup(catalog, "zoo", "some", "daily", P)
        art.write_bytes((repo.folder("postgres", "daily") / other.artifact).read_bytes())
    elif how == "consistent manifest that lies":
        manifest["row_counts"]["public.t"] = 21
        meta.write_text(reseal(manifest))
    return b


@pytest.mark.parametrize("how", ["byte flip", "truncation", "missing manifest", "edited manifest",
                                 "another partition's artifact", "consistent manifest that lies"])
def test_every_corruption_is_caught_by_verify_and_refused_by_restore(pg18, catalog, zoo_db, how, capsys):
    b = _damage(catalog, how)
    before = content_of(pg18, zoo_db)
    v = main(["--catalog", catalog.catalog_path, "verify", "--source", "zoo", "--group", "full", "--partition", P])
    r = main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--partition", P,
              "--confirm"])
    out = capsys.readouterr()
    assert v == 1 and r == 1, out
    assert content_of(pg18, zoo_db) == before
    if how == "edited manifest":  # never silently ignored: list and doctor name it
        main(["--catalog", catalog.catalog_path, "list"])
        assert "not counted as a backup" in capsys.readouterr().err
    assert b.artifact_path.name in out.out + out.err or "no backup" in out.err


def test_a_killed_row_hashing_process_fails_the_checks_naming_the_artifact(pg18, catalog, monkeypatch, capsys):
    """A big archive's rows are hashed in a second process (row_hasher): killed mid-pass, nothing passes."""
    from backup_assets.core.verify import row_hasher

    monkeypatch.setattr(row_hasher, "wanted", lambda _decoded: True)
    sink = row_hasher.RowHasher.sink

    def sink_then_die(self):
        send = sink(self)

        def killing(data):
            send(data)
            self._proc.kill()
        return killing

    monkeypatch.setattr(row_hasher.RowHasher, "sink", sink_then_die)
    b = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily", P)
    assert main(["--catalog", catalog.catalog_path, "verify", "--source", "zoo", "--group", "full", "--partition", P,
                 "--drill"]) == 1
    out = capsys.readouterr()
    assert f"{b.artifact_path}: the process fingerprinting the rows ended with exit code -9" in out.out + out.err, out
    assert not leftovers(catalog, pg18)


def test_a_killed_head_start_process_fails_the_checks_and_the_command_says_so(pg18, catalog, tmp_path, monkeypatch):
    """`backup` runs its first backup in a child process beside Dagster's start (head_start): killed in the middle
    of the drill, the command itself goes on, records the checks as failed naming how the child ended, exits 1,
    and the next operation leaves nothing behind."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = child(catalog, "backup", "--select", "zoo/full", "--partition", "2026-11-22", failpoint="drill.decoded")
    out, err = (b.decode() for b in proc.communicate(timeout=300))
    assert proc.returncode == 1, out + err
    assert "zoo/full_daily 2026-11-22: " in out and "checks FAILED: archive_readable, artifact_intact, restore_drill" in out
    said = "zoo full daily 2026-11-22: the process that backed it up while Dagster started ended by signal 9 before " \
           "it said how the backup went"
    b = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily", "2026-11-22")
    assert b is not None and artifact_intact(b).passed  # the dump was done; what it did not prove is failed
    record = read_status(b)
    assert all(not record[n]["passed"] and record[n]["message"] == said for n in ("artifact_intact", "restore_drill")), record
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert not leftovers(catalog, pg18)


@pytest.mark.parametrize("written", [b"", b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"torn", b"\x04" + b"\x00" * 7 + b"junk"])
def test_a_head_start_child_that_says_nothing_readable_fails_both_futures(written):
    """What the command's side makes of a child that ended before a whole, readable report: both the backup and its
    checks fail, naming the exit code, instead of leaving the step waiting."""
    from backup_assets.core import BackupError
    from backup_assets.core.backup import head_start

    head = head_start.HeadStart(("zoo", "full", "daily", P), ["artifact_intact"])
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writer, written)
        os._exit(3)
    os.close(writer)
    head_start._collect(head, pid, reader)
    for future in (head.dumped, head.checked):
        with pytest.raises(BackupError, match=f"zoo full daily {P}: the process that backed it up while Dagster "
                                              "started ended with exit code 3 before it said how the backup went"):
            future.result(timeout=0)


def test_the_head_start_process_dies_with_the_command(pg18, catalog, zoo_db, tmp_path, monkeypatch):
    """kill -9 of `backup` while its first backup runs in the child process: the child goes too (no backup goes on
    unowned; here it waits on a lock the test holds, so it would not end by itself), nothing partial counts, and
    the next operation leaves nothing behind."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return False

    with pg18.connect(zoo_db) as lock:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE public.t IN ACCESS EXCLUSIVE MODE")
        proc = child(catalog, "backup", "--select", "zoo/full", "--partition", "2026-11-23")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 60
        forked, waiting = [], False
        while not (forked and waiting) and time.monotonic() < deadline and proc.poll() is None:
            forked = forked or [int(c) for c in children.read_text().split()
                                if "backup_assets.cli" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
            with pg18.connect(zoo_db) as look:
                waiting = look.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0
            time.sleep(0.05)
        assert forked and waiting, "the command's first backup did not wait on the lock in a child process"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(forked[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(forked[0]), "the head start went on after its command was killed"
        lock.execute("ROLLBACK")
    assert LocalRepository(catalog.repository_root).latest("zoo", "full", "daily", "2026-11-23") is None
    deadline = time.monotonic() + 30  # the orphaned pg_dump ends when it finds its reader gone
    while leftovers(catalog, pg18) and time.monotonic() < deadline:
        main(["--catalog", catalog.catalog_path, "doctor"])
        time.sleep(0.2)
    assert not leftovers(catalog, pg18)


@pytest.mark.parametrize("value", ["../../etc", "2026-13-45", "*", "2026-11-20; rm -rf /", "2099-01-01"])
@pytest.mark.parametrize("command", ["backup", "verify", "restore"])
def test_bad_partitions_get_one_line_and_exit_2(catalog, command, value, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    args = {"backup": ["backup", "--partition", value],
            "verify": ["verify", "--source", "zoo", "--group", "full", "--partition", value],
            "restore": ["restore", "--source", "zoo", "--group", "full", "--partition", value, "--confirm"]}[command]
    assert main(["--catalog", catalog.catalog_path, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(value) in err[0] and "partitions run from" in err[0], err


def test_without_dagster_home_one_line(catalog, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("BACKUP_ASSETS_CATALOG", catalog.catalog_path)
    for args in (["backup"], ["runs", "prune"]):
        assert main(["--catalog", catalog.catalog_path, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "DAGSTER_HOME is not set" in err[0], err


def test_a_failed_backup_prints_one_line(pg18, catalog, tmp_path, capsys, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("BA_TEST_PG18_PASSWORD", "wrong password")
    assert main(["--catalog", catalog.catalog_path, "backup", "--select", "zoo/full", "--partition", P]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FAILED" in err[0] and "password authentication failed" in err[0], err
    assert "wrong password" not in err[0]


def test_list_says_where_it_looked(tmp_path, write_catalog, capsys, monkeypatch, pg18, zoo_db):
    c = write_catalog({"zoo": pg_source(pg18, zoo_db)})
    monkeypatch.chdir(tmp_path.parent)
    assert main(["--catalog", c.catalog_path, "list"]) == 0
    err = capsys.readouterr().err
    assert str(c.repository_root) in err and c.catalog_path in err


def test_safety_copies_are_listed_and_dropped(pg18, catalog, zoo_db, capsys):
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--confirm"]) == 0
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full",
                 "--tables", "public.t", "--confirm"]) == 0
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "safety-copies", "list", "--json"]) == 0
    copies = json.loads(capsys.readouterr().out)
    assert {c["kind"] for c in copies} == {"database", "schema"}
    from backup_assets.core.monitoring import health

    _rows, forecast = health.report(catalog)
    assert len(forecast["safety_copies"]) == 2
    assert "Safety copies kept by restores (2" in health.markdown(_rows, forecast)
    assert main(["--catalog", catalog.catalog_path, "safety-copies", "drop", "--all"]) == 2
    assert main(["--catalog", catalog.catalog_path, "safety-copies", "drop", "--all", "--confirm"]) == 0
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "safety-copies", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out or "[]") == []
