"""End to end through the serving loop: a prefix restored from window-only SWA objects
gives the logits of recomputation, and the same check catches a restore that writes
the window rows anywhere else (negative controls)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.spec import PoolKind
from jaxhicache.storage import FileBackend
from jaxhicache.storage import layout as storage_layout
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.serving import ServingLoop

TOL = 1e-4
PAGE = 16
PREFIX = 48  # turn 1 leaves KV of 45 + 6 - 1 = 50 tokens: 3 whole pages in L3


@pytest.fixture(scope="module")
def model():
    cfg = TinyDSV4Config.mini(num_layers=6)
    return PagedModel(cfg, init_params(cfg, 0), pp=2)


def _loop(model, root) -> ServingLoop:
    l3 = StorageConfig(
        model_id="tiny-window",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,  # a 3-page prefix recomputes cheaply: pin the restore itself
    )
    return ServingLoop.for_model(
        model,
        device_pages=8,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=FileBackend(root),
        layerwise=True,
    )


def _shift(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)


def _misplaced(how):
    """``window_rows`` of a reader that puts the stored rows somewhere else."""
    right = storage_layout.window_rows

    def rows(spec, kind):
        shape, index = right(spec, kind)
        if how == "swa_one_token_early" and kind is PoolKind.SWA_KV:
            return shape, (_shift(index[0], -1),)
        if how == "state_b_halves" and kind is not PoolKind.SWA_KV:
            return shape, (*index[:2], slice(1, 2))
        if how == "state_one_slot_early" and kind is PoolKind.C4_STATE:
            return shape, (_shift(index[0], -1), *index[1:])
        if how == "indexer_state_one_slot_early" and kind is PoolKind.C4_INDEXER_STATE:
            return shape, (_shift(index[0], -1), *index[1:])
        return shape, index

    return rows


@pytest.mark.parametrize(
    "misplace",
    [
        None,
        "swa_one_token_early",
        "state_b_halves",
        "state_one_slot_early",
        "indexer_state_one_slot_early",
    ],
)
def test_restore_from_window_objects_equals_recompute(model, tmp_path, monkeypatch, misplace):
    rng = np.random.default_rng(3)
    vocab = model.config.vocab
    turn1 = rng.integers(0, vocab, 45).astype(np.int32)
    writer = _loop(model, tmp_path)
    r1 = writer.serve(turn1, 6)
    writer.close()
    turn2 = np.concatenate([turn1, r1.generated, rng.integers(0, vocab, 13)]).astype(np.int32)
    if misplace is not None:  # only the reader: same payload sizes, other rows
        monkeypatch.setattr(storage_layout, "window_rows", _misplaced(misplace))
    reader = _loop(model, tmp_path)  # a fresh instance: device and host tiers empty
    r2 = reader.serve(turn2, 4)
    oracle = reader.serve_uncached(turn2, 4)
    reader.close()
    assert r2.storage_cached_tokens == PREFIX  # the whole prefix came from L3 either way
    d = max(
        float(np.abs(r2.step_logits - oracle.step_logits).max()),
        float(np.abs(r2.prefill_logits - oracle.prefill_logits[r2.cached_tokens :]).max()),
    )
    if misplace is None:
        assert d <= TOL, f"differs from recomputation by {d:.3g}"
    else:
        assert d > 100 * TOL, f"{misplace}: a misplaced window went unnoticed ({d:.3g})"
