"""Unpacking a base backup (core/pitr/unpack.py) and the recovered server's restore_command: every file back with its
bytes and mode, durable; a hostile or damaged tar refused naming the member, nothing written outside the data
directory; a full disk one line; a spooled segment served again when PostgreSQL asks for it twice, and never a
"not in the archive" for a segment the archive has."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backup_assets.catalog import load_catalog
from backup_assets.core import BackupError
from backup_assets.core.artifact import PAGE_WRITE, decompress_to
from backup_assets.core.pitr.recovery import _Prefetcher, restore_command_script
from backup_assets.core.pitr.unpack import unpack_tar

from .test_disk_full import small_volume  # noqa: F401  (fixture)


def tar_of(members: list[tuple[str, bytes | None, int]], fmt=tarfile.USTAR_FORMAT, **extra) -> bytes:
    """A tar stream as pg_basebackup writes one: (name, content or None for a folder, mode)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=fmt) as tar:
        for name, content, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            for key, value in extra.items():
                setattr(info, key, value)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    found = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        found[str(path.relative_to(root))] = (path.read_bytes() if path.is_file() else None, mode)
    return found


SIZES = [0, 1, 511, 512, 513, 8192, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7]


@pytest.mark.parametrize("durable", [True, False])
def test_every_file_comes_back_with_its_bytes_and_mode(tmp_path, durable):
    members = [("base", None, 0o700), ("base/5", None, 0o700), ("global", None, 0o750)]
    members += [(f"base/5/{1000 + i}", os.urandom(size), 0o600) for i, size in enumerate(SIZES)]
    members += [("global/pg_control", os.urandom(8192), 0o640), ("PG_VERSION", b"15\n", 0o600),
                ("setuid", b"x", 0o4755),
                ("pg_wal/archive_status", None, 0o700)]  # a folder whose parent has no entry of its own
    dest = tmp_path / "data"
    dest.mkdir()
    files = unpack_tar(io.BytesIO(tar_of(members)), dest, what="base.tar", durable=durable)
    assert files == len(SIZES) + 3
    got = tree(dest)
    for name, content, mode in members:
        assert got[name] == (content, mode & 0o777), name  # a set-id bit never comes from an archive


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a", "b/c", "d e", "Ünï", "x.y"]), st.binary(max_size=3000),
                          st.sampled_from([0o600, 0o640, 0o644])), min_size=1, max_size=8, unique_by=lambda m: m[0]),
       st.integers(min_value=1, max_value=5000))
def test_generated_streams_read_in_any_piece_size_unpack_exactly(tmp_path_factory, members, piece):
    """The stream is read as the decoder hands it out: pieces of any size, never a whole member at once."""
    class Pieces(io.RawIOBase):
        def __init__(self, data):
            self.data, self.pos = data, 0

        def read(self, n=-1):
            n = min(n if n >= 0 else piece, piece)
            out = self.data[self.pos:self.pos + n]
            self.pos += len(out)
            return out

    members = [(f"dir/{name}", content, mode) for name, content, mode in members]
    dest = tmp_path_factory.mktemp("gen")
    unpack_tar(Pieces(tar_of([("dir", None, 0o700), *members])), dest, what="gen.tar")
    got = tree(dest)
    assert all(got[name] == (content, mode) for name, content, mode in members)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["base/1/2", "backup_label.old", "global/backup_label", "a b", "x"]),
                          st.binary(max_size=3000)), max_size=6, unique_by=lambda m: m[0]),
       st.binary(max_size=700), st.binary(max_size=5000), st.lists(st.integers(min_value=1, max_value=4000), min_size=1))
def test_a_base_backups_label_and_manifest_are_picked_out_of_the_stream_in_any_pieces(others, label, manifest, cuts):
    """What a base backup records (its backup_label's start WAL, its backup_manifest) is read from pg_basebackup's
    stream as it is written: in pieces of any size, among members of any size, and only the top-level ones
    (a member named like it in a folder, or with a suffix, is not it)."""
    from backup_assets.core.pitr.unpack import TarPicker

    members = [(name, content, 0o600) for name, content in others]
    data = tar_of([("./backup_label", label, 0o600), *members, ("./backup_manifest", manifest, 0o600)])
    picker = TarPicker({"backup_label", "backup_manifest"}, what="base.tar")
    at, i = 0, 0
    while at < len(data):
        picker.feed(data[at:at + cuts[i % len(cuts)]])
        at += cuts[i % len(cuts)]
        i += 1
    assert picker.finish() == {"backup_label": label, "backup_manifest": manifest}


def test_a_stream_without_its_end_or_a_member_is_not_a_base_backup():
    from backup_assets.core.pitr.unpack import TarPicker

    data = tar_of([("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n", 0o600),
                   ("base/1/1", os.urandom(2000), 0o600), ("backup_manifest", b"{}", 0o600)])
    members_end = 3 * 512 + 512 + 2048 + 512  # three headers and their data, without the end-of-archive blocks
    for cut in (100, 1024 + 700, members_end):  # inside a header, inside a member, before the end block
        picker = TarPicker({"backup_label", "backup_manifest"}, what="base-x.tar.zst")
        picker.feed(data[:cut])
        with pytest.raises(BackupError, match="base-x.tar.zst: the tar stream ended before its end-of-archive block"):
            picker.finish()
    picker = TarPicker({"backup_label", "backup_manifest", "tablespace_map"}, what="base-x.tar.zst")
    picker.feed(data)
    with pytest.raises(BackupError, match="base-x.tar.zst holds no tablespace_map: not a base backup"):
        picker.finish()
    picker = TarPicker({"backup_label"}, what="base-x.tar.zst")
    with pytest.raises(BackupError, match="base-x.tar.zst: not a readable tar stream"):
        picker.feed(b"?" * 512)


@pytest.mark.parametrize("name,kind,needle", [
    ("../outside", tarfile.REGTYPE, "would be written outside the data directory"),
    ("base/../../outside", tarfile.REGTYPE, "would be written outside the data directory"),
    ("/tmp/absolute", tarfile.REGTYPE, "would be written outside the data directory"),
    ("pg_tblspc/16384", tarfile.SYMTYPE, "is not a file or a folder"),
    ("base/1/hard", tarfile.LNKTYPE, "is not a file or a folder"),
    ("dev/null", tarfile.CHRTYPE, "is not a file or a folder"),
])
def test_a_hostile_member_is_refused_by_name_and_nothing_lands_outside(tmp_path, name, kind, needle):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("PG_VERSION"), io.BytesIO(b""))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        tar.addfile(info, io.BytesIO(b"x" * info.size))
    dest = tmp_path / "deep" / "data"
    dest.mkdir(parents=True)
    with pytest.raises(BackupError) as err:
        unpack_tar(io.BytesIO(out.getvalue()), dest, what="evil.tar")
    assert needle in str(err.value) and repr(name) in str(err.value) and "evil.tar" in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["PG_VERSION", "data", "deep"]
    assert not Path("/tmp/absolute").exists()


def test_an_extended_header_is_refused_rather_than_misread(tmp_path):
    data = tar_of([("n" * 120, b"long name", 0o600)], fmt=tarfile.PAX_FORMAT)
    with pytest.raises(BackupError, match=r"tar type b?'x'.*pg_basebackup writes none"):
        unpack_tar(io.BytesIO(data), tmp_path, what="pax.tar")


def test_a_truncated_or_damaged_stream_is_an_error_never_a_short_data_directory(tmp_path):
    data = tar_of([("big", os.urandom(100_000), 0o600), ("after", b"x", 0o600)])
    members_end = 512 + 100_352 + 512 + 512  # both members, without the end-of-archive blocks
    for cut in (100, 512 + 50_000, 512 + 100_352 + 200, members_end):
        dest = tmp_path / f"cut{cut}"
        dest.mkdir()
        with pytest.raises(BackupError, match="ends in the middle of its tar stream|not a readable tar stream"):
            unpack_tar(io.BytesIO(data[:cut]), dest, what="cut.tar")
    damaged = bytearray(data)
    damaged[512 + 100_352 + 100:512 + 100_352 + 110] = b"?" * 10  # inside the second member's header
    with pytest.raises(BackupError, match="not a readable tar stream"):
        unpack_tar(io.BytesIO(bytes(damaged)), tmp_path / "cut100", what="damaged.tar")


def test_files_a_server_writes_pages_into_are_written_in_small_pieces(tmp_path, monkeypatch):
    """A base backup's data files and a restored SQLite store are written into by their server afterwards, in 8 KiB
    pages; the page cache keeps a file in folios as large as the writes that filled it, and small writes into 1 MiB
    folios cost three times the system time (see artifact.PAGE_WRITE). So no write is larger than PAGE_WRITE,
    whatever size the decoded pieces come in, and every byte still lands."""
    sizes: list[int] = []
    real = os.write

    def write(fd, data):  # the writes into the files under test (not whatever else the process writes meanwhile)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path.resolve())):
            sizes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    content = os.urandom(3 * (1 << 20) + 8195)
    dest = tmp_path / "pgdata"
    dest.mkdir()
    unpack_tar(io.BytesIO(tar_of([("base", None, 0o700), ("base/16384", content, 0o600)])), dest, what="b.tar")
    assert (dest / "base" / "16384").read_bytes() == content
    assert max(sizes) == PAGE_WRITE and sum(sizes) == len(content)

    sizes.clear()
    artifact = tmp_path / "store.sqlite.zst"
    artifact.write_bytes(zstandard.ZstdCompressor().compress(content))
    decompress_to(artifact, tmp_path / "store.sqlite", expected_size=len(content))
    assert (tmp_path / "store.sqlite").read_bytes() == content
    assert max(sizes) == PAGE_WRITE and sum(sizes) == len(content)


def test_a_full_disk_is_one_line_naming_the_artifact_and_folder(small_volume):  # noqa: F811
    data = tar_of([("filler", os.urandom(16 << 20), 0o600)])
    dest = small_volume / "data"
    dest.mkdir()
    with pytest.raises(BackupError) as err:
        unpack_tar(io.BytesIO(data), dest, what="base-x.tar.zst")
    text = str(err.value)
    assert "unpacking base-x.tar.zst into" in text and str(dest) in text and "No space left" in text
    assert "\n" not in text


# -- restore_command: the spool -----------------------------------------------------------------------

SEGMENTS = [f"00000001000000000000001{i}" for i in range(4)]


def _catalog(tmp_path: Path):
    path = tmp_path / "catalog.yaml"
    path.write_text(f"repository: {{root: {tmp_path / 'repo'}}}\nsources:\n  app:\n    engine: postgres\n"
                    "    connection: {host: 127.0.0.1, port: 1, dbname: app}\n    groups: {full: {}}\n")
    return load_catalog(path)


def test_restore_command_serves_a_spooled_segment_twice_and_never_says_absent_for_an_archived_one(tmp_path):
    catalog = _catalog(tmp_path)
    spool = tmp_path / "spool with 'quotes' and $dollars"
    spool.mkdir()
    wal = tmp_path / "repo" / "wal" / "app"
    wal.mkdir(parents=True)
    script = tmp_path / "restore_command"
    script.write_text(restore_command_script(catalog, "app", spool))
    script.chmod(0o700)
    for name in SEGMENTS:
        (spool / name).write_bytes(name.encode() * 100)
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()

    def ask(name: str) -> subprocess.CompletedProcess:
        (pg_wal / "RECOVERYXLOG").unlink(missing_ok=True)
        return subprocess.run([str(script), name, str(pg_wal / "RECOVERYXLOG")], capture_output=True, text=True)

    for name in SEGMENTS[:2]:
        assert ask(name).returncode == 0
        assert (pg_wal / "RECOVERYXLOG").read_bytes() == name.encode() * 100
        os.replace(pg_wal / "RECOVERYXLOG", pg_wal / name)  # as PostgreSQL keeps a restored segment
    # the prefetcher sees what recovery took, keeps the newest of it, and counts what is still waiting
    prefetch = _Prefetcher.__new__(_Prefetcher)
    prefetch.spool, prefetch.served = spool, ""
    assert prefetch._waiting() == 2 and prefetch.served == SEGMENTS[1]
    assert sorted(p.name for p in spool.iterdir()) == SEGMENTS[1:]
    again = ask(SEGMENTS[1])  # recovery's end asks for the last segment again
    assert again.returncode == 0 and (pg_wal / "RECOVERYXLOG").read_bytes() == SEGMENTS[1].encode() * 100
    # a segment no longer spooled but in the archive goes to wal-fetch (which fails here: the archive is empty),
    # never "absent"; one the archive does not have is answered absent without Python
    (wal / f"{SEGMENTS[0]}.json").write_text("{}")
    gone = ask(SEGMENTS[0])
    assert gone.returncode != 0 and SEGMENTS[0] in gone.stderr, gone  # wal-fetch's own line about it
    absent = ask("000000020000000000000099")
    assert absent.returncode == 1 and absent.stderr == ""
