"""The continuous-batching engine: batched decode, chunked prefill, concurrent prefix
hits, retraction under page pressure, aborts — every request's tokens equal the same
request served alone without a cache."""

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from models import PagedModel, TinyDSV4Config, init_params
from models.engine import Engine, EngineConfig

CFG = TinyDSV4Config.mini()  # page 16
PAGE = CFG.page_size
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return PagedModel(CFG, init_params(CFG, seed=0), pp=1)


def _engine(model, device_pages=48, host_pages=96, **kw):
    cache = HiCache(
        model.spec,
        model.mesh,
        HiCacheConfig(
            device_pages=device_pages,
            host_pages=host_pages,
            write_policy=WritePolicy.WRITE_THROUGH,
        ),
    )
    return Engine(model, cache, EngineConfig(record_logits=True, **kw))


def _prompt(rng, n):
    return rng.integers(0, CFG.vocab, n).astype(np.int32)


def _check_against_uncached(eng, prompts, max_new, done):
    for rid, (p, n) in enumerate(zip(prompts, max_new, strict=True)):
        c = done[rid]
        want, logits = eng.uncached(p, n)
        np.testing.assert_array_equal(c.generated, want, err_msg=f"request {rid}")
        np.testing.assert_allclose(c.step_logits, logits, atol=TOL, rtol=0)


def test_concurrent_requests_share_a_running_prefix_and_match_uncached(model):
    rng = np.random.default_rng(0)
    system = _prompt(rng, 3 * PAGE)
    prompts = [np.concatenate([system, _prompt(rng, k)]) for k in (5, 17, 30, 9, 40, 2)]
    max_new = [6, 20, 3, 12, 8, 18]
    eng = _engine(model, max_running=4, prefill_tokens=2 * PAGE)
    for p, n in zip(prompts, max_new, strict=True):
        eng.submit(p, n)
    done = eng.run(max_steps=500)
    assert len(done) == len(prompts) and eng.idle
    # The first request's system-prompt pages were inserted chunk by chunk while it
    # ran: later requests hit them before it finished.
    assert done[1].device_cached_tokens >= 2 * PAGE  # pages request 0 had inserted
    assert done[0].end_s > done[1].token_s[0]  # request 0 still ran when 1 was served
    assert sum(done[i].device_cached_tokens for i in range(1, 6)) >= 4 * 3 * PAGE
    _check_against_uncached(eng, prompts, max_new, done)
    eng.cache.check_invariants()
    assert eng.cache.stats()["device_full_pages_used"] == eng.cache.tree.total_device_pages()


def test_batched_decode_runs_every_running_request_in_one_forward(model, monkeypatch):
    rng = np.random.default_rng(1)
    prompts = [_prompt(rng, n) for n in (7, 12, 16, 3)]  # one chunk each
    eng = _engine(model, max_running=4, prefill_tokens=4 * PAGE)
    calls = []
    real = model.forward
    monkeypatch.setattr(
        model, "forward", lambda *a, **k: calls.append(np.asarray(a[4]).sum()) or real(*a, **k)
    )
    for p in prompts:
        eng.submit(p, 10)
    done = eng.run(max_steps=100)
    # step 1: one prefill forward (4 rows); then one decode forward per step (4 rows)
    assert eng.steps == 10 and len(calls) == 1 + 9
    assert [int(c) for c in calls[1:]] == [4] * 9  # n_valid summed: every request each step
    _check_against_uncached(eng, prompts, [10] * 4, done)


def test_retraction_under_page_pressure_keeps_work_and_tokens(model):
    rng = np.random.default_rng(2)
    prompts = [_prompt(rng, n) for n in (20, 25, 30, 18, 22)]
    max_new = [40, 40, 40, 40, 40]
    eng = _engine(model, device_pages=14, host_pages=28, max_running=5, prefill_tokens=5 * PAGE)
    for p, n in zip(prompts, max_new, strict=True):
        eng.submit(p, n)
    done = eng.run(max_steps=2000)
    assert eng.retractions > 0 and sum(c.retractions for c in done.values()) == eng.retractions
    _check_against_uncached(eng, prompts, max_new, done)
    eng.cache.check_invariants()
    assert eng.cache.stats()["retracted_requests"] == eng.retractions


def test_abort_and_stop_tokens(model):
    rng = np.random.default_rng(3)
    prompts = [_prompt(rng, n) for n in (40, 12, 50)]
    eng = _engine(model, max_running=3)
    want, _ = eng.uncached(prompts[1], 12)
    ids = [eng.submit(prompts[0], 30), eng.submit(prompts[1], 12, stop=[int(want[4])])]
    late = eng.submit(prompts[2], 5)
    eng.step()
    eng.step()
    eng.abort(ids[0])  # in flight
    eng.abort(late)  # maybe admitted, maybe waiting: both are allowed
    with pytest.raises(ValueError, match="is not waiting or in flight"):
        eng.abort(ids[0])
    done = eng.run(max_steps=100)
    assert done[ids[0]].aborted and done[late].aborted
    stop_at = int(np.argmax(want == want[4]))
    np.testing.assert_array_equal(done[ids[1]].generated, want[: stop_at + 1])
    eng.cache.check_invariants()
    assert eng.cache.stats()["device_full_pages_used"] == eng.cache.tree.total_device_pages()


def test_engine_config_refuses_bad_values():
    with pytest.raises(ValueError, match="max_running must be a positive int, got 0"):
        EngineConfig(max_running=0)
    with pytest.raises(ValueError, match="decode_reserve must be an int >= 0, got -1"):
        EngineConfig(decode_reserve=-1)
    with pytest.raises(ValueError, match="prefill_tokens=20 is not a multiple of chunk 16"):
        EngineConfig(chunk_size=16, prefill_tokens=20)


@pytest.mark.parametrize(
    "policy",
    [WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_THROUGH_SELECTIVE, WritePolicy.WRITE_BACK],
)
def test_every_write_policy_with_host_load_back(model, policy):
    """Two waves of chats over shared prompts in a device pool that cannot hold them:
    the second wave loads prefixes back from host (merged per step) under every write
    policy, and every answer equals its uncached run."""
    rng = np.random.default_rng(4)
    systems = [_prompt(rng, 2 * PAGE) for _ in range(6)]  # 12 pages: more than the device
    waves = [
        [np.concatenate([s, _prompt(rng, int(rng.integers(3, 20)))]) for s in systems]
        for _ in range(2)
    ]
    cache = HiCache(
        model.spec,
        model.mesh,
        HiCacheConfig(device_pages=10, host_pages=40, write_policy=policy),
    )
    eng = Engine(model, cache, EngineConfig(max_running=3, record_logits=True))
    prompts = []
    for wave in waves:
        for p in wave:
            eng.submit(p, 3)
            prompts.append(p)
        eng.run(max_steps=300)
    done = eng.done
    host = sum(c.host_cached_tokens for c in done.values())
    # Selective write-through backs a prefix up on its second hit; here a prefix is
    # evicted (deleted) before it is hit twice, so it has nothing on host to serve.
    assert host > 0 if policy is not WritePolicy.WRITE_THROUGH_SELECTIVE else host == 0
    _check_against_uncached(eng, prompts, [3] * len(prompts), done)
    cache.poll(wait=True)
    cache.check_invariants()
