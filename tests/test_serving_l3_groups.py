"""The model served from L3 objects of ``g`` full-space pages (``StorageConfig.
pages_per_object``): whole groups only are written, a hit fetches whole groups (pages
outside the hit go to scratch slots, freed at the claim), a lookup checks one object
per group, and the output equals recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.spec import PageSpace
from jaxhicache.storage import FileBackend, page_hashes
from jaxhicache.storage.latency import LatencyBackend
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.serving import ServingLoop

TOL = 1e-4
PAGE = 16


@pytest.fixture(scope="module")
def model():
    cfg = TinyDSV4Config.mini(num_layers=4)
    return PagedModel(cfg, init_params(cfg, 0), pp=2)


def _loop(model, store, g, backup=True) -> ServingLoop:
    l3 = StorageConfig(  # the cost model off: these tests pin what is served, not when
        model_id="tiny",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,
        pages_per_object=g,
        backup=backup,
    )
    return ServingLoop.for_model(
        model,
        device_pages=16,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=store,
        layerwise=True,
    )


def _conversation(model, root, g, n=105):
    """Instance A serves ``n`` prompt tokens + 6 and closes (its pages written through)."""
    rng = np.random.default_rng(5)
    turn1 = rng.integers(0, model.config.vocab, n).astype(np.int32)
    a = _loop(model, FileBackend(root), g)
    r1 = a.serve(turn1, 6)
    a.close()
    return np.concatenate([turn1, r1.generated, rng.integers(0, model.config.vocab, 9)])


def _files(root, unit):
    return sorted(p for p in root.rglob("*") if p.is_file() and f"/{unit}/" in str(p))


def _restored(model, root, g, tokens, want, gen=3, **kw):
    """A fresh instance over ``root`` serves ``tokens``: ``want`` tokens from L3, the
    output equal to recomputation, every slot accounted for."""
    b = _loop(model, FileBackend(root), g, **kw)
    r = b.serve(tokens, gen)
    assert r.storage_cached_tokens == want
    _close_to(r, b.serve_uncached(tokens, gen))
    b.cache.check_invariants()
    b.close()


def _close_to(r, oracle):
    d = max(
        float(np.abs(r.step_logits - oracle.step_logits).max()),
        float(np.abs(r.prefill_logits - oracle.prefill_logits[r.cached_tokens :]).max()),
    )
    assert d <= TOL, d


def test_whole_groups_are_written_and_a_fresh_instance_restores_them(model, tmp_path):
    # A's KV: 105 + 6 - 1 = 110 tokens, 6 whole pages: one group of 4; pages 4-5 wait
    turn2 = _conversation(model, tmp_path, 4)
    files = _files(tmp_path, "full-x4")
    stages = {p.parents[2] for p in files}  # .../layers-a-b/full-x4/xx/hash
    assert files and len(files) == len(stages)  # one object per stage with a full space
    assert not _files(tmp_path, "full")
    names = {p.name for p in _files(tmp_path, "full-x4")}
    assert names == {page_hashes(turn2[: 4 * PAGE], PAGE)[3]}  # keyed by its last page
    _restored(model, tmp_path, 4, turn2, 4 * PAGE)
    # the same store read with g = 1 finds none of it (other keys): a miss
    c = _loop(model, FileBackend(tmp_path), 1)
    assert c.serve(turn2, 1).storage_cached_tokens == 0
    c.close()


def test_a_group_is_written_once_the_sequence_completes_it(model, tmp_path):
    """Pages 4-5 of turn 1 wait in host; turn 2 (same instance) completes the group of
    pages 4-7 with them: written then, and a fresh instance restores 8 pages."""
    rng = np.random.default_rng(6)
    vocab = model.config.vocab
    a = _loop(model, FileBackend(tmp_path), 4)
    turn1 = rng.integers(0, vocab, 105).astype(np.int32)
    r1 = a.serve(turn1, 6)
    a.cache.poll(wait=True)
    assert len(_files(tmp_path, "full-x4")) == len(
        {p.parents[2] for p in _files(tmp_path, "full-x4")}
    )
    turn2 = np.concatenate([turn1, r1.generated, rng.integers(0, vocab, 30)]).astype(np.int32)
    r2 = a.serve(turn2, 2)
    a.close()
    stages = {p.parents[2] for p in _files(tmp_path, "full-x4")}
    assert len(_files(tmp_path, "full-x4")) == 2 * len(stages)  # pages 0-3 and 4-7
    turn3 = np.concatenate([turn2, r2.generated, rng.integers(0, vocab, 5)]).astype(np.int32)
    _restored(model, tmp_path, 4, turn3, 8 * PAGE, gen=2)


def test_a_hit_starting_mid_group_loads_the_group_through_scratch_slots(model, tmp_path):
    """The tree holds pages 0-1 (served here); the L3 object of pages 0-3 is fetched
    whole, pages 0-1 into scratch slots that the claim frees; pages 2-3 are the hit."""
    turn2 = _conversation(model, tmp_path, 4)
    b = _loop(model, FileBackend(tmp_path), 4)
    b.serve(turn2[: 2 * PAGE + 3], 1)  # pages 0-1 in the tree (page 2 differs: generated)
    r = b.serve(turn2, 3)
    assert r.device_cached_tokens + r.host_cached_tokens == 2 * PAGE
    assert r.storage_cached_tokens == 2 * PAGE
    _close_to(r, b.serve_uncached(turn2, 3))
    assert b.cache.l3.in_flight()[PageSpace.FULL] == 0  # the scratch slots went back
    b.cache.check_invariants()
    b.close()


def test_a_hit_ending_mid_group_uses_the_window_of_its_end(model, tmp_path):
    """Page 3's SWA object (the window of end 4) is gone: the hit falls back to end 3,
    the group of pages 0-3 is fetched whole, page 3 into a scratch slot."""
    turn2 = _conversation(model, tmp_path, 4)
    h3 = page_hashes(turn2[: 4 * PAGE], PAGE)[3]
    gone = [p for p in _files(tmp_path, "swa") if p.name == h3]
    assert gone
    for p in gone:
        p.unlink()
    _restored(model, tmp_path, 4, turn2, 3 * PAGE)


@pytest.mark.parametrize("g", [1, 4])
def test_a_lookup_checks_one_object_per_group(model, tmp_path, g):
    turn2 = _conversation(model, tmp_path, g, n=8 * PAGE + 10)  # 8 pages: 2 groups of 4
    store = LatencyBackend(FileBackend(tmp_path), 0.0)
    b = _loop(model, store, g, backup=False)  # no writes: every check is the lookup's
    store.reset_round_trips()
    r = b.serve(turn2, 1)
    assert r.storage_cached_tokens == 8 * PAGE
    n = store.requests()
    # the key (prompt[:-1]) spans 9 pages, 8 of them stored. Full space, per stage with
    # one: g = 1, pages 0-8 (page 8 the first absent); g = 4, the 2 groups ending by
    # page 9 (no check past them). Windows: every page, per stage with an SWA space.
    full = len({p.parents[2] for p in _files(tmp_path, "full" if g == 1 else f"full-x{g}")})
    swa = len({p.parents[2] for p in _files(tmp_path, "swa")})
    assert n["stat"] == full * (9 if g == 1 else 2) + swa * 9, n
    assert n["read"] == full * 8 // g + swa * 1, n  # the hit's objects and its window
    b.close()


def test_a_missing_group_ends_the_hit_where_it_starts(model, tmp_path):
    """Groups 0-3 and 4-7 stored, then 4-7 lost on one stage: the hit is pages 0-3,
    not a fetch of 8 pages that fails whole (a miss)."""
    turn2 = _conversation(model, tmp_path, 4, n=8 * PAGE + 10)
    h7 = page_hashes(turn2[: 8 * PAGE], PAGE)[7]
    lost = [p for p in _files(tmp_path, "full-x4") if p.name == h7]
    assert lost
    lost[0].unlink()
    _restored(model, tmp_path, 4, turn2, 4 * PAGE, gen=2, backup=False)


def test_write_back_writes_the_groups_a_leaf_eviction_completes(model, tmp_path):
    """Write-back: evicting B's leaf (pages 4-5) backs up its path (host residency is
    prefix-closed), and the writes cover every group those pages complete: pages 0-2
    and 3-5, the latter with page 3 from the parent node's host slot."""
    rng = np.random.default_rng(8)
    vocab = model.config.vocab
    loop = ServingLoop.for_model(
        model,
        device_pages=16,
        write_policy=WritePolicy.WRITE_BACK,
        storage=StorageConfig(
            model_id="tiny", prefetch_threshold=PAGE, cost_model=False, pages_per_object=3
        ),
        store=FileBackend(tmp_path),
        layerwise=True,
    )
    a = rng.integers(0, vocab, 4 * PAGE + 3).astype(np.int32)
    loop.serve(a, 2)
    b = np.concatenate([a[: 4 * PAGE], rng.integers(0, vocab, 40)]).astype(np.int32)
    loop.serve(b, 2)  # the tree: pages 0-3 (shared), B's pages 4-5 a leaf below them
    assert not _files(tmp_path, "full-x3")  # write-back: nothing in host or L3 yet
    assert loop.evict(2) >= 2
    loop.cache.poll(wait=True)
    s = loop.cache.stats()
    assert s["backed_up_pages"] == 6 and s["storage_write_failures"] == 0
    hb = page_hashes(b[: 6 * PAGE], PAGE)
    assert {p.name for p in _files(tmp_path, "full-x3")} == {hb[2], hb[5]}
    loop.close()
    _restored(model, tmp_path, 3, b, 6 * PAGE, gen=2, backup=False)
