"""The host page allocator: tables, the free list, and all-or-nothing growth."""

import pytest

from serving.kv_cache import OutOfPages, PageAllocator


def test_grow_covers_positions_and_free_returns_pages():
    pages = PageAllocator(num_pages=9, page_size=4)
    assert pages.capacity == 8 and pages.num_free == 8 and pages.usage == 0
    assert len(pages.grow("a", 5)) == 2            # positions 0..4 -> 2 pages
    assert len(pages.grow("a", 8)) == 2            # still fits in 2 pages
    assert len(pages.grow("a", 9)) == 3
    pages.grow("b", 1)
    assert pages.num_free == 4 and pages.usage == 0.5
    assert 0 not in pages.tables["a"] + pages.tables["b"]   # page 0 is reserved
    assert len(set(pages.tables["a"] + pages.tables["b"])) == 4
    assert pages.free("a") == 3 and pages.num_free == 7
    assert pages.free("a") == 0                    # freeing twice is harmless
    pages.free("b")
    assert pages.num_free == 8 and pages.tables == {}


def test_out_of_pages_allocates_nothing():
    pages = PageAllocator(num_pages=4, page_size=2)
    pages.grow("a", 4)
    with pytest.raises(OutOfPages, match="needs 2 pages, 1 free"):
        pages.grow("b", 3)
    assert pages.num_free == 1 and "b" not in pages.tables
    assert pages.can_grow("b", 2) and not pages.can_grow("b", 3)


@pytest.mark.parametrize("num_pages,page_size", [(1, 16), (8, 12), (8, 0)])
def test_bad_sizes_are_refused(num_pages, page_size):
    with pytest.raises(ValueError, match="num_pages|page_size"):
        PageAllocator(num_pages, page_size)
