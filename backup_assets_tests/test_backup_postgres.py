"""PostgreSQL backups as Dagster assets, against real servers, restored with the raw tools."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time

import dagster as dg
import pytest

from backup_assets.core import BackupError
from backup_assets.core.artifact import sha256_file
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.defs.build import build_definitions
from backup_assets.defs.keys import backup_key

from .conftest import PG15_PASSWORD_ENV, pg_restore_into, pg_source


def materialize(catalog, key: str, partition: str, instance=None, raise_on_error=True):
    defs = build_definitions(catalog)
    asset_key = backup_key(*key.split("/"))
    asset = defs.resolve_assets_def(asset_key)
    with (dg.instance_for_test() if instance is None else _nullcontext(instance)) as inst:  # the backup alone
        return dg.materialize([asset], selection=dg.AssetSelection.assets(asset_key).without_checks(),
                              partition_key=partition, instance=inst, raise_on_error=raise_on_error)


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def only_backup(catalog, tier="daily"):
    backups = LocalRepository(catalog.repository_root).backups(tier=tier)
    assert len(backups) == 1, backups
    return backups[0]


def counts(cluster, dbname, tables):
    with cluster.connect(dbname) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def test_full_backup_materializes_and_restores_exactly(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    result = materialize(catalog, "myloware/full/daily", "2026-11-20")
    assert result.success
    backup = only_backup(catalog)
    m = backup.manifest
    path = backup.artifact_path

    # the file, its manifest and their permissions
    assert path.name.startswith("myloware-full-2026-11-20-") and path.name.endswith(".dump.zst")
    assert path.parent == catalog.repository_root / "postgres" / "daily"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.manifest_path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent, catalog.repository_root):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert m.sha256 == sha256_file(path) and m.size_bytes == path.stat().st_size
    for key in ("timestamp", "database", "host", "port", "backup_type", "size_bytes", "size_human",
                "compression", "format", "sha256", "asset_key", "partition", "row_counts",
                "server_version", "tool_version", "duration_s"):
        assert key in json.loads(backup.manifest_path.read_text()), key
    assert m.database == myloware_db and m.backup_type == "daily" and m.asset_key == "myloware/full_daily"
    assert m.server_version.startswith("18") and "pg_dump" in m.tool_version
    assert m.compression.startswith("zstd")

    # every user table counted, vectors and the HNSW index recorded
    assert set(m.row_counts) >= {"public.runs", "public.kb_embeddings", "public.socials", "public.project_socials"}
    assert m.row_counts["public.runs"] == 300
    vec = m.vectors["public.kb_embeddings"]["embedding"]
    assert vec["dims"] == 1536 and 0 < vec["non_null"] < m.row_counts["public.kb_embeddings"]
    assert any(i["method"] == "hnsw" for i in m.indexes)

    # materialization metadata, with the stable keys the UI plots
    mat = result.asset_materializations_for_node(result.all_node_events[0].node_name)[0]
    md = mat.metadata
    assert md["dagster/size_bytes"].value == m.size_bytes
    assert md["dagster/row_count"].value == m.total_rows
    assert md["sha256"].value == m.sha256 and md["path"].value == str(path)
    for key in ("duration_s", "throughput_mb_s", "compression_ratio"):
        assert md[key].value > 0

    # restored with the raw tools, the database is the same
    restored = f"{myloware_db}_r"
    pg_restore_into(pg18, path, restored)
    tables = [t.split(".")[1] for t in m.row_counts]
    assert counts(pg18, restored, tables) == {t.split(".")[1]: n for t, n in m.row_counts.items()}
    with pg18.connect(myloware_db) as a, pg18.connect(restored) as b:
        q = "SELECT embedding::text FROM kb_embeddings WHERE embedding IS NOT NULL ORDER BY id LIMIT 1 OFFSET 7"
        assert a.execute(q).fetchone() == b.execute(q).fetchone()
        assert b.execute("SELECT count(*) FROM pg_indexes WHERE indexdef ILIKE '%USING hnsw%'").fetchone()[0] == 1
    with pg18.connect() as conn:
        conn.execute(f'DROP DATABASE "{restored}" WITH (FORCE)')


def test_table_groups_hold_only_their_tables(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    for group in ("core", "kb"):
        assert materialize(catalog, f"myloware/{group}/daily", "2026-11-20").success
    repo = LocalRepository(catalog.repository_root)
    core = repo.latest("myloware", "core", "daily").manifest
    kb = repo.latest("myloware", "kb", "daily").manifest
    assert set(core.row_counts) == {"public.runs", "public.artifacts", "public.webhook_events", "public.hitl_approvals"}
    assert set(kb.row_counts) == {"public.kb_documents", "public.kb_embeddings"}
    assert kb.extensions.get("vector") and not core.extensions

    restored = f"{myloware_db}_kb"
    pg_restore_into(pg18, repo.latest("myloware", "kb", "daily").artifact_path, restored)
    with pg18.connect(restored) as conn:
        # a group archive holds the definitions of the whole database (so it restores on its own,
        # schemas and types included) and the rows of its own tables only
        names = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        with_rows = {n for n in names if conn.execute(f'SELECT EXISTS (SELECT 1 FROM public."{n}")').fetchone()[0]}
        assert with_rows == {"kb_documents", "kb_embeddings"}
        assert "runs" in names
        assert conn.execute("SELECT count(embedding) FROM kb_embeddings").fetchone()[0] == (
            kb.vectors["public.kb_embeddings"]["embedding"]["non_null"])
        assert conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'kb_embeddings_embedding_hnsw'").fetchone()
    with pg18.connect() as conn:
        conn.execute(f'DROP DATABASE "{restored}" WITH (FORCE)')


def test_dump_is_one_snapshot_while_the_application_writes(pg18, myloware_db, write_catalog):
    """Counts in the manifest equal what the archive restores, although rows keep arriving."""
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    stop = threading.Event()
    inserted = []

    def writer():
        with pg18.connect(myloware_db) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO runs (project, persona, status) VALUES ('p', 'editor', 'running')")
                conn.execute("INSERT INTO webhook_events (provider, event_type, signature, payload, raw_body) "
                             "VALUES ('github', 'push', 'sig', '{}', 'x')")
                inserted.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        assert materialize(catalog, "myloware/core/daily", "2026-11-20").success
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert len(inserted) > 10
    backup = only_backup(catalog)
    restored = f"{myloware_db}_snap"
    pg_restore_into(pg18, backup.artifact_path, restored)
    got = counts(pg18, restored, ["runs", "artifacts", "webhook_events", "hitl_approvals"])
    assert got == {t.split(".")[1]: n for t, n in backup.manifest.row_counts.items()}
    assert got["runs"] < counts(pg18, myloware_db, ["runs"])["runs"]
    with pg18.connect() as conn:
        conn.execute(f'DROP DATABASE "{restored}" WITH (FORCE)')


def test_weekly_and_monthly_promote_the_daily_artifact(pg18, myloware_db, write_catalog):
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    # week of Monday 2026-11-09 ends on Sunday 2026-11-15; November ends on 2026-11-30
    assert materialize(catalog, "myloware/core/daily", "2026-11-15").success
    assert materialize(catalog, "myloware/core/weekly", "2026-11-09").success
    repo = LocalRepository(catalog.repository_root)
    daily = repo.latest("myloware", "core", "daily", "2026-11-15")
    weekly = repo.latest("myloware", "core", "weekly", "2026-11-09")
    assert weekly.manifest.promoted_from == f"postgres/daily/{daily.manifest.artifact}"
    assert os.path.samefile(weekly.artifact_path, daily.artifact_path)
    assert weekly.manifest.sha256 == daily.manifest.sha256
    assert weekly.manifest.row_counts == daily.manifest.row_counts
    assert weekly.manifest.tier == weekly.manifest.backup_type == "weekly"

    # no daily for the boundary day: a weekly backfill dumps on its own
    assert materialize(catalog, "myloware/core/weekly", "2026-10-26").success
    backfilled = repo.latest("myloware", "core", "weekly", "2026-10-26")
    assert backfilled.manifest.promoted_from is None
    assert backfilled.manifest.sha256 == sha256_file(backfilled.artifact_path)

    assert materialize(catalog, "myloware/core/daily", "2026-10-31").success
    assert materialize(catalog, "myloware/core/monthly", "2026-10-01").success
    monthly = repo.latest("myloware", "core", "monthly", "2026-10-01")
    assert monthly.manifest.promoted_from.startswith("postgres/daily/myloware-core-2026-10-31-")


def test_backup_of_a_postgres_15_server(pg15, write_catalog):
    pg15.create_database("myloware15")
    with pg15.connect("myloware15") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS runs (id serial PRIMARY KEY, status text NOT NULL)")
        conn.execute("TRUNCATE runs")
        conn.execute("INSERT INTO runs (status) SELECT 'succeeded' FROM generate_series(1, 1234)")
    source = pg_source(pg15, "myloware15", PG15_PASSWORD_ENV, groups={"core": {"tables": ["runs"]}})
    catalog = write_catalog({"legacy": source})
    assert materialize(catalog, "legacy/core/daily", "2026-11-20").success
    m = only_backup(catalog).manifest
    # dumped with the server's own major version (Debian's pg_dump 15), so pg_restore 15 can restore it
    assert m.server_version.startswith("15") and "(PostgreSQL) 15." in m.tool_version
    assert m.row_counts == {"public.runs": 1234}


def test_pg_dump_older_than_the_server_is_a_clear_error(pg18, myloware_db, write_catalog):
    old = "/usr/lib/postgresql/15/bin"
    if not os.path.exists(f"{old}/pg_dump"):
        pytest.skip("Debian's PostgreSQL 15 client is not installed")
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, pg_bin_dir=old)})
    with pytest.raises(BackupError, match=r"pg_dump 15 in pg_bin_dir .* does not fit: this needs pg_dump of major version 18"):
        run_backup(catalog, "myloware", "core", "daily", "2026-11-20")
    assert not list(catalog.repository_root.rglob("*.zst"))


@pytest.mark.parametrize("case", ["unreachable", "wrong_password", "missing_table", "missing_env"])
def test_failures_name_source_and_cause_and_leave_nothing(case, pg18, myloware_db, write_catalog, monkeypatch):
    source = pg_source(pg18, myloware_db)
    expected = {
        "unreachable": "cannot connect to PostgreSQL at 127.0.0.1",
        "wrong_password": "password authentication failed",
        "missing_table": r"table\(s\) missing in .*: public\.nope",
        "missing_env": "environment variable BA_TEST_UNSET_PASSWORD",
    }[case]
    if case == "unreachable":
        from backup_assets.demo.cluster import free_port

        source["connection"]["port"] = free_port()
    elif case == "wrong_password":
        monkeypatch.setenv("BA_TEST_WRONG_PASSWORD", "definitely-not-it")
        source["connection"]["password_env"] = "BA_TEST_WRONG_PASSWORD"
    elif case == "missing_table":
        source["groups"] = {"core": {"tables": ["runs", "nope"]}}
    else:
        source["connection"]["password_env"] = "BA_TEST_UNSET_PASSWORD"
    catalog = write_catalog({"myloware": source})
    with pytest.raises(Exception, match=expected) as info:
        run_backup(catalog, "myloware", "core", "daily", "2026-11-20")
    if case != "missing_env":
        assert "source 'myloware'" in str(info.value)
    result = materialize(catalog, "myloware/core/daily", "2026-11-20", raise_on_error=False)
    assert not result.success
    leftovers = [p for p in catalog.repository_root.rglob("*") if p.is_file()] if catalog.repository_root.exists() else []
    assert leftovers == []


def test_disk_full_leaves_no_artifact(pg18, myloware_db, write_catalog, tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs to fill: {mounted.stderr.decode().strip()}")
    try:
        catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)}, repository={"root": str(mnt / "backups")})
        with pytest.raises(BackupError, match=r"source 'myloware' group 'full': writing the backup .* No space left"):
            run_backup(catalog, "myloware", "full", "daily", "2026-11-20")
        leftovers = [p for p in (mnt / "backups").rglob("*") if p.is_file()]
        assert leftovers == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_password_never_reaches_dagster_home_or_repository(pg18, myloware_db, write_catalog, tmp_path):
    password = pg18.password
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)})
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        for group in ("full", "core", "kb"):
            assert materialize(catalog, f"myloware/{group}/daily", "2026-11-20", instance=instance).success
        # a failing run too: its error text and compute logs must be clean as well
        bad = write_catalog({"myloware": pg_source(pg18, myloware_db, groups={"core": {"tables": ["nope"]}})})
        assert not materialize(bad, "myloware/core/daily", "2026-11-20", instance=instance, raise_on_error=False).success
        records = instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.STEP_FAILURE))
        assert records
    needle = password.encode()
    scanned = 0
    for root in (home, catalog.repository_root):
        for path in root.rglob("*"):
            if path.is_file():
                scanned += 1
                assert needle not in path.read_bytes(), f"password found in {path}"
    assert scanned > 10


def test_secrets_are_scrubbed_from_error_text():
    from backup_assets.core.secrets import scrub

    text = "failed: postgresql://admin:hunter2@db:5432/x password=hunter2 PGPASSWORD='hunter2' token: abc"
    out = scrub(text, "hunter2")
    assert "hunter2" not in out and "abc" not in out and "admin" in out
