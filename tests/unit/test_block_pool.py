import pytest

from freehold.kv.block_pool import BlockPool, block_key


def keys_for(tokens, bs=4):
    keys, parent = [], None
    for i in range(len(tokens) // bs):
        parent = block_key(parent, tokens[i * bs:(i + 1) * bs])
        keys.append(parent)
    return keys


def test_allocate_free_and_reference_counts():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    assert pool.num_free == 5 and all(pool.ref_counts[b] == 1 for b in a)
    pool.check_integrity([a])
    pool.free(a)
    assert pool.num_free == 8
    pool.check_integrity([])
    with pytest.raises(RuntimeError):
        pool.allocate(9)


def test_prefix_hits_require_same_chain():
    pool = BlockPool(8, 4)
    tokens = list(range(12))
    blocks = pool.allocate(3)
    for b, k in zip(blocks, keys_for(tokens)):
        pool.register(b, k)
    assert pool.lookup(keys_for(tokens)) == blocks
    # same second block content after a different first block: no hit past the first difference
    other = [99] + tokens[1:]
    assert pool.lookup(keys_for(other)) == []
    assert pool.lookup(keys_for(tokens[:4] + [7, 7, 7, 7])) == blocks[:1]


def test_cached_blocks_survive_free_and_are_evicted_lru():
    pool = BlockPool(4, 4)
    first = pool.allocate(2)
    for b, k in zip(first, keys_for(list(range(8)))):
        pool.register(b, k)
    pool.free(first)
    assert pool.num_free == 4 and pool.lookup(keys_for(list(range(8)))) == first
    pool.acquire(first[:1])  # reuse the first block again
    pool.check_integrity([first[:1]])
    fresh = pool.allocate(3)  # must evict the cached second block (the only other candidate)
    assert first[1] in fresh and pool.lookup(keys_for(list(range(8)))) == first[:1]
    pool.check_integrity([first[:1], fresh])


def test_reset_forgets_only_unreferenced_blocks():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(2)
    keys = keys_for([1, 2, 3, 4], bs=2)
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    pool.free(blocks[1:])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(keys) == blocks[:1]
    pool.check_integrity([blocks[:1]])


def test_integrity_catches_leaks_and_double_free():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    with pytest.raises(AssertionError):
        pool.check_integrity([a[:1]])  # a[1] leaked
    pool.free(a)
    with pytest.raises(RuntimeError):
        pool.free(a)
