"""The serving loop end to end: ``PagedModel`` + ``HiCache`` on PP 1, 2 and 4.

Every cached run is compared with the same request recomputed from scratch
(``ServingLoop.serve_uncached``) within ``TOL``: the logits of each generated
token and of every computed prompt position. The cached and uncached runs chunk
the prefix differently (the cached prefix was written by a 13-token chunk and
decode steps), so they agree to a few 1e-6, not bit for bit; cache errors show
up orders of magnitude above ``TOL`` (the negative controls below).

The tier counters of each report are asserted, so a test cannot pass by
silently recomputing (a miss would report ``cached_tokens == 0``). Host-tier
tests zero every device page after the eviction, so the restored data can only
have come from the host slabs.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxhicache.cache import WritePolicy
from jaxhicache.spec import PageSpace, PoolKind, Tier
from jaxhicache.transfer import CopyPath
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.serving import ServingLoop, bucket_pages

TOL = 1e-4  # max |Δlogit| between a cached and an uncached run (observed 2.6e-6 to 4.7e-6)
PAGE = 16  # mini preset
DEVICE_PAGES = 8  # one pool size for every loop: the compiled forwards are reused
TURN1_PROMPT, TURN1_NEW = 45, 6  # KV written for 50 tokens: 3 whole pages + a partial one
TURN2_USER, TURN2_NEW = 13, 6  # turn 2 = 45 + 6 + 13 = 64 tokens, cached prefix 48
PREFIX = 48
# PP 4 uses 9 layers split [3, 2, 2, 2] so that every stage holds a C4 layer
# (its compressor state is what the reference system restored on the wrong stage).
LAYOUTS = {1: (6, None), 2: (6, None), 4: (9, [3, 2, 2, 2])}


class _Models:
    def __init__(self):
        self.models: dict[int, PagedModel] = {}
        self.oracle: dict[tuple, object] = {}

    def model(self, pp: int) -> PagedModel:
        if len(jax.devices()) < pp:
            pytest.skip(f"needs {pp} devices, have {len(jax.devices())}")
        if pp not in self.models:
            layers, partition = LAYOUTS[pp]
            cfg = TinyDSV4Config.mini(num_layers=layers)
            self.models[pp] = PagedModel(cfg, init_params(cfg, 0), pp=pp, partition=partition)
        return self.models[pp]

    def loop(self, pp: int, path: CopyPath = CopyPath.DIRECT, **kw) -> ServingLoop:
        kw.setdefault("device_pages", DEVICE_PAGES)
        kw.setdefault("layerwise", True)  # the engine's path; the default is tested below
        return ServingLoop.for_model(self.model(pp), copy_path=path, **kw)

    def uncached(self, loop: ServingLoop, pp: int, tokens, max_new: int):
        key = (pp, tuple(int(t) for t in tokens), max_new)
        if key not in self.oracle:
            self.oracle[key] = loop.serve_uncached(tokens, max_new)
        return self.oracle[key]


@pytest.fixture(scope="module")
def models():
    return _Models()


def _prompt(seed: int, n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def _turn2(loop: ServingLoop, seed: int, r1) -> np.ndarray:
    vocab = loop.model.config.vocab
    user = _prompt(seed + 1000, TURN2_USER, vocab)
    return np.concatenate([_prompt(seed, TURN1_PROMPT, vocab), r1.generated, user])


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _check_report(loop: ServingLoop, r, prompt, max_new: int) -> None:
    """Report fields are consistent with each other and with the request."""
    page, vocab = loop.page, loop.model.config.vocab
    assert r.prompt_len == len(prompt)
    assert r.cached_tokens == (
        r.device_cached_tokens + r.host_cached_tokens + r.storage_cached_tokens
    )
    assert r.cached_tokens + r.prefill_tokens == r.prompt_len
    assert r.cached_tokens % page == 0 and r.prefill_tokens >= 1
    assert r.loaded_pages * page == r.host_cached_tokens + r.storage_cached_tokens
    assert r.generated.shape == (max_new,)
    assert r.step_logits.shape == (max_new, vocab)
    assert r.prefill_logits.shape == (r.prefill_tokens, vocab)
    np.testing.assert_array_equal(np.argmax(r.step_logits, axis=-1), r.generated)  # greedy
    np.testing.assert_array_equal(r.step_logits[0], r.prefill_logits[-1])
    assert 0 < r.ttft_s <= r.total_s
    written = len(prompt) + max_new - 1  # the last generated token is never fed back
    n_pages = math.ceil(written / page)
    assert r.full_page_ids.shape == r.swa_page_ids.shape == (n_pages,)
    assert (r.full_page_ids >= 0).all()
    if r.used_cache:
        assert r.inserted_tokens == written // page * page
        w = r.cached_tokens // page
        assert (r.swa_page_ids[max(0, w - 1) :] >= 0).all()  # window page + own pages
        assert (r.swa_page_ids[: max(0, w - 1)] == -1).all()  # tombstones before it


def _check_cache(loop: ServingLoop) -> None:
    """Every page is owned once (no leak, no double free) once requests are done."""
    cache = loop.cache
    cache.poll(wait=True)
    cache.check_invariants()
    t = cache.tree
    used = {
        f"{tier.value}-{space.value}": al.num_used for (tier, space), al in cache.ledger.items()
    }
    assert used["device-full"] == t.total_device_pages(), used
    assert used["device-swa"] == t.total_device_swa_pages(), used
    assert used["host-full"] == t.total_host_pages(), used
    assert used["host-swa"] == t.total_host_swa_pages(), used


def _serve(loop, prompt, max_new):
    r = loop.serve(prompt, max_new)
    _check_report(loop, r, prompt, max_new)
    _check_cache(loop)
    return r


def _wipe_device(loop: ServingLoop) -> None:
    """Zeroes every device page; only valid when the tree holds none of them."""
    cache = loop.cache
    assert cache.tree.total_device_pages() == 0
    assert cache.ledger[Tier.DEVICE, PageSpace.FULL].num_used == 0
    pools = loop.pools
    loop.pools = pools.replace(
        arrays={
            k: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
            for k, a in pools.arrays.items()
        }
    )


def _evict_all_to_host(loop: ServingLoop, min_pages: int = PREFIX // PAGE) -> None:
    freed = loop.evict(loop.cache.config.device_pages)
    assert freed >= min_pages
    assert loop.cache.tree.total_device_pages() == 0
    assert loop.cache.tree.total_host_pages() >= min_pages
    _wipe_device(loop)


def _assert_matches_oracle(r, oracle) -> float:
    """Cached run == uncached recompute within TOL; returns the max difference."""
    d = max(
        _diff(r.step_logits, oracle.step_logits),
        _diff(r.prefill_logits, oracle.prefill_logits[r.cached_tokens :]),
    )
    assert d <= TOL, f"cached run differs from the recompute by {d:.3g} > {TOL}"
    np.testing.assert_array_equal(r.generated, oracle.generated)
    return d


def _first_turn(models, loop, pp, seed):
    vocab = loop.model.config.vocab
    p1 = _prompt(seed, TURN1_PROMPT, vocab)
    r1 = _serve(loop, p1, TURN1_NEW)
    assert r1.cached_tokens == 0  # fresh conversation: a miss
    _assert_matches_oracle(r1, models.uncached(loop, pp, p1, TURN1_NEW))
    return r1


# ---------------------------------------------------------------- multi-turn
PATHS = [CopyPath.DIRECT, CopyPath.STAGED]


@pytest.mark.parametrize("path", PATHS, ids=["direct", "staged"])
@pytest.mark.parametrize("tier", ["device", "host", "pressure"])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_multi_turn_equivalence(models, pp, tier, path):
    """Turn 2 from a prefix on device, on host (evicted), or pushed out by other traffic,
    on both transfer paths (staged: the GPU's gather/staging/scatter path, run on CPU)."""
    loop = models.loop(pp, path)
    r1 = _first_turn(models, loop, pp, seed=pp)
    if tier == "host":
        _evict_all_to_host(loop)
    elif tier == "pressure":  # two more conversations need the device pages
        for other in (pp + 100, pp + 200):
            _first_turn(models, loop, pp, seed=other)
        assert loop.cache.stats()["device_evicted_pages"] >= PREFIX // PAGE
    p2 = _turn2(loop, pp, r1)
    r2 = _serve(loop, p2, TURN2_NEW)
    assert r2.cached_tokens == PREFIX and r2.prefill_tokens == len(p2) - PREFIX
    if tier == "device":
        assert (r2.device_cached_tokens, r2.host_cached_tokens) == (PREFIX, 0)
    else:
        assert (r2.device_cached_tokens, r2.host_cached_tokens) == (0, PREFIX)
        assert r2.loaded_pages == PREFIX // PAGE
    _assert_matches_oracle(r2, models.uncached(loop, pp, p2, TURN2_NEW))
    loop.close()


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "one-load"])
@pytest.mark.parametrize("path", PATHS, ids=["direct", "staged"])
def test_three_turns_of_unaligned_lengths(models, path, layerwise):
    """The issue's reproduction: turns of 16 -> 42 -> 60 tokens on PP 2 (sequences that do
    not end on a page boundary) equal recomputation at every turn, from device and host."""
    pp = 2
    loop = models.loop(pp, path, layerwise=layerwise)
    vocab = loop.model.config.vocab
    prompt, max_new = _prompt(5, 16, vocab), 3
    prev_kv = 0  # KV positions the previous turn wrote (prompt + generated but the last)
    for turn, total in enumerate((16, 42, 60)):
        if turn:
            user = _prompt(500 + turn, total - prompt.size, vocab)
            prompt = np.concatenate([prompt, user])
        if turn == 2:
            _evict_all_to_host(loop, min_pages=2)
        r = _serve(loop, prompt, max_new)
        assert r.prompt_len == total
        if turn:  # the previous turn's whole pages are served
            assert r.cached_tokens == prev_kv // PAGE * PAGE > 0
        _assert_matches_oracle(r, models.uncached(loop, pp, prompt, max_new))
        prev_kv = r.prompt_len + max_new - 1
        prompt = np.concatenate([prompt, r.generated])
    assert loop.cache.stats()["host_hit_tokens"] > 0
    loop.close()


@pytest.mark.parametrize("path", PATHS, ids=["direct", "staged"])
def test_chunks_longer_than_a_page(models, path):
    """chunk_size 64 > page 16: a second conversation branches off at 48, a page boundary
    inside turn 1's first chunk, so the restore needs the compressor state that chunk
    wrote at the end of every page (the per-page ring write), served from host."""
    pp = 2
    loop = models.loop(pp, path, chunk_size=64)
    vocab = loop.model.config.vocab
    p1 = _prompt(41, 80, vocab)
    r1 = _serve(loop, p1, 2)
    _assert_matches_oracle(r1, models.uncached(loop, pp, p1, 2))
    _evict_all_to_host(loop, min_pages=5)
    p2 = np.concatenate([p1[:PREFIX], _prompt(42, 20, vocab)])
    r2 = _serve(loop, p2, TURN2_NEW)
    assert (r2.device_cached_tokens, r2.host_cached_tokens) == (0, PREFIX)
    _assert_matches_oracle(r2, models.uncached(loop, pp, p2, TURN2_NEW))
    loop.close()


@pytest.mark.parametrize("path", PATHS, ids=["direct", "staged"])
def test_batch_with_host_hits_shares_one_load(models, path):
    """Two conversations' second turns admitted together: one merged load, both equal
    recomputation."""
    pp = 2
    loop = models.loop(pp, path, device_pages=16)
    firsts = [_first_turn(models, loop, pp, seed=s) for s in (51, 52)]
    _evict_all_to_host(loop, min_pages=2 * PREFIX // PAGE)
    loads = loop.cache.stats()["load_dispatches"]
    prompts = [_turn2(loop, s, r) for s, r in zip((51, 52), firsts, strict=True)]
    reports = loop.serve_batch(prompts, TURN2_NEW)  # one int for all, as HiCache.admit
    assert loop.cache.stats()["load_dispatches"] == loads + 1
    for p2, r2 in zip(prompts, reports, strict=True):
        _check_report(loop, r2, p2, TURN2_NEW)
        assert (r2.device_cached_tokens, r2.host_cached_tokens) == (0, PREFIX)
        _assert_matches_oracle(r2, models.uncached(loop, pp, p2, TURN2_NEW))
    _check_cache(loop)
    loop.close()


@pytest.mark.parametrize("path", PATHS, ids=[p.value for p in PATHS])
def test_failed_first_request_still_lands_the_batch_load(models, path, monkeypatch):
    """The first request of a batch fails before its first chunk ran (the chunk that was
    to carry everyone's layer-wise load): the loaded pages still land, so a later hit on
    them reads the host copy, not the wiped device pages."""
    pp = 2
    loop = models.loop(pp, path, device_pages=16)
    firsts = [_first_turn(models, loop, pp, seed=s) for s in (61, 62)]
    _evict_all_to_host(loop, min_pages=2 * PREFIX // PAGE)
    prompts = [_turn2(loop, s, r) for s, r in zip((61, 62), firsts, strict=True)]
    prefill = loop.model.prefill

    def failing(*a, **k):  # fails once, before any program ran
        monkeypatch.setattr(loop.model, "prefill", prefill)
        raise RuntimeError("injected: the forward failed before its first chunk")

    monkeypatch.setattr(loop.model, "prefill", failing)
    with pytest.raises(RuntimeError, match="injected"):
        loop.serve_batch(prompts, [TURN2_NEW, TURN2_NEW])
    r2 = loop.serve(prompts[1], TURN2_NEW)
    assert r2.device_cached_tokens == PREFIX  # the pages the failed batch loaded
    _assert_matches_oracle(r2, models.uncached(loop, pp, prompts[1], TURN2_NEW))
    _check_cache(loop)
    loop.close()


def test_second_conversation_hits_a_shared_system_prompt(models):
    """Two conversations that share a 3-page system prompt: the second is served all three
    pages from the cache (SWA windows outside a sequence's end are kept, not freed)."""
    pp = 2
    loop = models.loop(pp, device_pages=16)
    vocab = loop.model.config.vocab
    system = _prompt(60, 3 * PAGE, vocab)
    a = np.concatenate([system, _prompt(61, 20, vocab)])
    b = np.concatenate([system, _prompt(62, 9, vocab)])
    ra = _serve(loop, a, 2)
    assert ra.cached_tokens == 0
    rb = _serve(loop, b, 2)
    assert (rb.cached_tokens, rb.device_cached_tokens) == (3 * PAGE, 3 * PAGE)
    _assert_matches_oracle(rb, models.uncached(loop, pp, b, 2))
    loop.close()


# ---------------------------------------------------------- negative control
def _corrupt(loop, prompt, kind, stage, page_pos, ring_slot=None):
    """Zeroes one restored page (or ring row) of one stage's slab before the load-back."""
    cache = loop.cache
    m = cache.layer_maps[stage]
    assert m.num_layers_of(kind) > 0, f"stage {stage} has no {kind.value} layer"
    match = cache.lookup(prompt[:-1])
    assert match.host_len == PREFIX  # the whole prefix comes from host
    ids = match.swa_host_ids if kind.page_space is PageSpace.SWA else match.host_full_ids
    host_id = int(ids[page_pos])
    assert host_id >= 0
    slab = cache.host.slab(stage, kind)  # page_first: [pages, layers, *row]
    assert slab[host_id, 0].any(), "nothing to corrupt: the host copy is empty"
    if ring_slot is None:
        slab[host_id, 0] = 0
    else:
        slab[host_id, 0, ring_slot] = 0


CORRUPTIONS = {
    # C4 compressor state of the restored window page, ring slot 7 (token P-1, an A half)
    "c4_state_row": (PoolKind.C4_STATE, 1, -1, 7),
    "c4_indexer_state_row": (PoolKind.C4_INDEXER_STATE, 0, -1, 4),
    "c4_kv_page": (PoolKind.C4_KV, 0, -1, None),  # C4 entries 8..11 of layer 2
    "c128_kv_page": (PoolKind.C128_KV, 1, 0, None),  # HCA entries 0..1 of layer 3
}


@pytest.mark.parametrize("path", PATHS, ids=["direct", "staged"])
def test_corrupted_host_copy_is_detected(models, path):
    """Corrupting the host copy before the L2 load-back breaks the equivalence."""
    pp = 2
    diffs = {}
    for name, (kind, stage, page_pos, slot) in CORRUPTIONS.items():
        loop = models.loop(pp, path)
        r1 = _first_turn(models, loop, pp, seed=7)
        _evict_all_to_host(loop)
        p2 = _turn2(loop, 7, r1)
        _corrupt(loop, p2, kind, stage, page_pos, slot)
        r2 = _serve(loop, p2, TURN2_NEW)
        assert (r2.device_cached_tokens, r2.host_cached_tokens) == (0, PREFIX)
        oracle = models.uncached(loop, pp, p2, TURN2_NEW)
        diffs[name] = max(
            _diff(r2.step_logits, oracle.step_logits),
            _diff(r2.prefill_logits, oracle.prefill_logits[PREFIX:]),
        )
        loop.close()
    print("negative-control max |Δlogit| per corruption:", diffs)
    for name, d in diffs.items():
        assert d > TOL, f"corrupting {name} went undetected (max diff {d:.3g} <= {TOL})"


# ------------------------------------------------- the reference system's bug
@pytest.mark.parametrize("pp", [2, 4])
def test_host_restore_on_every_stage(models, pp):
    """Every stage restores its own C4 state rows from host (not stage 0's, not empty)."""
    loop = models.loop(pp, CopyPath.STAGED)
    cache = loop.cache
    r1 = _first_turn(models, loop, pp, seed=11)
    last = PREFIX // PAGE - 1  # the window page of the restore point P = 48
    old_swa = int(r1.swa_page_ids[last])
    old_full = r1.full_page_ids[: PREFIX // PAGE]
    kinds = (PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE, PoolKind.SWA_KV)
    before = {k: np.asarray(loop.pools[k])[:, :, old_swa].copy() for k in kinds}
    before[PoolKind.C4_KV] = np.asarray(loop.pools[PoolKind.C4_KV])[:, :, old_full].copy()
    _evict_all_to_host(loop)
    p2 = _turn2(loop, 11, r1)
    assert int(cache.lookup(p2[:-1]).swa_host_ids[-1]) >= 0  # the window page is on host
    r2 = _serve(loop, p2, TURN2_NEW)
    assert (r2.device_cached_tokens, r2.host_cached_tokens) == (0, PREFIX)
    new_swa = int(r2.swa_page_ids[last])
    new_full = r2.full_page_ids[: PREFIX // PAGE]
    after = {k: np.asarray(loop.pools[k])[:, :, new_swa] for k in kinds}
    after[PoolKind.C4_KV] = np.asarray(loop.pools[PoolKind.C4_KV])[:, :, new_full]
    for m in cache.layer_maps:
        r = m.pp_rank
        assert m.num_layers_of(PoolKind.C4_STATE) > 0, f"stage {r} has no C4 layer"
        for kind in (*kinds, PoolKind.C4_KV):
            nk = m.num_layers_of(kind)
            got, want = after[kind][r, :nk], before[kind][r, :nk]
            for k in range(nk):
                assert got[k].any(), f"stage {r} {kind.value} layer {k}: restored rows are zero"
            np.testing.assert_array_equal(got, want, err_msg=f"stage {r} {kind.value}")
    # the stages' states differ, so a restore from the wrong stage could not pass
    first = [after[PoolKind.C4_STATE][m.pp_rank, 0] for m in cache.layer_maps]
    for i in range(pp):
        for j in range(i + 1, pp):
            assert not np.array_equal(first[i], first[j]), (i, j)
    _assert_matches_oracle(r2, models.uncached(loop, pp, p2, TURN2_NEW))
    loop.close()


# -------------------------------------------------------------- write_back
def test_write_back_backs_up_on_eviction(models):
    """write_back: nothing reaches host until eviction; the host hit then gives the same logits."""
    pp = 2
    loop = models.loop(pp, write_policy=WritePolicy.WRITE_BACK)
    cache = loop.cache
    r1 = _first_turn(models, loop, pp, seed=21)
    p2 = _turn2(loop, 21, r1)
    dev = _serve(loop, p2, TURN2_NEW)  # from device
    assert (dev.device_cached_tokens, dev.host_cached_tokens) == (PREFIX, 0)
    assert cache.stats()["backups_issued"] == 0 and cache.tree.total_host_pages() == 0
    _evict_all_to_host(loop)  # backs up first, then demotes
    assert cache.stats()["backups_issued"] >= 1
    host = _serve(loop, p2, TURN2_NEW)
    assert (host.device_cached_tokens, host.host_cached_tokens) == (0, PREFIX)
    # same data, same chunking: the host hit equals the device hit bit for bit
    np.testing.assert_array_equal(host.step_logits, dev.step_logits)
    np.testing.assert_array_equal(host.prefill_logits, dev.prefill_logits)
    _assert_matches_oracle(host, models.uncached(loop, pp, p2, TURN2_NEW))
    loop.close()


# ------------------------------------------------------------------ misc
def test_report_and_accounting_over_mixed_traffic(models):
    """Mixed traffic on PP 2 (hits, misses, evictions both tiers, prompts of exact pages)."""
    pp = 2
    loop = models.loop(pp)
    vocab = loop.model.config.vocab
    base = _prompt(31, 2 * PAGE, vocab)  # exactly two pages: the match keeps the last token
    r = _serve(loop, base, 1)
    assert r.cached_tokens == 0 and r.inserted_tokens == 2 * PAGE
    # The same prompt again: the match stops at P = 16 (the last token is always computed);
    # the window page 0 was kept (reclaimable, not freed at insert): a hit. The request's
    # pages duplicate the tree's, so insert frees them (checked by _check_cache).
    r = _serve(loop, base, 3)
    assert (r.cached_tokens, r.prefill_tokens) == (PAGE, PAGE)
    _assert_matches_oracle(r, models.uncached(loop, pp, base, 3))
    longer = np.concatenate([base, _prompt(32, 20, vocab)])
    r = _serve(loop, longer, 2)
    assert r.device_cached_tokens == 2 * PAGE
    _assert_matches_oracle(r, models.uncached(loop, pp, longer, 2))
    assert loop.evict(DEVICE_PAGES) > 0
    assert loop.evict_host(4 * DEVICE_PAGES) > 0  # host-only leaves dropped: a full miss
    r = _serve(loop, longer, 2)
    assert r.cached_tokens == 0
    assert bucket_pages(5) == 8 and bucket_pages(9) == 16 and bucket_pages(1, 2) == 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        loop.serve(base, 0)
    with pytest.raises(ValueError, match=r"needs \d+ pages"):
        loop.serve_uncached(_prompt(33, DEVICE_PAGES * PAGE + 1, vocab), 1)
    _check_cache(loop)
    loop.close()
