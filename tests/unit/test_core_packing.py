"""fleetrl.core.packing.first_fit: the one first-fit plan behind both packers."""

import pytest

from fleetrl.core.packing import TooLong, first_fit


def test_first_fit_decreasing_by_hand():
    # Order 0(5), 3(4), 1(3), 2(2), 4(1): 5 opens row A (room 1), 4 opens B (2), 3 opens C (3),
    # 2 goes to B (0), 1 goes to A (0). Indices ascend within a row; rows in opening order.
    assert first_fit([5, 3, 2, 4, 1], 6) == [[0, 4], [2, 3], [1]]
    # Ties keep input order: the first 3 opens the first row, the second 3 fills it.
    assert first_fit([3, 3, 3], 6) == [[0, 1], [2]]
    assert first_fit([6, 6], 6) == [[0], [1]]
    assert first_fit([], 4) == []


def test_first_fit_places_every_index_once_within_capacity():
    lengths = [7, 1, 1, 6, 2, 3, 8, 4, 5, 2]
    rows = first_fit(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert first_fit(lengths, 8) == rows  # deterministic


def test_first_fit_names_the_first_item_too_long_in_its_order():
    # Both 9 and 10 are too long; 10 comes first in decreasing order.
    with pytest.raises(TooLong, match="item 2 has length 10, more than the capacity 8") as e:
        first_fit([2, 9, 10], 8)
    assert (e.value.index, e.value.length, e.value.capacity) == (2, 10, 8)
    assert isinstance(e.value, ValueError)
