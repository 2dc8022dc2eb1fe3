"""The tiny DSV4 model through the library's device pools, pipeline-parallel.

PP 1, 2, 4 and an uneven partition give bit-identical logits (the same per-layer
program runs on every stage, selected by ``lax.switch`` on the stage's traced
layer-kind table), equal to the dense reference within ``TOL``.  A prefix saved
from one PP layout and restored into another through per-global-layer lists
continues bit-exactly on every stage; the reference system's bug (a stage-local
id used to index the global list) is caught by the same comparison.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.reference import reference_with_margins
from models.restore import restore_prefix

TOL = 1e-4  # see tests/test_model.py
N = 80
PAGES = 5  # pages of one 80-token request (page 16)
LAYOUTS = [(1, None), (2, None), (4, None), (3, [1, 3, 2])]


class _Setup:
    def __init__(self):
        self.cfg = TinyDSV4Config.mini()
        self.params = init_params(self.cfg, 0)
        self.tokens = np.random.default_rng(1).integers(0, self.cfg.vocab, N).astype(np.int32)
        ref, margins = reference_with_margins(self.cfg, self.params, self.tokens)
        self.ref = np.asarray(ref)
        assert float(np.min(margins)) >= 2e-5  # no top-K near-tie (see tests/test_model.py)
        self.models: dict = {}
        self.runs: dict = {}

    def model(self, pp, partition=None):
        if len(jax.devices()) < pp:
            pytest.skip(f"needs {pp} devices (CPU runs get 8 fake ones), have {len(jax.devices())}")
        key = (pp, tuple(partition) if partition else None)
        if key not in self.models:
            self.models[key] = PagedModel(self.cfg, self.params, pp=pp, partition=partition)
        return self.models[key]

    def run(self, pp, partition=None):
        """Uncached page-chunked prefill of the whole sequence on pages [0, 5) of 10."""
        key = (pp, tuple(partition) if partition else None)
        if key not in self.runs:
            m = self.model(pp, partition)
            ids = np.arange(PAGES)
            logits, pools, _ = m.prefill(
                m.init_pools(2 * PAGES, 2 * PAGES), self.tokens, 0, ids, ids
            )
            self.runs[key] = (np.asarray(logits), pools)
        return self.runs[key]


@pytest.fixture(scope="module")
def s():
    return _Setup()


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize(("pp", "partition"), LAYOUTS, ids=["pp1", "pp2", "pp4", "pp3-1-3-2"])
def test_pp_layouts_give_identical_logits(s, pp, partition):
    logits, pools = s.run(pp, partition)
    assert _diff(logits, s.ref) <= TOL
    np.testing.assert_array_equal(logits, s.run(1)[0])
    # every pool is stage-sharded over 'pp'
    for kind in pools.kinds():
        assert pools[kind].shape[0] == pp
        assert pools[kind].sharding.spec[0] == "pp"


def test_uneven_partition_stages_hold_different_kinds(s):
    m = s.model(3, [1, 3, 2])
    kinds = m.stacked.attention_kind
    swa, csa, hca = (int(k) for k in (AttentionKind.SWA, AttentionKind.CSA, AttentionKind.HCA))
    np.testing.assert_array_equal(kinds, [[swa, -1, -1], [swa, csa, hca], [csa, hca, -1]])
    # stage 0 has no C4 layer: its C4 sub-pool row is padding only
    assert not m.stacked.subpool_valid[PoolKind.C4_STATE][0].any()


def _buggy_pools_from_global(model, rows_by_kind, num_pages, num_swa_pages):
    """The reference system's bug: a stage-local id indexes the global-length list."""
    pools = model.init_pools(num_pages, num_swa_pages)
    for kind in model.spec.kinds():
        arr = np.zeros(pools[kind].shape, np.float32)
        for m in model.layer_maps:
            for local in m.kind_local_ids(kind):
                wrong = rows_by_kind[kind][int(local)]  # should be start_layer + local
                if wrong is not None:  # "returned None": the stage's rows stay empty
                    arr[m.pp_rank, m.subpool_id(kind, int(local))] = wrong
        pools = pools.replace_pool(kind, jax.device_put(arr, pools[kind].sharding))
    return pools


@pytest.mark.parametrize("pp", [2, 4])
def test_restore_across_pp_layouts_uses_global_ids(s, pp):
    """Save from PP 1, restore into PP ``pp`` at P = 32, continue on every stage."""
    full, pools1 = s.run(1)
    m1, m = s.model(1), s.model(pp)
    rows = {k: m1.global_layer_rows(pools1, k) for k in m1.spec.kinds()}
    p = 32
    src = np.arange(PAGES, dtype=np.int32)

    def continue_from(pools):
        arrays, (f, w) = restore_prefix(m.spec, pools.arrays, p, src, src, src + PAGES, src + PAGES)
        logits, _, _ = m.prefill(pools.replace(arrays=arrays), s.tokens[p:], p, f, w)
        return np.asarray(logits)

    good = continue_from(m.pools_from_global(rows, 2 * PAGES, 2 * PAGES))
    np.testing.assert_array_equal(good, full[p:])
    bad = continue_from(_buggy_pools_from_global(m, rows, 2 * PAGES, 2 * PAGES))
    assert _diff(bad, full[p:]) > TOL, "local-id addressing of the global list went undetected"


def test_decode_steps_pp2(s):
    m = s.model(2)
    ids = np.arange(PAGES)
    pools = m.init_pools(PAGES, PAGES)
    logits, pools, scratch = m.prefill(pools, s.tokens[:43], 0, ids, ids)
    out = [np.asarray(logits)]
    for pos in range(43, N):
        lg, pools, scratch = m.decode_step(pools, s.tokens[pos], pos, ids, ids, scratch)
        out.append(np.asarray(lg)[None])
    assert _diff(np.concatenate(out), s.ref) <= TOL


def test_paged_model_refuses_tombstones_and_foreign_specs(s):
    m = s.model(2)
    ids = np.arange(PAGES)
    swa = ids.copy()
    swa[1] = -1
    pools = m.init_pools(PAGES, PAGES)
    with pytest.raises(ValueError, match=r"SWA pages \[1\] are tombstoned"):
        m.prefill(pools, s.tokens[32:48], 32, ids, swa)
    with pytest.raises(ValueError, match=r"full pages \[0\] are absent"):
        m.prefill(pools, s.tokens[32:48], 32, np.where(ids == 0, -1, ids), ids)
    with pytest.raises(ValueError, match=r"spec\.window=16"):
        PagedModel(s.cfg, s.params, spec=ModelCacheSpec.tiny_dsv4(window=16, head_dim=16))
    with pytest.raises(ValueError, match="partition"):
        PagedModel(s.cfg, s.params, pp=2, partition=[1, 4])
    assert len(build_layer_maps(m.spec, 2)) == 2
    assert make_mesh(2).shape["pp"] == 2
