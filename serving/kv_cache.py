"""The host half of the paged KV cache: which physical pages each sequence owns.

The device half is `jlora.model.PagedKV` (per layer K and V pages [G, P, Z, E]); this module
only hands out page numbers. A sequence's page table lists its pages in order, so cache
position p of the sequence lives in page `table[p // Z]` at offset `p % Z`. Pages return to
the free list the moment a sequence is freed (finished, cancelled or preempted).

Page 0 is never handed out: padding entries of device page tables point at it, so a stray
read of a padding entry reads a real, harmless page. No jax here.
"""

from __future__ import annotations


class OutOfPages(Exception):
    """Not enough free pages for an allocation; nothing was allocated."""


class PageAllocator:
    """A free list of P pages of Z tokens each (page 0 reserved) and per-sequence tables."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is reserved)")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size} must be a power of two")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, 0, -1))   # pop() hands out low pages first
        self.tables: dict[object, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the reserved page 0)."""
        return self.num_pages - 1

    @property
    def usage(self) -> float:
        """Fraction of usable pages in use, 0..1."""
        return 1 - self.num_free / self.capacity

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def needed(self, seq, n_tokens: int) -> int:
        """How many more pages `seq` needs to hold n_tokens positions."""
        return max(0, self.pages_for(n_tokens) - len(self.tables.get(seq, ())))

    def can_grow(self, seq, n_tokens: int) -> bool:
        return self.needed(seq, n_tokens) <= self.num_free

    def grow(self, seq, n_tokens: int) -> list[int]:
        """Make `seq`'s table cover n_tokens positions; returns its table.

        Raises OutOfPages (allocating nothing) when the free list is too short.
        """
        n = self.needed(seq, n_tokens)
        if n > self.num_free:
            raise OutOfPages(f"sequence {seq!r} needs {n} pages, {self.num_free} free")
        table = self.tables.setdefault(seq, [])
        table.extend(self._free.pop() for _ in range(n))
        return table

    def free(self, seq) -> int:
        """Return all of `seq`'s pages to the free list (a no-op for unknown sequences)."""
        table = self.tables.pop(seq, [])
        self._free.extend(reversed(table))
        return len(table)
