"""The SWA window at the end of an L3 hit, in the serving path (issue 16 §1).

Turn 1 of a conversation (23 whole pages) is written to a file store with SWA-space
objects at every ``swa_checkpoint_every``-th page and at the sequence end. When one
stage lacks the SWA object the hit would end on (page 23's window: page 22), a fresh
server's hit falls back to the previous checkpoint whose window is complete on every
stage — not a miss, not a wrong page — and its output equals recomputation.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.spec import PageSpace
from jaxhicache.storage import FileBackend, Namespace, object_key, page_hashes
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.serving import ServingLoop

TOL = 1e-4
PAGE = 16
PAGES = 23  # turn 1 computes 23 * 16 + 1 tokens: 23 whole pages
MODEL = "tiny-windows"


@pytest.fixture(scope="module")
def model():
    cfg = TinyDSV4Config.mini(num_layers=6)
    return PagedModel(cfg, init_params(cfg, 0), pp=2)


def _loop(model, store, k) -> ServingLoop:
    l3 = StorageConfig(
        model_id=MODEL,
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        swa_checkpoint_every=k,
        cost_model=False,  # the window decision alone
    )
    return ServingLoop.for_model(
        model,
        device_pages=40,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=store,
        layerwise=True,
    )


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """Per checkpoint interval: a store holding turn 1, and turn 2's prompt."""
    rng = np.random.default_rng(5)
    turn1 = rng.integers(0, model.config.vocab, PAGES * PAGE).astype(np.int32)
    out = {}
    for k in (1, 4, 16):
        root = tmp_path_factory.mktemp(f"store-k{k}")
        loop = _loop(model, FileBackend(root), k)
        r1 = loop.serve(turn1, 2)
        loop.close()
        turn2 = np.concatenate([turn1, r1.generated, rng.integers(0, model.config.vocab, 9)])
        out[k] = (root, turn2.astype(np.int32))
    return out


def _swa_pages_stored(root, model, hashes):
    ns = [Namespace.for_stage(model.spec, m, model_id=MODEL) for m in model.layer_maps]
    return [
        [i for i, h in enumerate(hashes) if (root / object_key(n, PageSpace.SWA, h)).exists()]
        for n in ns
    ]


@pytest.mark.parametrize(
    ("k", "fallback"), [(1, 22), (4, 20), (16, 16)], ids=["every1", "every4", "every16"]
)
@pytest.mark.parametrize("lacking", [False, True], ids=["complete", "stage1_lacks_end"])
def test_hit_ends_at_the_last_complete_window(model, written, tmp_path, k, fallback, lacking):
    src, turn2 = written[k]
    root = tmp_path / "store"
    shutil.copytree(src, root)
    hashes = page_hashes(turn2[: PAGES * PAGE], PAGE)
    stored = _swa_pages_stored(root, model, hashes)
    want_swa = sorted({e - 1 for e in range(k, PAGES + 1, k)} | {PAGES - 1})
    assert stored == [want_swa, want_swa], stored  # the checkpoints and the sequence end
    if lacking:  # the last stage loses the window of the hit's end
        ns = Namespace.for_stage(model.spec, model.layer_maps[1], model_id=MODEL)
        (root / object_key(ns, PageSpace.SWA, hashes[PAGES - 1])).unlink()
    loop = _loop(model, FileBackend(root), k)
    r2 = loop.serve(turn2, 3)
    assert r2.device_cached_tokens == r2.host_cached_tokens == 0
    assert r2.storage_cached_tokens == (fallback if lacking else PAGES) * PAGE
    oracle = loop.serve_uncached(turn2, 3)
    assert np.array_equal(r2.generated, oracle.generated)
    d = max(
        float(np.abs(r2.step_logits - oracle.step_logits).max()),
        float(np.abs(r2.prefill_logits - oracle.prefill_logits[r2.cached_tokens :]).max()),
    )
    assert d <= TOL, f"k={k}: differs from recomputation by {d:.3g}"
    loop.cache.check_invariants()
    loop.close()
