import numpy as np
import pytest

from saebench.data.cache import Store


def test_collect_resumes_after_interruption(tmp_path):
    calls = []

    def produce(start, stop):
        calls.append(start)
        if start == 6 and len(calls) < 4:
            raise KeyboardInterrupt  # killed half-way
        return {"a": np.arange(start, stop)[:, None] * np.ones((1, 3)), "b": np.arange(start, stop)}

    store = Store("test", {"x": 1}, root=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.collect(("a", "b"), 10, 3, produce)
    assert calls == [0, 3, 6]
    assert not store.has("a")
    out = Store("test", {"x": 1}, root=tmp_path).collect(("a", "b"), 10, 3, produce)
    assert calls == [0, 3, 6, 6, 9]  # only the missing chunks ran again
    np.testing.assert_array_equal(out["b"], np.arange(10))
    assert out["a"].shape == (10, 3)
    assert not list(store.folder.glob("shards-*"))
    assert not list(store.folder.glob(".*tmp"))


def test_keys_separate_folders(tmp_path):
    a, b = Store("k", {"layer": 1}, root=tmp_path), Store("k", {"layer": 2}, root=tmp_path)
    a.save("x", np.zeros(2))
    assert a.has("x") and not b.has("x")


def test_covering_store_serves_a_prefix(tmp_path):
    big = Store("k", {"model": "m", "n": 10}, root=tmp_path)
    big.save("a", np.arange(10))
    Store("k", {"model": "other", "n": 50}, root=tmp_path).save("a", np.arange(50))
    found = Store.covering("k", {"model": "m", "n": 4}, "n", tmp_path, "a")
    assert found is not None and found.key["n"] == 10
    assert Store.covering("k", {"model": "m", "n": 11}, "n", tmp_path, "a") is None


def test_context_reuses_a_bigger_collection(make_context):
    context = make_context()
    big = np.array(context.site.resid("train", 20))
    small = context.site.resid("train", 8)
    np.testing.assert_array_equal(small, big[:8])
    np.testing.assert_array_equal(context.site.windows("train", 8), context.site.windows("train", 20)[:8])
    assert not context.store("resid-train", {"n_windows": 8, "start": 0}).has("resid")


def test_cached_computes_once(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return np.arange(5)

    store = Store("k", {"x": 1}, root=tmp_path)
    np.testing.assert_array_equal(store.cached("a", make), np.arange(5))
    np.testing.assert_array_equal(Store("k", {"x": 1}, root=tmp_path).cached("a", make), np.arange(5))
    assert calls == [1]


def test_lock_is_reentrant_within_a_process(tmp_path):
    from saebench.data.locks import held

    store = Store("k", {"x": 1}, root=tmp_path)
    with store.lock() as outer:
        assert outer.locked
        with store.lock():
            store.save("a", np.zeros(3))  # save takes the same lock again
        assert held(store.folder / ".lock")
    assert not held(store.folder / ".lock")
    assert store.has("a")
