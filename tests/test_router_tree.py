"""The router's per-worker prefix tree: matching, prefix-closure, capacity bound and LRU eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tree import PrefixTree, chunk_hashes

CHUNK = 4  # small chunks make shared prefixes common in generated texts


def tree(capacity_chunks: int) -> PrefixTree:
    # chars_per_token == chunk size -> one token per chunk, so capacity counts chunks.
    return PrefixTree(capacity_tokens=capacity_chunks, chunk_chars=CHUNK, chars_per_token=CHUNK)


def hashes(text: str) -> list[int]:
    return chunk_hashes(text, CHUNK)


def test_chunk_hashes_name_prefixes_not_chunks():
    a = hashes("aaaabbbbcccc")
    b = hashes("xxxxbbbbcccc")
    assert len(a) == 3
    assert a[1] != b[1], "the same chunk after a different prefix must get a different name"
    assert hashes("aaaabbbbcc") == a[:2], "a trailing partial chunk is ignored"
    assert hashes("aaaabbbbcccc" + "d" * 4)[:3] == a


def test_chunk_hashes_handle_non_ascii_by_characters():
    text = "ééééxxxx"
    assert len(hashes(text)) == 2
    assert hashes(text)[0] != hashes("eeeexxxx")[0]


def test_match_returns_longest_held_prefix():
    t = tree(100)
    t.insert(hashes("sys:" * 4 + "user"))
    assert t.match_chunks(hashes("sys:" * 4 + "user")) == 5
    assert t.match_chunks(hashes("sys:" * 4 + "USER")) == 4
    assert t.match_chunks(hashes("SYS:" * 4)) == 0
    assert t.match_chars(hashes("sys:" * 3)) == 12


def test_insert_beyond_capacity_evicts_least_recently_used_branch():
    t = tree(6)
    t.insert(hashes("root" + "aaaa" * 2))  # 3 chunks
    t.insert(hashes("root" + "bbbb" * 2))  # 2 new chunks: 5 held
    t.insert(hashes("root" + "aaaa" * 2))  # already held: branch a is now the most recent
    t.insert(hashes("root" + "cccc" * 2))  # needs 2 more: 7 > 6, one evicted, from branch b
    assert len(t) == 6
    assert t.match_chunks(hashes("root" + "aaaa" * 2)) == 3
    assert t.match_chunks(hashes("root" + "cccc" * 2)) == 3
    assert t.match_chunks(hashes("root" + "bbbb" * 2)) == 2, "b's leaf went first, its parent stays"


def test_reload_share_counts_what_the_tree_evicted_and_was_asked_for_again():
    t = tree(4)
    for i in range(8):  # one-off prompts: every eviction is a tail nobody asks for again
        t.insert(hashes(f"q{i:03d}"))
    assert t.evicted_chunks == 4 and t.reload_share == 0.0
    t.insert(hashes("q000"))  # evicted, then wanted again: a reload
    assert t.reloaded_chunks == 1 and t.reload_share == pytest.approx(1 / 9)
    t.insert(hashes("q000"))  # held now: touching it is no reload
    assert t.reloaded_chunks == 1
    t.clear()  # a restarted worker: its evictions are forgotten with its cache
    t.insert(hashes("q001"))
    assert t.reloaded_chunks == 1 and t.reload_share == 0.0


def test_reload_share_reads_the_recent_window_not_all_time():
    t = tree(4)
    for _ in range(3):  # two prompts taking turns in room for one: every insert is a reload
        for name in ("aaaa" * 3, "bbbb" * 3):
            t.insert(hashes(name))
    assert t.reload_share > 0.5
    for i in range(40):  # then one-off prompts only: the share decays with the window
        t.insert(hashes(f"z{i:03d}"))
    assert t.reload_share < 0.1


def test_shared_root_outlives_its_leaves():
    t = tree(4)
    t.insert(hashes("root" + "aaaa" + "aaaa"))
    t.insert(hashes("root" + "bbbb" + "bbbb"))  # 5 > 4: the oldest leaf (a's) goes, not the root
    assert t.match_chunks(hashes("root")) == 1
    assert len(t) == 4


def test_prompt_longer_than_capacity_keeps_its_head():
    t = tree(3)
    t.insert(hashes("abcd" * 10))
    assert len(t) == 3
    assert t.match_chunks(hashes("abcd" * 10)) == 3


def test_shrinking_capacity_evicts_and_zero_capacity_holds_nothing():
    t = tree(10)
    t.insert(hashes("x" * 40))
    t.set_capacity(4)
    assert len(t) == 4 and t.match_chunks(hashes("x" * 40)) == 4
    t.set_capacity(0)
    assert len(t) == 0
    t.insert(hashes("y" * 8))
    assert len(t) == 0


def test_size_tokens_uses_chars_per_token():
    t = PrefixTree(capacity_tokens=10_000, chunk_chars=64, chars_per_token=4)
    t.insert(chunk_hashes("z" * 640, 64))
    assert t.size_tokens == 160


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        PrefixTree(-1)
    with pytest.raises(ValueError):
        chunk_hashes("abc", 0)


texts = st.lists(st.text(alphabet="ab", min_size=0, max_size=7 * CHUNK), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(texts, st.integers(min_value=1, max_value=12))
def test_tree_invariants_hold_under_any_insert_sequence(prompts, capacity):
    t = tree(capacity)
    parents: dict[int, int | None] = {}
    for text in prompts:
        hs = hashes(text)
        for i, h in enumerate(hs):
            parents[h] = hs[i - 1] if i else None
        t.insert(hs)
        # Bounded by capacity.
        assert len(t) <= capacity
        # The prompt just inserted is held (up to what fits).
        assert t.match_chunks(hs) == min(len(hs), capacity)
        # Prefix-closed: no node is held without its parent (eviction takes leaves first).
        for h in t.lru_order():
            parent = parents[h]
            assert parent is None or parent in t
        # Binary-search match agrees with a linear scan.
        for other in prompts:
            ohs = hashes(other)
            linear = 0
            while linear < len(ohs) and ohs[linear] in t:
                linear += 1
            assert t.match_chunks(ohs) == linear


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abc", min_size=CHUNK, max_size=4 * CHUNK), min_size=2, max_size=20))
def test_lru_order_puts_every_ancestor_after_its_descendants(prompts):
    t = tree(1000)
    parents: dict[int, int | None] = {}
    for text in prompts:
        hs = hashes(text)
        for i, h in enumerate(hs):
            parents[h] = hs[i - 1] if i else None
        t.insert(hs)
    position = {h: i for i, h in enumerate(t.lru_order())}
    for h, parent in parents.items():
        if parent is not None:
            assert position[parent] > position[h], "a parent must be more recent than its child"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab", min_size=CHUNK, max_size=3 * CHUNK), min_size=3, max_size=15))
def test_recently_used_prompt_survives_eviction_pressure(prompts):
    """The most recently used prompt is the last to lose its chunks."""
    capacity = 6
    t = tree(capacity)
    for text in prompts:
        t.insert(hashes(text))
    keep = hashes(prompts[0])[:capacity]
    t.insert(keep)
    t.insert(hashes("zzzz" * 2))  # pressure from an unrelated prompt
    fits = capacity - 2
    assert t.match_chunks(keep) >= min(len(keep), fits)
