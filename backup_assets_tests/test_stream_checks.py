"""Checks read from the dump's stream while it is written (catalog `checks_while_writing`).

The stream's verdicts must be exactly those of reading the artifact afterwards, on hostile
schemas; a file changed after it was written, a stream that does not decode, a dump that fails
midway must never be trusted, and nothing may be left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard

from backup_assets.core.verify import archive_scan
from backup_assets.core.backup import roles
from backup_assets.core.artifact import ArtifactWriter
from backup_assets.core.backup.take import run_backup
from backup_assets.core.verify.checks import evaluate, find_backup, stream_check

from .conftest import pg_source
from .test_checks import check_evaluations, run_with_checks
from .test_schema_zoo import GROUPS, zoo18  # noqa: F401 (a fixture)

P = "2026-11-20"
NAMES = ["artifact_intact", "archive_readable", "size_anomaly", "restore_drill"]


def _leftovers(catalog) -> list[str]:
    scratch = catalog.repository_root / ".tmp"
    return sorted(p.name for p in scratch.iterdir()) if scratch.is_dir() else []


def test_checks_read_while_writing_equal_a_second_read_on_the_zoo(pg18, zoo18, write_catalog, monkeypatch):  # noqa: F811
    # the stream's reader hashes the rows in a second process, as it does with cores to spare; the second read
    # (a small archive) hashes them itself
    from backup_assets.core.verify import row_hasher

    monkeypatch.setattr(row_hasher, "beside_a_dump", lambda: True)
    catalog = write_catalog({"zoo": pg_source(pg18, zoo18, groups=GROUPS)}, tiers={"daily": {"drill": True}},
                            checks_while_writing=True)
    for group in GROUPS:
        result = run_with_checks(catalog, f"zoo/{group}/daily")
        evals = check_evaluations(result)
        assert result.success, {k: e.description for k, e in evals.items()}
        assert all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
        assert str(evals["artifact_intact"].metadata["read_while_written"].value) == "True"
        assert "as it was written" in evals["artifact_intact"].description
        drill = evals["restore_drill"].metadata
        assert drill["archive_fingerprints"].value == drill["restored_fingerprints"].value
        # the artifact read again afterwards says exactly the same about its content
        again = evaluate(catalog, find_backup(catalog, "zoo", group, "daily", P), NAMES[:2])
        assert all(o.passed for o in again.values())
        assert "read_while_written" not in again["artifact_intact"].metadata
        streamed = evals["archive_readable"].metadata
        assert streamed["fingerprints"].value == again["archive_readable"].metadata["fingerprints"]
        assert streamed["toc_entries"].value == again["archive_readable"].metadata["toc_entries"]
    assert _leftovers(catalog) == []
    with pg18.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'drill%'").fetchone()[0] == 0


@pytest.fixture
def stream_catalog(pg18, myloware_db, write_catalog):
    return write_catalog({"myloware": pg_source(pg18, myloware_db)}, checks_while_writing=True)


def test_a_file_changed_after_it_was_written_is_read_again_and_fails(stream_catalog):
    catalog = stream_catalog
    stream = stream_check(catalog, "myloware", "core", NAMES)
    assert stream is not None and stream.copy_to is not None
    try:
        run_backup(catalog, "myloware", "core", "daily", P, stream=stream)
        backup = find_backup(catalog, "myloware", "core", "daily", P)
        assert stream.artifact == backup.artifact_path and stream.copy_to.exists()
        data = bytearray(backup.artifact_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        backup.artifact_path.write_bytes(bytes(data))
        out = evaluate(catalog, backup, NAMES[:3], stream=stream)
    finally:
        stream.close()
    assert not out["artifact_intact"].passed
    assert "differs from the manifest's" in out["artifact_intact"].message
    assert backup.artifact_path.name in out["artifact_intact"].message
    assert not out["archive_readable"].passed
    assert not stream.copy_to.exists() and _leftovers(catalog) == []


def test_a_stream_that_does_not_decode_or_parse_is_never_trusted(stream_catalog, tmp_path):
    catalog = stream_catalog
    run_backup(catalog, "myloware", "kb", "daily", P)
    backup = find_backup(catalog, "myloware", "kb", "daily", P)
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(backup.artifact_path.read_bytes())
    cases = {
        "not zstd": b"this is not a zstd stream" * 1000,
        "archive cut in a data block": zstandard.ZstdCompressor().compress(plain[: len(plain) * 2 // 3]),
        "zstd frame cut short": zstandard.ZstdCompressor().compress(plain)[:-50],
    }
    for what, data in cases.items():
        folder = tmp_path / what.replace(" ", "_")
        folder.mkdir()
        check = archive_scan.StreamCheck(folder, copy=True)
        for i in range(0, len(data), 65536):
            check.write(data[i:i + 65536])
        check.finish(backup.artifact_path)
        assert check.result(backup.manifest) is None, what
        assert check.error, what
        check.close()
        assert not (folder / "archive.dump").exists(), what
    # and given to the checks, such a stream is ignored: the artifact itself is read
    folder = tmp_path / "ignored"
    folder.mkdir()
    check = archive_scan.StreamCheck(folder)
    check.write(cases["not zstd"])
    check.finish(backup.artifact_path)
    out = evaluate(catalog, backup, NAMES[:2], stream=check)
    check.close()
    assert all(o.passed for o in out.values()), out
    assert "read_while_written" not in out["artifact_intact"].metadata


def test_a_writer_that_fails_stops_the_reader_and_leaves_nothing(stream_catalog, tmp_path):
    catalog = stream_catalog
    stream = stream_check(catalog, "myloware", "full", NAMES)
    final = tmp_path / "out" / "x.dump.zst"
    with pytest.raises(RuntimeError, match="pg_dump died"):
        with ArtifactWriter(final, tap=stream) as writer:
            for _ in range(8):  # enough that zstd has handed compressed bytes on
                writer.write(os.urandom(4 << 20))
            raise RuntimeError("pg_dump died")
    assert stream._proc is not None and stream._proc.poll() is not None  # the reader is gone
    assert stream.artifact is None and stream.result(None) is None
    stream.close()
    assert not final.exists() and _leftovers(catalog) == []


def test_which_backups_are_read_while_written(pg18, myloware_db, write_catalog, monkeypatch, tmp_path):
    key = tmp_path / "age.key"
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    key.write_text(f"{ident}\n")
    source = pg_source(pg18, myloware_db, globals=True)
    encrypted = {**source, "encryption": {"recipients": [str(ident.to_public())]}}
    encrypted["encryption"]["identity_file_env"] = "BA_STREAM_TEST_IDENTITY"
    monkeypatch.delenv("BA_STREAM_TEST_IDENTITY", raising=False)
    catalog = write_catalog({"myloware": source, "secret": encrypted}, checks_while_writing="auto")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert stream_check(catalog, "myloware", "full", NAMES) is None  # two cores: the dump needs them
    # ... but an encrypted backup on a host without its private key can only be read as it is written
    made = stream_check(catalog, "secret", "full", NAMES)
    assert made is not None and made.inner_sha256 is not None
    made.close()
    monkeypatch.setenv("BA_STREAM_TEST_IDENTITY", str(key))
    assert stream_check(catalog, "secret", "full", NAMES) is None  # with it, afterwards, decrypted
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    made = stream_check(catalog, "secret", "full", NAMES)
    assert made is not None and made.inner_sha256 is not None
    made.close()
    made = stream_check(catalog, "myloware", "full", NAMES)
    assert made is not None and made.copy_to is not None
    made.close()
    made = stream_check(catalog, "myloware", "full", NAMES[:3])  # no drill: no plain copy
    assert made is not None and made.copy_to is None
    made.close()
    made = stream_check(catalog, "myloware", roles.GROUP, NAMES)  # the roles' JSON: decoded, not an archive
    assert made is not None and made.plain and made.copy_to is not None
    made.close()
    assert stream_check(catalog, "myloware", "full", ["size_anomaly"]) is None
    off = write_catalog({"myloware": source}, checks_while_writing=False)
    assert stream_check(off, "myloware", "full", NAMES) is None
    assert _leftovers(catalog) == []


def test_a_servers_tier_run_reads_each_dump_while_writing_and_the_roles_too(pg18, myloware_db, write_catalog):
    """The tier op pipelines the backups of a server (the next dumps while the last one's checks
    run): every dump gets its own reader and scratch, and all of them are gone at the end."""
    import dagster as dg

    from backup_assets.defs.build import build_definitions

    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, globals=True)},
                            tiers={"daily": {"drill": True}}, checks_while_writing=True)
    with dg.instance_for_test() as instance:
        result = build_definitions(catalog).resolve_job_def("daily_backups").execute_in_process(
            partition_key=P, instance=instance)
    assert result.success
    by = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert all(e.passed for e in by.values()), {k: e.description for k, e in by.items() if not e.passed}
    for group in ("full", "core", "kb"):
        intact = by[(f"myloware/{group}_daily", "artifact_intact")]
        assert str(intact.metadata["read_while_written"].value) == "True", group
        drill = by[(f"myloware/{group}_daily", "restore_drill")].metadata
        assert drill["archive_fingerprints"].value == drill["restored_fingerprints"].value
    assert str(by[(f"myloware/{roles.GROUP}_daily", "artifact_intact")].metadata["read_while_written"].value) == "True"
    assert by[(f"myloware/{roles.GROUP}_daily", "restore_drill")].passed
    assert _leftovers(catalog) == []
    with pg18.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'drill%'").fetchone()[0] == 0


def _readers() -> list[int]:
    """Stream readers still running (their command line names the module)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"backup_assets.core.verify.archive_scan" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_backup_killed_while_its_stream_is_read_never_counts_and_leaves_nothing(pg18, myloware_db, write_catalog):
    import subprocess
    import sys
    import time

    from backup_assets.cli import main
    from backup_assets.core.failpoints import ENV as FAILPOINTS
    from backup_assets.core.repository import LocalRepository

    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db)}, checks_while_writing=True)
    before = set(_readers())
    code = ("import sys; from backup_assets.catalog import load_catalog; from backup_assets.core.backup.take import run_backup; "
            "from backup_assets.core.verify.checks import stream_check; c = load_catalog(sys.argv[1]); "
            "s = stream_check(c, 'myloware', 'full', ['artifact_intact', 'archive_readable', 'restore_drill']); "
            "assert s is not None; run_backup(c, 'myloware', 'full', 'daily', sys.argv[2], stream=s)")
    proc = subprocess.run([sys.executable, "-c", code, catalog.catalog_path, P], capture_output=True,
                          env=dict(os.environ, **{FAILPOINTS: "artifact.before_rename"}), timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    deadline = time.monotonic() + 30
    while set(_readers()) - before and time.monotonic() < deadline:  # the reader sees the end of its input and ends
        time.sleep(0.2)
    assert not set(_readers()) - before
    repo = LocalRepository(catalog.repository_root)
    assert repo.latest("myloware", "full", "daily", P) is None
    assert _leftovers(catalog)  # the dead backup's scratch (and its plain copy) ...
    assert main(["--catalog", catalog.catalog_path, "list"]) == 0
    assert _leftovers(catalog) == []  # ... go with the next operation
    assert not [p for p in catalog.repository_root.rglob("*") if ".partial-" in p.name]


def test_an_encrypted_backup_is_checked_and_drilled_on_a_host_without_its_private_key(pg18, myloware_db, write_catalog,
                                                                                     monkeypatch, tmp_path):
    """Backup hosts need only public keys: read before encryption, the archive is still proven
    whole and the drill still runs; with the key, the ciphertext is proven to decrypt to it."""
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    key = tmp_path / "age.key"
    key.write_text(f"{ident}\n")
    monkeypatch.delenv("BA_STREAM_TEST_IDENTITY", raising=False)
    source = pg_source(pg18, myloware_db, encryption={"recipients": [str(ident.to_public())],
                                                      "identity_file_env": "BA_STREAM_TEST_IDENTITY"})
    catalog = write_catalog({"myloware": source}, tiers={"daily": {"drill": True}})  # checks_while_writing: auto
    result = run_with_checks(catalog, "myloware/core/daily")
    evals = check_evaluations(result)
    assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
    intact = evals["artifact_intact"]
    assert "not decrypted: no identity here" in intact.description
    assert str(intact.metadata["decrypted"].value) == "False"
    drill = evals["restore_drill"].metadata
    assert drill["archive_fingerprints"].value == drill["restored_fingerprints"].value
    backup = find_backup(catalog, "myloware", "core", "daily", P)
    assert backup.artifact_path.name.endswith(".age")
    # where the key is, the stored ciphertext holds exactly what was read while it was written
    monkeypatch.setenv("BA_STREAM_TEST_IDENTITY", str(key))
    again = evaluate(catalog, backup, NAMES[:2])
    assert all(o.passed for o in again.values()), again
    assert again["archive_readable"].metadata["fingerprints"] == evals["archive_readable"].metadata["fingerprints"].value
    # and read while written with the key at hand, the decryption itself is proven
    keyed = write_catalog({"myloware": source}, checks_while_writing=True)
    stream = stream_check(keyed, "myloware", "kb", NAMES[:3])
    try:
        run_backup(keyed, "myloware", "kb", "daily", P, stream=stream)
        kb = find_backup(keyed, "myloware", "kb", "daily", P)
        out = evaluate(keyed, kb, NAMES[:3], stream=stream)
        assert all(o.passed for o in out.values()), out
        assert out["artifact_intact"].metadata["decrypted"] is True
        assert "decrypts to exactly the zstd stream" in out["artifact_intact"].message
        # a ciphertext that no longer decrypts to it is read again, and the reading says why
        data = bytearray(kb.artifact_path.read_bytes())
        data[len(data) // 2] ^= 0x01
        kb.artifact_path.write_bytes(bytes(data))
        bad = evaluate(keyed, kb, NAMES[:3], stream=stream)
        assert not bad["artifact_intact"].passed and "differs from the manifest's" in bad["artifact_intact"].message
    finally:
        stream.close()
    assert _leftovers(catalog) == []


def test_encrypted_sqlite_and_roles_backups_are_checked_without_the_private_key(pg18, myloware_db, miyabi_db,
                                                                               write_catalog, monkeypatch, tmp_path):
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    (tmp_path / "age.key").write_text(f"{ident}\n")
    monkeypatch.delenv("BA_STREAM_TEST_IDENTITY", raising=False)
    encryption = {"recipients": [str(ident.to_public())], "identity_file_env": "BA_STREAM_TEST_IDENTITY"}
    catalog = write_catalog({"myloware": pg_source(pg18, myloware_db, globals=True, groups={"core": {
                                 "tables": ["runs", "artifacts"]}}),
                             "miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            tiers={"daily": {"drill": True}}, encryption=encryption)
    for key in ("miyabi/full/daily", f"myloware/{roles.GROUP}/daily"):
        result = run_with_checks(catalog, key)
        evals = check_evaluations(result)
        assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
        assert "not decrypted: no identity here" in evals["artifact_intact"].description, key
        assert evals["restore_drill"].metadata["rto_s"].value >= 0
    assert "integrity_check ok" in check_evaluations(run_with_checks(catalog, "miyabi/full/daily"))[
        "archive_readable"].description
    # without the stream (checks_while_writing false) the same backups cannot be read here
    off = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}}, encryption=encryption,
                        checks_while_writing=False)
    evals = check_evaluations(run_with_checks(off, "miyabi/full/daily"))
    assert not evals["archive_readable"].passed and "BA_STREAM_TEST_IDENTITY" in evals["archive_readable"].description
    # with the key, the stored encrypted SQLite backups also pass when read afterwards
    monkeypatch.setenv("BA_STREAM_TEST_IDENTITY", str(tmp_path / "age.key"))
    lite = find_backup(catalog, "miyabi", "full", "daily", P)
    assert all(o.passed for o in evaluate(catalog, lite, NAMES).values())
    assert _leftovers(catalog) == []


def test_a_reader_that_cannot_start_never_harms_the_backup(tmp_path):
    gone = tmp_path / "no such folder"
    check = archive_scan.StreamCheck(gone, copy=True)
    final = tmp_path / "out" / "x.dump.zst"
    with ArtifactWriter(final, tap=check) as writer:
        for _ in range(8):
            writer.write(os.urandom(4 << 20))
        written = writer.commit()
    assert final.exists() and written.raw_size_bytes == 32 << 20
    assert check.artifact == final and "could not start" in check.error
    assert check.result(None) is None
    check.close()
