"""The namespace log as pure data: clocks, merge rules, the tree shown, the object format."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubfs.namespace_log import (
    HLC,
    DamagedObject,
    Entry,
    HybridClock,
    Kind,
    Outbox,
    Segment,
    Snapshot,
    View,
    decode_segment,
    decode_snapshot,
    encode_segment,
    encode_snapshot,
    rename_entries,
)

CID = bytes(range(32))


def file(path: str, wall: int, node: str = "a", counter: int = 0, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, HLC(wall, counter, node), content=CID, **kw)  # type: ignore[arg-type]


def directory(path: str, wall: int, node: str = "a", mode: int = 0o755, uid: int = 0) -> Entry:
    return Entry(path, Kind.DIR, HLC(wall, 0, node), mode=mode, uid=uid)


def test_clock_never_goes_back_and_passes_what_it_saw() -> None:
    wall = [1000]
    clock = HybridClock("a", lambda: wall[0])
    t1 = clock.now()
    wall[0] = 900  # the wall clock steps back
    t2 = clock.now()
    assert t2 > t1 and t2.wall_ms == 1000
    clock.observe(HLC(5000, 7, "b"))  # a node an hour ahead
    t3 = clock.now()
    assert t3 > HLC(5000, 7, "b")
    wall[0] = 6000
    assert clock.now() == HLC(6000, 0, "a")


def test_a_write_after_seeing_another_wins_even_with_a_lagging_clock() -> None:
    a = HybridClock("a", lambda: 10_000_000)
    b = HybridClock("b", lambda: 10_000_000 - 3_600_000)  # an hour behind
    view = View()
    view.merge(Entry("refs/main", Kind.FILE, a.now(), content=b"\1" * 32))
    b.observe(view.max_hlc())  # type: ignore[arg-type]
    view.merge(Entry("refs/main", Kind.FILE, b.now(), content=b"\2" * 32))
    assert view.tree()["refs/main"].content == b"\2" * 32


def test_last_writer_wins_in_any_order() -> None:
    old, new = file("f", 1, size=1), file("f", 2, node="b", size=2)
    for order in ([old, new], [new, old]):
        view = View()
        view.merge_all(order)
        assert view.tree()["f"].size == 2
    tie_a, tie_b = file("g", 5, node="a"), file("g", 5, node="b")
    view = View()
    view.merge_all([tie_b, tie_a])
    assert view.entries["g"].hlc.node == "b"  # equal wall time and counter: the node decides


def test_tombstones() -> None:
    created = file("d/f", 1)
    view = View()
    view.merge_all([directory("d", 1), created, created.tombstone(HLC(2, 0, "b"))])
    assert "d/f" not in view.tree() and "d" in view.tree()
    assert view.merge(file("d/f", 3))  # written again after the deletion: back
    assert "d/f" in view.tree()
    assert not view.merge(created)  # an old entry arriving late changes nothing
    assert view.entries["d/f"].hlc.wall_ms == 3


def test_deleted_directory_comes_back_for_a_file_written_into_it_with_its_old_mode() -> None:
    private = directory("users/ann", 1, mode=0o700, uid=1001)
    view = View()
    view.merge_all([directory("users", 1), private,
                    private.tombstone(HLC(5, 0, "a")),  # node a removes the tree
                    file("users/ann/model.bin", 3, node="b", uid=1001, mode=0o600)])
    tree = view.tree()
    assert tree["users/ann"].kind is Kind.DIR
    assert (tree["users/ann"].mode, tree["users/ann"].uid) == (0o700, 1001)  # still private
    assert tree["users/ann/model.bin"].live


def test_missing_ancestors_are_implied_from_the_child() -> None:
    view = View()
    view.merge(file("x/y/z", 1, uid=7, mode=0o640))
    tree = view.tree()
    assert [p for p in tree] == ["x", "x/y", "x/y/z"]
    assert (tree["x"].mode, tree["x"].uid) == (0o750, 7)


def test_a_file_and_a_directory_at_one_path_show_as_the_directory() -> None:
    view = View()
    view.merge_all([file("a", 9, node="b", mode=0o644), file("a/b", 1)])
    tree = view.tree()
    assert tree["a"].kind is Kind.DIR and tree["a/b"].kind is Kind.FILE
    view.merge(file("a/b", 1).tombstone(HLC(10, 0, "a")))
    assert view.tree()["a"].kind is Kind.FILE  # nothing below it any more: the file again


def test_segments_apply_in_sequence() -> None:
    view = View()
    s1 = Segment("a", 1, (file("f", 1),))
    s3 = Segment("a", 3, (file("g", 3),))
    assert view.apply_segment(s1) == [s1.entries[0]]
    assert view.apply_segment(s1) == []  # again: nothing
    with pytest.raises(ValueError, match="gap"):
        view.apply_segment(s3)
    assert view.frontier == {"a": 1}


def test_snapshot_brings_frontier_and_entries() -> None:
    a = View()
    for seq in range(1, 4):
        a.apply_segment(Segment("a", seq, (file(f"f{seq}", seq),)))
    a.apply_segment(Segment("b", 1, (file("f1", 10, node="b"),)))
    snap = decode_snapshot(encode_snapshot(a.snapshot(4)))
    late = View()
    late.apply_segment(Segment("a", 1, (file("f1", 1),)))
    late.apply_snapshot(snap)
    assert late.tree() == a.tree() and late.frontier == {"a": 3, "b": 1}
    assert late.snapshot_gen == 4 and late.covers(a.frontier)


def test_outbox_keeps_the_newest_entry_per_path() -> None:
    clock = HybridClock("a")
    box = Outbox("a")
    assert box.seal(1) is None
    first = Entry("refs/main", Kind.FILE, clock.now(), content=b"\1" * 32)
    second = Entry("refs/main", Kind.FILE, clock.now(), content=b"\2" * 32)
    box.add(second)
    box.add(first)
    box.add(Entry("blobs/x", Kind.FILE, clock.now(), content=CID))
    seg = box.seal(7)
    assert seg is not None and seg.seq == 7 and len(seg.entries) == 2
    assert {e.content for e in seg.entries if e.path == "refs/main"} == {b"\2" * 32}
    with pytest.raises(ValueError, match="node b"):
        box.add(file("f", 1, node="b"))


def test_rename_moves_a_subtree() -> None:
    clock = HybridClock("a")
    view = View()
    view.merge_all([Entry("d", Kind.DIR, clock.now(), mode=0o755),
                    Entry("d/f", Kind.FILE, clock.now(), content=CID),
                    Entry("d/l", Kind.SYMLINK, clock.now(), target="f"),
                    Entry("dx", Kind.FILE, clock.now(), content=CID)])
    view.merge_all(rename_entries(view.tree(), "d", "e", clock))
    assert sorted(view.tree()) == ["dx", "e", "e/f", "e/l"]
    assert view.tree()["e/l"].target == "f"


def test_entries_are_checked() -> None:
    for bad in ("", "/abs", "a//b", "a/./b", "a/../b", "a/"):
        with pytest.raises(ValueError):
            file(bad, 1)
    with pytest.raises(ValueError):
        Entry("f", Kind.FILE, HLC(1, 0, "a"))  # no content
    with pytest.raises(ValueError):
        Entry("l", Kind.SYMLINK, HLC(1, 0, "a"), content=CID)
    with pytest.raises(ValueError):
        HybridClock("a/b")


def test_damage_is_detected() -> None:
    clock = HybridClock("a")
    seg = Segment("a", 1, tuple(Entry(f"f{i}", Kind.FILE, clock.now(), content=os.urandom(32))
                                for i in range(50)))
    data = encode_segment(seg)
    assert decode_segment(data) == seg
    rng = random.Random(1)
    for _ in range(200):
        bad = bytearray(data)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        with pytest.raises(DamagedObject):
            decode_segment(bytes(bad))
    for cut in (0, 10, 44, len(data) // 2, len(data) - 1):
        with pytest.raises(DamagedObject):
            decode_segment(data[:cut])
    with pytest.raises(DamagedObject, match="not a HUBFSSNP"):
        decode_snapshot(data)


# ---- properties -------------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "c", "\udcff"])  # a non-UTF-8 byte, as os.fsdecode gives
paths = st.lists(names, min_size=1, max_size=3).map("/".join)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    path = draw(paths)
    hlc = HLC(draw(st.integers(0, 20)), draw(st.integers(0, 3)),
              draw(st.sampled_from(["n1", "n2", "n3"])))
    kind = draw(st.sampled_from(list(Kind)))
    return Entry(path, kind, hlc, mode=draw(st.sampled_from([0o600, 0o644, 0o755, 0o700])),
                 uid=draw(st.integers(0, 2)), size=draw(st.integers(0, 5)),
                 content=draw(st.binary(min_size=32, max_size=32)) if kind is Kind.FILE
                 else None,
                 target=draw(paths) if kind is Kind.SYMLINK else None)


@settings(max_examples=150, deadline=None)
@given(st.lists(entries(), max_size=30), st.randoms(use_true_random=False))
def test_merge_is_order_free_and_idempotent(batch: list[Entry], rnd: random.Random) -> None:
    one = View()
    one.merge_all(batch)
    shuffled = list(batch) * 2
    rnd.shuffle(shuffled)
    other = View()
    other.merge_all(shuffled)
    assert one.entries == other.entries
    assert one.tree() == other.tree()
    # Every live path has its ancestors as directories.
    tree = one.tree()
    for path in tree:
        parent = path.rpartition("/")[0]
        if parent:
            assert tree[parent].kind is Kind.DIR


@settings(max_examples=100, deadline=None)
@given(st.lists(entries(), max_size=30))
def test_objects_round_trip(batch: list[Entry]) -> None:
    seg = Segment("n1", 3, tuple(batch))
    assert decode_segment(encode_segment(seg)) == seg
    snap = Snapshot(2, {"n1": 3, "n2": 9}, tuple(batch))
    assert decode_snapshot(encode_snapshot(snap)) == snap
