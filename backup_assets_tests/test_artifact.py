"""The artifact stream: bounded reads however well the data compresses, strict about truncation,
and nothing left behind by a write that does not finish."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from backup_assets.core.artifact import (CHUNK, ArtifactWriter, TruncatedArtifact, decompress_to, open_decompressed,
                                         scan_artifact)


def test_highly_compressible_data_reads_back_whole_in_chunk_sized_pieces(tmp_path):
    raw = b"\0" * (256 * 1024 * 1024)
    with ArtifactWriter(tmp_path / "zeros.zst") as writer:
        for start in range(0, len(raw), CHUNK):
            writer.write(raw[start:start + CHUNK])
        written = writer.commit()
    assert written.size_bytes < 1024 * 1024, "256 MiB of zeros compresses to almost nothing"
    digest = hashlib.sha256()
    largest = total = 0
    with open_decompressed(written.path, written.raw_size_bytes) as reader:
        while chunk := reader.read(CHUNK):
            largest = max(largest, len(chunk))
            total += len(chunk)
            digest.update(chunk)
    assert total == len(raw) and largest <= CHUNK
    assert digest.hexdigest() == hashlib.sha256(raw).hexdigest()
    assert scan_artifact(written.path, written.raw_size_bytes) == (written.sha256, None, True)


def test_truncated_stream_raises_when_the_expected_size_is_known(tmp_path):
    with ArtifactWriter(tmp_path / "a.zst", level=1) as writer:
        writer.write(bytes(range(256)) * 40_000)
        written = writer.commit()
    cut = tmp_path / "cut.zst"
    cut.write_bytes(written.path.read_bytes()[:-50])
    with pytest.raises(TruncatedArtifact, match=r"truncated\): decodes to \d+ bytes, the manifest says 10240000"):
        decompress_to(cut, tmp_path / "out", expected_size=written.raw_size_bytes)
    sha, error, decoded = scan_artifact(cut, written.raw_size_bytes)
    assert decoded
    assert sha == hashlib.sha256(cut.read_bytes()).hexdigest() and "truncated" in error


def test_flipped_byte_is_a_decode_error_and_the_hash_still_covers_the_file(tmp_path):
    with ArtifactWriter(tmp_path / "a.zst") as writer:
        writer.write(b"backup " * 500_000)
        written = writer.commit()
    data = bytearray(written.path.read_bytes())
    data[len(data) // 2] ^= 0x40
    written.path.write_bytes(bytes(data))
    sha, error, decoded = scan_artifact(written.path, written.raw_size_bytes)
    assert decoded
    assert sha == hashlib.sha256(bytes(data)).hexdigest() and sha != written.sha256
    assert error and ("corrupt" in error or "truncated" in error)
    with pytest.raises(zstandard.ZstdError):
        decompress_to(written.path, tmp_path / "out", expected_size=written.raw_size_bytes)


def test_a_write_that_does_not_commit_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "x.zst") as writer:
            writer.write(b"half a dump")
            raise RuntimeError("pg_dump died")
    assert list(tmp_path.iterdir()) == []
