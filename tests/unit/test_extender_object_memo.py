"""``scheduler_extender/object_memo.py``: values kept per live object, keyed by identity, gone with the object."""

from __future__ import annotations

import gc

from fuyao.scheduler_extender.object_memo import ObjectMemo


class Frozen:
    """Stands for a frozen model: equal by value, so only identity tells two apart."""

    def __init__(self, value: int):
        self.value = value


def test_a_value_is_computed_once_per_object_and_key() -> None:
    memo: ObjectMemo[int] = ObjectMemo()
    calls: list[tuple[int, str]] = []

    def compute(obj: Frozen, key: str) -> int:
        calls.append((obj.value, key))
        return obj.value * 10 + len(key)

    a, b = Frozen(1), Frozen(1)
    assert memo.get(a, "x", lambda: compute(a, "x")) == 11
    assert memo.get(a, "x", lambda: compute(a, "x")) == 11
    assert memo.get(a, "yy", lambda: compute(a, "yy")) == 12
    assert memo.get(b, "x", lambda: compute(b, "x")) == 11  # another object, equal or not: its own entries
    assert calls == [(1, "x"), (1, "yy"), (1, "x")]
    memo.clear()
    assert memo.get(a, "x", lambda: compute(a, "x")) == 11 and len(calls) == 4


def test_entries_go_with_their_object_and_a_reused_id_never_sees_them() -> None:
    memo: ObjectMemo[str] = ObjectMemo()
    seen_ids: dict[int, str] = {}
    for i in range(2000):  # CPython hands a freed object's memory (its id) to the next one of that size
        obj = Frozen(i)
        kept = memo.get(obj, "k", lambda i=i: f"value {i}")  # type: ignore[misc]
        assert kept == f"value {i}", (i, seen_ids.get(id(obj)))  # never an earlier object's value
        seen_ids[id(obj)] = kept
        del obj
    assert len(set(seen_ids)) < 2000  # ids were reused, so the check above meant something
    gc.collect()
    assert len(memo) == 0  # nothing kept for objects that are gone


def test_entries_per_object_are_bounded() -> None:
    memo: ObjectMemo[int] = ObjectMemo(per_object=3)
    obj = Frozen(0)
    for k in range(10):
        memo.get(obj, k, lambda k=k: k)  # type: ignore[misc]
    assert len(memo._entries[id(obj)]) <= 3
    assert memo.get(obj, 9, lambda: -1) == 9  # the newest stays
