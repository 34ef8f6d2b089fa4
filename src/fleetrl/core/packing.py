"""First-fit bin packing of lengths into rows of a fixed capacity (pure Python).

One plan serves both packers: the learner's packed forward (``learner/packing.py``) and the
offline trainers' packed rows (``data/offline.py``). Each caller turns ``TooLong`` into its own
message, which names its own key.
"""

from __future__ import annotations

from collections.abc import Sequence


class TooLong(ValueError):
    """An item longer than the capacity: it fits in no row."""

    def __init__(self, index: int, length: int, capacity: int):
        super().__init__(f"first_fit: item {index} has length {length}, more than the capacity {capacity}")
        self.index, self.length, self.capacity = index, length, capacity


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per row: first fit over decreasing lengths (ties keep input order),
    each row summing to at most `capacity`; indices ascend within a row, rows come in the order
    they were opened. Deterministic; every index lands in exactly one row. Raises ``TooLong``
    for the first item (in that order) longer than `capacity`."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = int(lengths[i])
        if n > capacity:
            raise TooLong(i, n, capacity)
        for k, free in enumerate(room):
            if n <= free:
                rows[k].append(i)
                room[k] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return [sorted(r) for r in rows]
