"""The page hash every backend must reproduce: XXH64 seed 0 of each 4 KiB page, as the xxhash package computes."""

import mmap

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from devrep._pages import PAGE_SIZE
from devrep.hashing import hash_pages


def _pages(n: int) -> np.ndarray:
    buf = mmap.mmap(-1, n * PAGE_SIZE)
    return np.frombuffer(buf, dtype=np.uint8)


def _reference(array: np.ndarray) -> list[int]:
    pages = array.size // PAGE_SIZE
    return [xxhash.xxh64_intdigest(array[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes()) for i in range(pages)]


def test_edge_case_pages_match_xxhash() -> None:
    a = _pages(6)
    a[PAGE_SIZE:2 * PAGE_SIZE] = 0xFF                      # all ones
    a[2 * PAGE_SIZE:3 * PAGE_SIZE] = np.random.default_rng(1).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    a[3 * PAGE_SIZE:4 * PAGE_SIZE] = a[2 * PAGE_SIZE:3 * PAGE_SIZE]
    a[3 * PAGE_SIZE + 1234] ^= 0x10                         # one bit flipped
    a[4 * PAGE_SIZE] = 1                                    # first byte only
    a[6 * PAGE_SIZE - 1] = 0x80                             # last byte only
    got = hash_pages(a)
    assert got.dtype == np.uint64
    assert [int(h) for h in got] == _reference(a)
    assert len(set(got.tolist())) == 6                      # a one-bit flip changes the hash


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, PAGE_SIZE * 8 - 1))
def test_random_pages_and_bit_flips_match_xxhash(seed: int, bit: int) -> None:
    a = _pages(2)
    a[:PAGE_SIZE] = np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    a[PAGE_SIZE:] = a[:PAGE_SIZE]
    a[PAGE_SIZE + bit // 8] ^= 1 << (bit % 8)
    assert [int(h) for h in hash_pages(a)] == _reference(a)


def test_selected_pages_and_bad_input() -> None:
    a = _pages(8)
    a[:] = np.random.default_rng(2).integers(0, 256, a.size, dtype=np.uint8)
    ref = _reference(a)
    sel = np.array([7, 0, 3], dtype=np.int64)
    assert [int(h) for h in hash_pages(a, sel)] == [ref[7], ref[0], ref[3]]
    assert hash_pages(a, np.empty(0, np.int64)).size == 0
    with pytest.raises(ValueError, match="out of range"):
        hash_pages(a, np.array([8]))
    with pytest.raises(ValueError, match="multiple of the page size"):
        hash_pages(a[:100])
