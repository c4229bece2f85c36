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


# -- a crafted collision of the old key h_i = hash((h_{i-1}, tokens_i)) ------------------------------------------
# CPython's tuple hash (xxHash-style, no per-process seed) is invertible in its last item, and hash(int) reduces
# modulo 2**61 - 1, so two different first blocks can be given chain hashes h_0 that differ by a multiple of
# 2**61 - 1: every later block then gets the same old key on both chains. The ids below are far outside any
# vocabulary (inverting is instant); the key must not depend on hash() at all.
_M, _P = 2**64, 2**61 - 1
_X1, _X2, _X5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) % _M


def _lane_for(lanes_before, target_hash):
    """The hash the last item of a tuple needs so that the tuple's hash is target_hash (tuplehash inverted)."""
    acc = _X5
    for lane in lanes_before:
        acc = _rotl((acc + lane % _M * _X2) % _M, 31) * _X1 % _M
    final = (target_hash - ((len(lanes_before) + 1) ^ (_X5 ^ 3527539))) % _M
    lane = (_rotl(final * pow(_X1, -1, _M) % _M, 33) - acc) * pow(_X2, -1, _M) % _M
    return lane - _M if lane >= 2**63 else lane


def _colliding_first_blocks():
    """Two different 4-token blocks whose old chain hashes differ but hash() to the same value."""
    first = (1, 2, 3, 4)
    h0 = hash((0, first))
    for k in (1, 2, 3, -1, -2, -3):
        target = h0 + k * _P
        if not (-2**63 <= target < 2**63) or (target < 0) != (h0 < 0):
            continue
        for third in range(3, 100):
            last = _lane_for([1, 2, third], _lane_for([0], target))
            if 0 <= last < _P:  # an int equal to its own hash
                other = (1, 2, third, last)
                assert hash((0, other)) == target and hash(target) == hash(h0) and target != h0
                return list(first), list(other)
    raise AssertionError("no collision crafted")


def test_a_crafted_old_hash_collision_never_serves_another_prefix():
    first_a, first_b = _colliding_first_blocks()
    second = [5, 6, 7, 8]
    assert hash((hash((0, tuple(first_a))), tuple(second))) == hash((hash((0, tuple(first_b))), tuple(second)))
    pool = BlockPool(8, 4)
    a0, a1, b0 = pool.allocate(3)
    for block, key in zip((a0, a1), keys_for(first_a + second)):
        pool.register(block, key)
    pool.register(b0, keys_for(first_b)[0])
    # B's own first block is a hit; A's second block (computed after A's first block) must not be
    assert pool.lookup(keys_for(first_b + second)) == [b0]
    assert pool.lookup(keys_for(first_a + second)) == [a0, a1]
    pool.check_integrity([[a0, a1, b0]])


def test_extra_inputs_change_the_key():
    tokens = [1, 2, 3, 4]
    keys = {block_key(None, tokens), block_key(None, tokens, b"adapter-a"), block_key(None, tokens, b"adapter-b"),
            block_key(block_key(None, tokens), tokens)}
    assert len(keys) == 4 and block_key(None, tokens, b"adapter-a") == block_key(None, list(tokens), b"adapter-a")
