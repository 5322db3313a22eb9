"""Encryption at rest with age: real keys, the stock `age` CLI, wrong and missing identities."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess

import pyrage
import pytest
from psycopg import sql

from backup_assets.cli import main
from backup_assets.core import BackupError
from backup_assets.core.backup.take import run_backup
from backup_assets.core.repository import LocalRepository
from backup_assets.core.verify.checks import artifact_intact
from backup_assets.core.verify.readable import archive_readable
from backup_assets.core.verify.restore_drill import restore_drill
from backup_assets.demo.cluster import embedded_bin_dir

from . import zoo
from .conftest import pg_source, reseal
from .test_checks import check_evaluations, run_with_checks

P = "2026-11-20"
IDENTITY_ENV = "BA_TEST_AGE_IDENTITY"
AGE = shutil.which("age")


@pytest.fixture
def keys(tmp_path, monkeypatch):
    age_key = pyrage.x25519.Identity.generate()
    (tmp_path / "age.key").write_text(f"# drill key\n{age_key}\n")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id_ed25519")], check=True)
    other = pyrage.x25519.Identity.generate()
    (tmp_path / "other.key").write_text(f"{other}\n")
    monkeypatch.setenv(IDENTITY_ENV, str(tmp_path / "age.key"))
    return {"age": str(age_key.to_public()), "ssh": (tmp_path / "id_ed25519.pub").read_text().strip(),
            "age_key": tmp_path / "age.key", "ssh_key": tmp_path / "id_ed25519", "other_key": tmp_path / "other.key"}


@pytest.fixture
def marked_zoo(pg18):
    name = "enc_" + secrets.token_hex(4)
    marker = "MARKER" + secrets.token_hex(16)
    with pg18.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with pg18.connect(name) as conn:
        zoo.build(conn)
        conn.execute("INSERT INTO public.plain (t) VALUES (%s)", (marker,))
    yield name, marker
    with pg18.connect() as conn:
        for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",)).fetchall():
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def encrypted_catalog(write_catalog, pg18, db, keys, **extra):
    return write_catalog({"zoo": pg_source(pg18, db, groups={"full": {}, "some": {"tables": ["public.plain"]}})},
                         encryption={"recipients": [keys["age"], keys["ssh"]], "identity_file_env": IDENTITY_ENV},
                         tiers={"daily": {"drill": True}}, **extra)


def repository_holds(root, marker: str) -> list[str]:
    """Files that hold the marker as they are, or once zstd-decoded (zstd codes short literals)."""
    import zstandard

    needle, found = marker.encode(), []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if data.startswith(b"\x28\xb5\x2f\xfd"):
            data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
        if needle in data:
            found.append(str(p))
    return found


def test_encrypted_backups_pass_every_check_and_hold_no_plaintext(pg18, marked_zoo, keys, write_catalog, tmp_path):
    db, marker = marked_zoo
    # control: without encryption the marker is readable in the repository (so the grep below means something)
    plain = write_catalog({"zoo": pg_source(pg18, db, groups={"full": {}})})
    run_backup(plain, "zoo", "full", "daily", P)
    assert repository_holds(plain.repository_root, marker)
    shutil.rmtree(plain.repository_root)

    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        for group in ("full", "some", "globals"):
            result = run_with_checks(catalog, f"zoo/{group}/daily", instance=instance)
            evals = check_evaluations(result)
            assert result.success and all(e.passed for e in evals.values()), {k: e.description for k, e in evals.items()}
        assert repository_holds(home, marker) == []  # nor in Dagster's run and event storage
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    assert backup.artifact_path.name.endswith(".dump.zst.age")
    assert backup.artifact_path.read_bytes().startswith(b"age-encryption.org/v1\n")
    recipients = backup.manifest.encryption["recipients"]
    assert {r["type"] for r in recipients} == {"x25519", "ssh-ed25519"}
    ssh_fp = subprocess.run(["ssh-keygen", "-lf", str(keys["ssh_key"]) + ".pub"], capture_output=True, text=True).stdout.split()[1]
    assert ssh_fp in {r["fingerprint"] for r in recipients}
    # no plaintext at rest: not in the repository (scratch folders are gone too)
    assert repository_holds(catalog.repository_root, marker) == []
    assert not (catalog.repository_root / ".tmp").exists() or not any((catalog.repository_root / ".tmp").iterdir())


def test_stock_age_and_zstd_restore_without_project_code(pg18, marked_zoo, keys, write_catalog, tmp_path):
    """The disaster runbook: age -d -i KEY ARTIFACT | zstd -d | pg_restore -d DB (both key kinds)."""
    if AGE is None:
        pytest.fail("the Debian age binary is missing (.ci/run installs it)")
    db, marker = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    backup = run_backup(catalog, "zoo", "full", "daily", P)
    artifact = LocalRepository(catalog.repository_root).folder("postgres", "daily") / backup.artifact
    with pg18.connect(db) as conn:
        before = zoo.content(conn)
    for n, key in enumerate((keys["age_key"], keys["ssh_key"])):
        target = f"{db}_stock{n}"
        pg18.create_database(target)
        env = dict(os.environ, PGPASSWORD=pg18.password)
        pipeline = (f"'{AGE}' -d -i '{key}' '{artifact}' | zstd -d -q | '{embedded_bin_dir()}/pg_restore' -h {pg18.host} "
                    f"-p {pg18.port} -U {pg18.superuser} -d {target} --exit-on-error")
        subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], check=True, env=env, capture_output=True)
        with pg18.connect(target) as conn:
            assert zoo.content(conn) == before


def test_sqlite_encrypted_round_trip_and_stock_tools(miyabi_db, keys, write_catalog, tmp_path):
    catalog = write_catalog({"miyabi": {"engine": "sqlite", "path": str(miyabi_db)}},
                            encryption={"recipients": [keys["age"]], "identity_file_env": IDENTITY_ENV})
    run_backup(catalog, "miyabi", "full", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("miyabi", "full", "daily")
    assert archive_readable(catalog, backup).passed and restore_drill(catalog, backup).passed
    copy = tmp_path / "stock.db"
    subprocess.run(["bash", "-o", "pipefail", "-c", f"'{AGE}' -d -i '{keys['age_key']}' '{backup.artifact_path}' | "
                    f"zstd -d -q > '{copy}'"], check=True)
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with sqlite3.connect(miyabi_db) as conn:
        conn.execute("DELETE FROM checkpoints")
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "miyabi", "--group", "full", "--confirm"]) == 0
    with sqlite3.connect(miyabi_db) as conn:
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 900


@pytest.mark.parametrize("how", ["missing", "wrong"])
def test_without_the_right_identity_one_line_names_variable_and_keys(pg18, marked_zoo, keys, write_catalog, how,
                                                                     monkeypatch, capsys):
    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    fps = [r["fingerprint"] for r in backup.manifest.encryption["recipients"]]
    if how == "missing":
        monkeypatch.delenv(IDENTITY_ENV)
    else:
        monkeypatch.setenv(IDENTITY_ENV, str(keys["other_key"]))
    # what needs no plaintext still runs
    assert artifact_intact(backup).passed
    drill = restore_drill(catalog, backup)
    assert not drill.passed and IDENTITY_ENV in drill.message and all(fp in drill.message for fp in fps)
    with pg18.connect(db) as conn:
        before = zoo.content(conn)
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--confirm"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("backup-assets:")]
    assert len(err) == 1 and IDENTITY_ENV in err[0] and fps[0] in err[0], err
    with pg18.connect(db) as conn:
        assert zoo.content(conn) == before


def test_a_damaged_ciphertext_is_caught_before_anything_is_restored(pg18, marked_zoo, keys, write_catalog, capsys):
    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    data = bytearray(backup.artifact_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    backup.artifact_path.write_bytes(bytes(data))
    # even with a manifest that agrees with the damaged file, age's authentication catches it
    manifest = json.loads(backup.manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    backup.manifest_path.write_text(reseal(manifest))
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    outcome = artifact_intact(backup, None)
    assert outcome.passed  # size and sha256 agree: only decryption can tell
    with pg18.connect(db) as conn:
        conn.execute("DELETE FROM public.u")
        before = zoo.content(conn)
    for args in (["verify", str(backup.artifact_path)],
                 ["restore", "--source", "zoo", "--group", "full", "--confirm"],
                 ["restore", "--source", "zoo", "--group", "full", "--tables", "public.u", "--confirm"]):
        assert main(["--catalog", catalog.catalog_path, *args]) == 1, args
    out = capsys.readouterr()
    assert "damaged or truncated" in out.out + out.err
    with pg18.connect(db) as conn:
        assert zoo.content(conn) == before


def test_s3_holds_only_ciphertext_and_restores_from_it(pg18, marked_zoo, keys, write_catalog, moto_s3, bucket):
    from backup_assets.core.replica import replicate, storage_for

    from .conftest import s3_replication

    db, marker = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys, replication=s3_replication(moto_s3, bucket))
    run_backup(catalog, "zoo", "full", "daily", P)
    backup = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    replicate(catalog, backup, storage_for(catalog))
    client = moto_s3.client()
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith(".dump.zst.age") for k in objects)
    for key in objects:
        assert marker.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read()
    with pg18.connect(db) as conn:
        before = zoo.content(conn)
    shutil.rmtree(catalog.repository_root)  # the local disk is gone
    target = f"{db}_from_s3"
    assert main(["--catalog", catalog.catalog_path, "restore", "--from", "s3", "--source", "zoo", "--group", "full",
                 "--target-db", target, "--confirm"]) == 0
    with pg18.connect(target) as conn:
        assert zoo.content(conn) == before


def _rekey_catalog(write_catalog, pg18, db, keys, moto_s3=None, bucket=None):
    extra = {}
    if moto_s3 is not None:
        from .conftest import s3_replication

        extra["replication"] = s3_replication(moto_s3, bucket)
    return encrypted_catalog(write_catalog, pg18, db, keys, **extra)


def test_rekey_moves_backups_to_new_keys_locally_and_in_s3(pg18, marked_zoo, keys, write_catalog, moto_s3, bucket,
                                                           monkeypatch, tmp_path, capsys):
    from backup_assets.core.replica import replicate, storage_for

    db, marker = marked_zoo
    catalog = _rekey_catalog(write_catalog, pg18, db, keys, moto_s3, bucket)
    run_backup(catalog, "zoo", "full", "daily", P)
    old = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    replicate(catalog, old, storage_for(catalog))
    new_key = pyrage.x25519.Identity.generate()
    (tmp_path / "new.key").write_text(f"{new_key}\n")
    new_recipient = str(new_key.to_public())
    args = ["--catalog", catalog.catalog_path, "rekey", "--recipients", new_recipient, "--source", "zoo", "--group", "full"]
    assert main(args) == 0 and "1 backup(s) to re-encrypt" in capsys.readouterr().err  # a dry run
    assert LocalRepository(catalog.repository_root).latest("zoo", "full", "daily").artifact_path == old.artifact_path
    assert main([*args, "--apply"]) == 0
    repo = LocalRepository(catalog.repository_root)
    [new] = repo.backups(source="zoo", group="full")
    assert new.artifact_path != old.artifact_path and not old.artifact_path.exists()
    assert [r["recipient"] for r in new.manifest.encryption["recipients"]] == [new_recipient]
    # the old key no longer opens it; the new one does, and the backup restores
    assert not restore_drill(catalog, new).passed
    monkeypatch.setenv(IDENTITY_ENV, str(tmp_path / "new.key"))
    assert restore_drill(catalog, new).passed
    client = moto_s3.client()
    names = {o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert new.artifact_path.name in names and old.artifact_path.name not in names
    assert repository_holds(catalog.repository_root, marker) == []


@pytest.mark.parametrize("point", ["rekey.streaming", "rekey.new_artifact", "rekey.new_manifest"])
def test_a_rekey_killed_anywhere_leaves_a_good_backup(pg18, marked_zoo, keys, write_catalog, point):
    import sys

    from backup_assets.core.failpoints import ENV

    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", P)
    other = pyrage.x25519.Identity.generate()
    proc = subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path, "rekey",
                           "--recipients", str(other.to_public()), keys["age"], "--apply"],
                          env=dict(os.environ, **{ENV: point}), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    backups = LocalRepository(catalog.repository_root).backups(source="zoo", group="full", strict=True)
    assert backups, "a complete backup is always left"
    for b in backups:  # every backup that counts verifies and restores with a key we hold
        assert artifact_intact(b).passed
        assert restore_drill(catalog, b).passed
    assert not [p for p in catalog.repository_root.rglob("*") if ".partial-" in p.name]


def test_plain_backups_can_be_encrypted_after_the_fact(pg18, marked_zoo, keys, write_catalog):
    db, marker = marked_zoo
    plain = write_catalog({"zoo": pg_source(pg18, db, groups={"full": {}})})
    run_backup(plain, "zoo", "full", "daily", P)
    assert main(["--catalog", plain.catalog_path, "rekey", "--recipients", keys["age"], "--identity-file-env",
                 IDENTITY_ENV, "--apply"]) == 0
    [b] = LocalRepository(plain.repository_root).backups()
    assert b.artifact_path.name.endswith(".age") and repository_holds(plain.repository_root, marker) == []
    assert restore_drill(plain, b).passed


def test_rekey_reaches_backups_that_exist_only_in_s3(pg18, marked_zoo, keys, write_catalog, moto_s3, bucket,
                                                     monkeypatch, tmp_path, capsys):
    """The local disk was lost (or pruned sooner than S3): rotation still reaches every copy, and
    streams the S3 object through decryption and encryption without plaintext on disk."""
    from backup_assets.core.replica import replicate, storage_for

    db, marker = marked_zoo
    catalog = _rekey_catalog(write_catalog, pg18, db, keys, moto_s3, bucket)
    run_backup(catalog, "zoo", "full", "daily", P)
    old = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    replicate(catalog, old, storage_for(catalog))
    shutil.rmtree(catalog.repository_root / "postgres")
    new_key = pyrage.x25519.Identity.generate()
    (tmp_path / "new.key").write_text(f"{new_key}\n")
    args = ["--catalog", catalog.catalog_path, "rekey", "--recipients", str(new_key.to_public()), "--source", "zoo",
            "--group", "full"]
    assert main(args) == 0
    assert f"would re-encrypt {old.artifact_path.name} (s3;" in capsys.readouterr().out
    assert main([*args, "--apply"]) == 0
    assert " in s3 " in capsys.readouterr().out
    client = moto_s3.client()
    names = {o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert old.artifact_path.name not in names and old.artifact_path.name + ".meta" not in names
    [new_name] = [n for n in names if n.endswith(".age")]
    assert new_name + ".meta" in names
    assert not (catalog.repository_root / "postgres").exists(), "nothing was written to the local repository"
    assert repository_holds(catalog.repository_root, marker) == []
    # the new key restores it from S3; the old one would not
    monkeypatch.setenv(IDENTITY_ENV, str(tmp_path / "new.key"))
    target = f"{db}_rekeyed"
    assert main(["--catalog", catalog.catalog_path, "restore", "--from", "s3", "--source", "zoo", "--group", "full",
                 "--target-db", target, "--confirm"]) == 0
    with pg18.connect(db) as a, pg18.connect(target) as b:
        assert zoo.content(a) == zoo.content(b)


def test_an_encrypting_writer_whose_sink_fails_raises_and_never_hangs(keys):
    """A full disk under the encrypting thread: the writer raises BackupError (at a write or at
    close), it does not wait forever for a reader that is gone."""
    from backup_assets.core import BackupError
    from backup_assets.core.crypto import EncryptingWriter

    class FullDisk:
        written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > 3 << 20:
                raise OSError(28, "No space left on device")
            return len(data)

        def flush(self):
            pass

    writer = EncryptingWriter(FullDisk(), [keys["age"]])
    with pytest.raises(BackupError, match="encryption failed: .*No space left"):
        for _ in range(64):
            writer.write(os.urandom(1 << 20))
        writer.close()


def test_a_host_without_the_key_never_demotes_a_good_backup(pg18, marked_zoo, keys, write_catalog, monkeypatch,
                                                            capsys):
    """On a backup host without the private key the checks that need plaintext are "not checked", never
    "failed": the result recorded when they could run stays, and a restore with the key takes the newest."""
    from backup_assets.core.verify import records as verification

    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", "2026-11-23")
    run_backup(catalog, "zoo", "full", "daily", "2026-11-24")
    repo = LocalRepository(catalog.repository_root)
    newest = repo.latest("zoo", "full", "daily", "2026-11-24")
    assert main(["--catalog", catalog.catalog_path, "verify", "--partition", "2026-11-24", "--source", "zoo",
                 "--group", "full"]) == 0
    before = verification.read_status(newest)
    assert before["archive_readable"]["passed"]
    capsys.readouterr()
    monkeypatch.delenv(IDENTITY_ENV)
    code = main(["--catalog", catalog.catalog_path, "verify", "--partition", "2026-11-24", "--source", "zoo",
                 "--group", "full", "--drill"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS artifact_intact" in out  # the ciphertext's SHA-256 needs no key
    assert "SKIP archive_readable: not checked here" in out and "SKIP restore_drill: not checked here" in out, out
    after = verification.read_status(newest)  # nothing recorded over the pass, no failure recorded
    assert after["archive_readable"] == before["archive_readable"] and "restore_drill" not in after, after
    assert after["artifact_intact"]["passed"]
    assert main(["--catalog", catalog.catalog_path, "list", "--source", "zoo"]) == 0
    assert "FAILED" not in capsys.readouterr().out
    # with the key again, a restore takes the newest and says which and why
    monkeypatch.setenv(IDENTITY_ENV, str(keys["age_key"]))
    target = f"{db}_copy"
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full",
                 "--target-db", target, "--confirm"]) == 0
    err = capsys.readouterr().err
    assert f"chose {newest.artifact_path.name}" in err and "the newest backup of zoo/full that verifies" in err, err


def _rekey_child(catalog, recipient: str, point: str | None):
    import sys

    from backup_assets.core.failpoints import ENV

    env = dict(os.environ, **({ENV: point} if point else {}))
    return subprocess.run([sys.executable, "-m", "backup_assets.cli", "--catalog", catalog.catalog_path, "rekey",
                           "--recipients", recipient, "--apply"], env=env, capture_output=True, text=True)


def _s3_names(moto_s3, bucket) -> set[str]:
    return {o["Key"].rsplit("/", 1)[-1] for o in moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_a_rekey_interrupted_before_s3_ends_with_s3_holding_the_local_bytes(pg18, marked_zoo, keys, write_catalog,
                                                                           moto_s3, bucket, tmp_path, monkeypatch,
                                                                           capsys):
    """Killed (or S3 down) after the local copy was rotated and before S3's was: the re-run copies the local new
    artifact to S3 (never encrypts the S3 copy a second time), so both hold the same bytes and the replica
    check passes; S3 then holds nothing the retired key opens."""
    from backup_assets.core.replica import replica_intact, replicate, storage_for
    from backup_assets.core.storage import s3 as s3_module

    db, _ = marked_zoo
    catalog = _rekey_catalog(write_catalog, pg18, db, keys, moto_s3, bucket)
    for p in ("2026-11-20", "2026-11-21"):
        run_backup(catalog, "zoo", "full", "daily", p)
        replicate(catalog, LocalRepository(catalog.repository_root).latest("zoo", "full", "daily", p),
                  storage_for(catalog))
    olds = {b.artifact_path.name for b in LocalRepository(catalog.repository_root).backups(source="zoo")}
    new_key = pyrage.x25519.Identity.generate()
    (tmp_path / "new.key").write_text(f"{new_key}\n")
    recipient = str(new_key.to_public())
    # 1. killed right after the first local copy was rotated
    proc = _rekey_child(catalog, recipient, "rekey.old_deleted")
    assert proc.returncode == -9, proc.stderr
    # 2. S3 down for the whole next run: the local copies are rotated, S3's are not; both sides reported
    real_put = s3_module.S3Storage.put_file

    def s3_down(self, *a, **kw):
        raise BackupError(f"uploading to {self.uri('x')}: S3 endpoint unreachable: {moto_s3.endpoint}")

    monkeypatch.setattr(s3_module.S3Storage, "put_file", s3_down)
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", recipient, "--apply"]) == 1
    err = capsys.readouterr().err
    assert "0 of 2 backup(s) rotated everywhere; copies now on the new keys: local 1" in err, err
    assert err.count("S3 endpoint unreachable") == 1 and "(and 1 more backup(s) the same way)" in err, err
    monkeypatch.setattr(s3_module.S3Storage, "put_file", real_put)
    # 3. the re-run finishes: S3 receives the local new bytes
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", recipient, "--apply"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished the interrupted rotation") == 2, out
    assert "re-encrypted" not in out, out
    repo = LocalRepository(catalog.repository_root)
    news = repo.backups(source="zoo")
    assert len(news) == 2 and not olds & {b.artifact_path.name for b in news}
    storage = storage_for(catalog)
    client = moto_s3.client()
    for b in news:
        key = f"backups/postgres/daily/{b.artifact_path.name}"
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b.artifact_path.read_bytes()
        assert replica_intact(catalog, b, storage).passed
    assert not olds & _s3_names(moto_s3, bucket)


def test_two_kills_in_a_row_never_tear_a_backup(pg18, marked_zoo, keys, write_catalog, capsys):
    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", P)
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    first = _rekey_child(catalog, f"{recipient}", "rekey.new_manifest")  # old and new both complete
    assert first.returncode == -9, first.stderr
    second = _rekey_child(catalog, recipient, "rekey.new_artifact")  # would write over the new one: it must not
    assert second.returncode == 0, second.stderr
    assert "finished the interrupted rotation" in second.stdout
    [b] = LocalRepository(catalog.repository_root).backups(source="zoo", group="full", strict=True)
    assert artifact_intact(b).passed  # its bytes are its manifest's (the key is not ours: hash only)


def test_a_torn_newest_backup_of_a_partition_falls_back_to_the_intact_one(pg18, marked_zoo, keys, write_catalog,
                                                                          capsys):
    db, _ = marked_zoo
    catalog = encrypted_catalog(write_catalog, pg18, db, keys)
    run_backup(catalog, "zoo", "full", "daily", P)
    run_backup(catalog, "zoo", "full", "daily", P)
    older, newer = LocalRepository(catalog.repository_root).backups(source="zoo", group="full", partition=P)
    data = bytearray(newer.artifact_path.read_bytes())
    newer.artifact_path.write_bytes(bytes(data[:-7]))
    assert main(["--catalog", catalog.catalog_path, "restore", "--source", "zoo", "--group", "full", "--partition", P,
                 "--target-db", f"{db}_copy", "--confirm"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {newer.artifact_path.name}" in err and f"chose {older.artifact_path.name}" in err, err
    assert "(1 newer skipped)" in err


def test_old_key_copies_left_without_manifest_are_found_and_removed(pg18, marked_zoo, keys, write_catalog, moto_s3,
                                                                    bucket, monkeypatch, capsys):
    from backup_assets.core import doctor as doctor_module
    from backup_assets.core.replica import replicate, storage_for

    db, _ = marked_zoo
    catalog = _rekey_catalog(write_catalog, pg18, db, keys, moto_s3, bucket)
    run_backup(catalog, "zoo", "full", "daily", P)
    old = LocalRepository(catalog.repository_root).latest("zoo", "full", "daily")
    replicate(catalog, old, storage_for(catalog))
    old_bytes = old.artifact_path.read_bytes()
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", recipient, "--apply"]) == 0
    # what a kill between an old copy's deletes left (older versions deleted manifest, then artifact)
    old_key = f"backups/postgres/daily/{old.artifact_path.name}"
    moto_s3.client().put_object(Bucket=bucket, Key=old_key, Body=old_bytes)
    capsys.readouterr()
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", recipient]) == 0  # the dry run says it
    assert f"would remove s3://{bucket}/{old_key}" in capsys.readouterr().out
    assert main(["--catalog", catalog.catalog_path, "rekey", "--recipients", recipient, "--apply"]) == 0
    assert f"removed s3://{bucket}/{old_key}" in capsys.readouterr().out
    assert old.artifact_path.name not in _s3_names(moto_s3, bucket)
    # any artifact without its manifest on the replica is swept by doctor once it is old enough
    stray = "backups/postgres/daily/zoo-full-2026-11-19-20261119T010101000000Z.dump.zst"
    moto_s3.client().put_object(Bucket=bucket, Key=stray, Body=b"left over")
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert stray.rsplit("/", 1)[-1] in _s3_names(moto_s3, bucket), "too young: an upload may be in progress"
    monkeypatch.setattr(doctor_module, "ORPHAN_AGE_S", 0)
    assert main(["--catalog", catalog.catalog_path, "doctor"]) == 0
    assert f"removed s3://{bucket}/{stray}" in capsys.readouterr().out
    assert stray.rsplit("/", 1)[-1] not in _s3_names(moto_s3, bucket)
