"""The structural reader of pg_dump's custom format, on generated data blocks: every row chunk
comes out whole and in order wherever the reader's buffer happens to end; and the rows' count and
fingerprint, the same however the block is cut into pieces and whichever process hashes them."""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_assets.core.engines.pgarchive import LONG_ROW, ArchiveFormatError, CopyFingerprint, _read_chunks, _Reader
from backup_assets.core.verify.row_hasher import HasherFailed, RowHasher


def encode_int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


class Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int):
        self._data, self._pos, self._step = data, 0, step

    def read(self, n=-1):
        n = self._step if n is None or n < 0 else min(n, self._step)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=60),
       step=st.sampled_from([1, 3, 7, 64, 1000, 1 << 20]), trailer=st.binary(max_size=20))
def test_chunks_come_out_whole_and_in_order(chunks, step, trailer):
    block = b"".join(encode_int(len(c)) + c for c in chunks) + encode_int(0)
    reader = _Reader(Trickle(block + trailer, step))
    got: list[bytes] = []
    _read_chunks(reader, got.append)
    assert b"".join(got) == b"".join(chunks)
    assert reader.offset == len(block)
    assert reader.read(len(trailer)) == trailer  # the reader stands right after the block


@pytest.mark.parametrize("step", [1, 1 << 20])
def test_a_damaged_chunk_length_is_an_error_not_a_guess(step):
    block = encode_int(5) + b"hello" + encode_int(-7) + b"x" * 7 + encode_int(0)
    with pytest.raises(ArchiveFormatError, match="data chunk of -7 bytes"):
        _read_chunks(_Reader(Trickle(block, step)), lambda _data: None)


@pytest.mark.parametrize("step", [2, 1 << 20])
def test_a_block_cut_short_is_an_error(step):
    block = encode_int(10) + b"abc"
    with pytest.raises(ArchiveFormatError, match="ends early"):
        _read_chunks(_Reader(Trickle(block, step)), lambda _data: None)


# COPY text rows: never a newline inside (COPY escapes it), never the end marker; short and long ones
# (the fingerprint hashes a piece with OpenSSL's MD5 or CPython's by the piece's average row length)
ROWS = st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=1, max_size=40).map(lambda b: b * (LONG_ROW // len(b) + 1)))
                .map(lambda b: b.replace(b"\n", b"n")).filter(lambda b: b != b"\\."), max_size=30)


def expected(rows: list[bytes]) -> tuple[int, int]:
    return len(rows), sum(struct.unpack(">Q", hashlib.md5(r).digest()[:8])[0] for r in rows) % (1 << 64)


def block_pieces(rows: list[bytes], cuts: list[int]) -> list[bytes]:
    text = b"".join(r + b"\n" for r in rows) + b"\\.\n"
    at = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(at, at[1:])]


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=12))
def test_rows_count_and_fingerprint_the_same_however_the_block_is_cut(rows, cuts):
    pieces = block_pieces(rows, cuts)
    loaded, fed, counted = b"", CopyFingerprint(), CopyFingerprint()
    for piece in pieces:
        loaded += fed.feed(piece)
        counted.account(piece)
    assert loaded == b"".join(r + b"\n" for r in rows)  # what a restore loads: every row, never the marker
    for fp in (fed.finish(), counted.finish()):
        assert (fp.rows, fp.total) == expected(rows)


@settings(max_examples=15, deadline=None)
@given(blocks=st.lists(st.tuples(ROWS, st.lists(st.integers(min_value=0, max_value=20_000), max_size=6)),
                       min_size=1, max_size=4))
def test_rows_hashed_in_a_second_process_equal_the_readers_own(blocks):
    """Pieces of several blocks, interleaved as they never are in an archive, still land in their own block."""
    hasher = RowHasher()
    try:
        sinks = [hasher.sink() for _ in blocks]
        queues = [block_pieces(rows, cuts) for rows, cuts in blocks]
        while any(queues):
            for sink, queue in zip(sinks, queues):
                if queue:
                    sink(queue.pop(0))
        got = hasher.finish()
    finally:
        hasher.close()
    assert [(fp.rows, fp.total) for fp in got] == [expected(rows) for rows, _cuts in blocks]


DAMAGED = {
    "after the end": ([b"a\n", b"\\.\n", b"b\n"], "data after the end of a table's rows"),
    "mid-row": ([b"a\nb"], "a data block ends in the middle of a row"),
}


@pytest.mark.parametrize("where", ["here", "apart"])
@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_block_is_refused_with_the_same_words_wherever_it_is_hashed(damage, where):
    pieces, message = DAMAGED[damage]
    with pytest.raises(ArchiveFormatError, match=message):
        if where == "here":
            fp = CopyFingerprint()
            for piece in pieces:
                fp.account(piece)
            fp.finish()
        else:
            hasher = RowHasher()
            try:
                good, bad = hasher.sink(), hasher.sink()
                good(b"fine\n\\.\n")
                for piece in pieces:
                    bad(piece)
                hasher.finish()
            finally:
                hasher.close()


def test_a_hashing_process_that_dies_fails_the_pass_and_says_so():
    hasher = RowHasher()
    try:
        sink = hasher.sink()
        sink(b"a\n")
        hasher._proc.kill()
        hasher._proc.wait()
        sink(b"b\n" * 100_000)  # into a closed pipe: no error here, the pass ends saying why
        with pytest.raises(HasherFailed, match="fingerprinting the rows ended with exit code -9"):
            hasher.finish()
    finally:
        hasher.close()
