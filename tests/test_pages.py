import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devrep._pages import (
    PAGE_SIZE,
    byte_range_to_pages,
    check_block_size,
    pages_from_runs,
    runs_from_mask,
    runs_from_pages,
    split_runs,
    widen_to_blocks,
)
from devrep.errors import InvalidArgumentError


@given(st.lists(st.booleans(), max_size=300))
def test_runs_from_mask_roundtrip(bits: list[bool]) -> None:
    mask = np.array(bits, dtype=bool)
    runs = runs_from_mask(mask)
    assert np.array_equal(pages_from_runs(runs), np.flatnonzero(mask))
    assert np.array_equal(runs_from_pages(np.flatnonzero(mask)), runs)
    if len(runs) > 1:  # coalesced: runs never touch
        assert np.all(runs[1:, 0] > runs[:-1, 0] + runs[:-1, 1])


@given(st.lists(st.integers(0, 200), max_size=100), st.integers(1, 64))
def test_split_runs_preserves_pages(pages: list[int], batch: int) -> None:
    runs = runs_from_pages(np.unique(np.array(pages, dtype=np.int64)))
    parts = split_runs(runs, batch)
    assert all(int(p[:, 1].sum()) <= batch for p in parts)
    joined = np.concatenate([pages_from_runs(p) for p in parts]) if parts else np.empty(0, np.int64)
    assert np.array_equal(joined, pages_from_runs(runs))


def test_byte_ranges_widen_to_blocks_and_clip() -> None:
    assert byte_range_to_pages(PAGE_SIZE + 1, 1, 10).tolist() == [1]
    assert byte_range_to_pages(PAGE_SIZE - 1, 2, 10).tolist() == [0, 1]
    assert byte_range_to_pages(5 * PAGE_SIZE, 1, 7, pages_per_block=4).tolist() == [4, 5, 6]
    assert byte_range_to_pages(0, 0, 10).size == 0
    with pytest.raises(InvalidArgumentError):
        byte_range_to_pages(-1, 5, 10)
    with pytest.raises(InvalidArgumentError):
        byte_range_to_pages(10 * PAGE_SIZE, 1, 10)
    assert widen_to_blocks(np.array([1, 9]), 10, 4).tolist() == [0, 1, 2, 3, 8, 9]


@pytest.mark.parametrize("bad", [0, 100, PAGE_SIZE + 1, 3 * PAGE_SIZE])
def test_block_size_must_be_power_of_two_pages(bad: int) -> None:
    with pytest.raises(InvalidArgumentError, match="power of two"):
        check_block_size(bad)
