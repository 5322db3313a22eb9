"""The catalog: one message naming file, key and problem for every kind of mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backup_assets.catalog import DEMO_CATALOG, CatalogError, load_catalog

GOOD = {
    "repository": {"root": "backups"},
    "sources": {
        "myloware": {
            "engine": "postgres",
            "connection": {"host": "127.0.0.1", "port": 5432, "dbname": "myloware", "password_env": "MYLOWARE_DB_PASSWORD"},
            "groups": {"full": {}, "core": {"tables": ["runs", "artifacts"]}},
        },
        "miyabi": {"engine": "sqlite", "path": "data/miyabi.db", "tables": ["execution_runs"]},
    },
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def mutated(change) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    change(data)
    return data


def test_good_catalog_defaults(tmp_path):
    catalog = load_catalog(write(tmp_path, GOOD))
    assert {t: catalog.tier(t).retention_days for t in ("daily", "weekly", "monthly")} == {
        "daily": 7, "weekly": 28, "monthly": 180}
    assert catalog.tier("daily").time == "03:00" and catalog.tier("weekly").day_of_week == "monday"
    assert catalog.repository_root == (tmp_path / "backups").resolve()
    assert catalog.resolve_path(catalog.sources["miyabi"].path) == (tmp_path / "data" / "miyabi.db").resolve()
    assert len(catalog.backup_targets()) == (2 + 1 + 1) * 3  # groups, the sqlite store, the roles backup
    assert catalog.sources["myloware"].pool_name() == "pg_127_0_0_1_5432"


def test_demo_catalog_loads_with_the_myloware_and_miyabi_groups(tmp_path, monkeypatch):
    # the loader's env are defaults: a variable set in the environment (make exports one) wins
    monkeypatch.delenv("BACKUP_ASSETS_DEMO_HOME", raising=False)
    catalog = load_catalog(DEMO_CATALOG, env={"BACKUP_ASSETS_DEMO_HOME": str(tmp_path)})
    # table names are kept in their exact text form (schema-qualified)
    assert catalog.sources["myloware"].groups["core"].tables == [
        "public.runs", "public.artifacts", "public.webhook_events", "public.hitl_approvals"]
    assert catalog.sources["myloware"].groups["kb"].tables == ["public.kb_documents", "public.kb_embeddings"]
    assert catalog.sources["myloware"].groups["full"].tables is None
    assert catalog.sources["miyabi"].path == f"{tmp_path}/data/miyabi.db"
    assert catalog.repository_root == tmp_path / "backups"


CASES = {
    "unknown engine": (lambda d: d["sources"]["myloware"].update(engine="mysql"),
                       r"sources\.myloware\.engine: Input should be 'postgres' or 'sqlite', got 'mysql'"),
    "missing table group": (lambda d: d["sources"]["myloware"].pop("groups"),
                            r"sources\.myloware: .*missing table group"),
    "empty table group": (lambda d: d["sources"]["myloware"]["groups"].update(core={"tables": []}),
                          r"sources\.myloware\.groups\.core\.tables: a table group needs at least one table"),
    "bad tier": (lambda d: d.update(tiers={"minutely": {"time": "01:00"}}),
                 r"tiers: unknown tier 'minutely' \(expected one of hourly, daily, weekly, monthly\)"),
    "bad retention": (lambda d: d.update(tiers={"daily": {"retention_days": 0}}),
                      r"tiers\.daily\.retention_days: Input should be greater than or equal to 1"),
    "bad time": (lambda d: d.update(tiers={"daily": {"time": "25:00"}}),
                 r"tiers\.daily\.time: bad time '25:00'"),
    "bad timezone": (lambda d: d.update(timezone="Mars/Olympus"), r"timezone: unknown timezone 'Mars/Olympus'"),
    "password inline": (lambda d: d["sources"]["myloware"]["connection"].update(password="hunter2"),
                        r"sources\.myloware\.connection: 'password' is not allowed: .*password_env"),
    "password in password_env": (lambda d: d["sources"]["myloware"]["connection"].update(password_env="hunter2!"),
                                 r"sources\.myloware\.connection\.password_env: password_env must be the NAME"),
    "unknown key": (lambda d: d["sources"]["miyabi"].update(pth="x.db"), r"sources\.miyabi\.pth: unknown key"),
    "unknown top-level key": (lambda d: d.update(retention=3), r"retention: unknown key"),
    "sqlite without path": (lambda d: d["sources"]["miyabi"].pop("path"), r"sources\.miyabi: .*needs 'path'"),
    # any identifier is a name (quoted when needed); three dot-separated parts are not
    "bad table name": (lambda d: d["sources"]["myloware"]["groups"].update(core={"tables": ["a.b.c"]}),
                       r"bad table name 'a\.b\.c': .*3 dot-separated parts"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_catalog_names_file_key_and_problem(case, tmp_path):
    change, pattern = CASES[case]
    path = write(tmp_path, mutated(change))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    import re

    assert re.search(pattern, message), message
    assert "hunter2" not in message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(CatalogError, match=r"missing.yaml: cannot read catalog"):
        load_catalog(tmp_path / "missing.yaml")
    with pytest.raises(CatalogError, match=r"catalog.yaml: not valid YAML at line \d+: (did not find )?expected"):
        load_catalog(write(tmp_path, "repository:\n  root: [unclosed\n"))


def test_unset_environment_reference(tmp_path):
    data = mutated(lambda d: d["repository"].update(root="${BA_TEST_NOT_SET_ROOT}/x"))
    with pytest.raises(CatalogError, match=r"repository\.root: environment variable BA_TEST_NOT_SET_ROOT is not set"):
        load_catalog(write(tmp_path, data))


def _validate(catalog_path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, BACKUP_ASSETS_CATALOG=str(catalog_path), DAGSTER_HOME=str(tmp_path))
    dagster = Path(sys.executable).parent / "dagster"
    return subprocess.run([str(dagster), "definitions", "validate", "-m", "backup_assets.definitions"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_dagster_definitions_validate_fails_on_a_bad_catalog_and_passes_on_a_good_one(tmp_path):
    bad = write(tmp_path, mutated(lambda d: d["sources"]["myloware"].update(engine="mysql")))
    result = _validate(bad, tmp_path)
    assert result.returncode != 0
    assert f"{bad}: sources.myloware.engine: Input should be 'postgres' or 'sqlite', got 'mysql'" in result.stdout + result.stderr
    good = write(tmp_path, GOOD)
    result = _validate(good, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
