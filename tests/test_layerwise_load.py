"""A load-back fused into the prefill: layer ``l`` computes right after its own rows land.

``PagedModel.prefill(..., load=engine.prepare_layerwise(pools, move))`` must give
bit-identical logits and pools to ``engine.load(pools, move)`` followed by
``prefill``, on PP 1, 2 and an uneven PP 4, on both copy paths (STAGED: rows in
pinned host memory moved to the device inside the scan; DIRECT: rows read from
the slabs). The move merges two requests' load-backs. Structural checks: the
per-layer host->device copies sit inside the stage's layer scan (only layer 0's
is issued before it, one layer ahead), and negative controls show the
comparison catches a layer mix-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PoolKind
from jaxhicache.transfer import CopyPath, PageMove, TransferEngine
from jaxhicache.transfer import layerwise as layerwise_mod
from kernels_pallas.common import Backend
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel

PAGE = 16
PREFIX = 2  # pages restored from host
N = PAGE * (PREFIX + 2)  # the suffix is two chunks: the second runs without the load
PAGES = 12  # device pages
LAYOUTS = [(1, None), (2, None), (4, [1, 2, 2, 1])]
IDS = ["pp1", "pp2", "pp4-1-2-2-1"]
PATHS = [CopyPath.STAGED, CopyPath.DIRECT]
TOL = 1e-4


class _Setup:
    """Per layout: a model, the uncached run, and host slabs holding the prefix."""

    def __init__(self):
        self.cfg = TinyDSV4Config.mini()
        assert self.cfg.page_size == PAGE
        self.params = init_params(self.cfg, 0)
        self.tokens = np.random.default_rng(7).integers(0, self.cfg.vocab, N).astype(np.int32)
        self._layouts: dict = {}
        self._engines: dict = {}

    def layout(self, pp, partition):
        key = (pp, tuple(partition or ()))
        if key not in self._layouts:
            m = PagedModel(self.cfg, self.params, pp=pp, partition=partition)
            ids = np.arange(N // PAGE)
            logits, pools, _ = m.prefill(m.init_pools(PAGES, PAGES), self.tokens, 0, ids, ids)
            self._layouts[key] = (m, np.asarray(logits), pools)
        return self._layouts[key]

    def engine(self, pp, partition, path):
        """An engine whose slabs hold the uncached run's prefix pages 0..PREFIX-1 at
        host pages 3, 1 (full and SWA)."""
        key = (pp, tuple(partition or ()), path)
        if key not in self._engines:
            m, _, pools = self.layout(pp, partition)
            host = HostPools(m.spec, m.layer_maps, 6, 6)
            eng = TransferEngine(m.mesh, m.layer_maps, host, copy_path=path)
            eng.backup(pools, PageMove.of([0, 1], [3, 1], [0, 1], [3, 1])).wait()
            self._engines[key] = eng
        return self._engines[key]

    def close(self):
        for e in self._engines.values():
            e.close()


@pytest.fixture(scope="module")
def s():
    setup = _Setup()
    yield setup
    setup.close()


# Request A restores the prefix into device pages 5, 2 (SWA: the trailing window page
# only, at 4); request B, merged into the same move, restores it into 7, 8 (SWA 9).
MOVE = PageMove.of([5, 2, 7, 8], [3, 1, 3, 1], [4, 9], [1, 1])


def _tables(cfg):
    assert cfg.swa_trailing_pages == 1  # the window fits in the last prefix page
    full = np.array([5, 2, 10, 11], np.int32)
    swa = np.array([-1, 4, 10, 11], np.int32)  # page 0 of the prefix: a tombstone
    return full, swa


def _separate(m, eng, cfg, tokens):
    pools, h = eng.load(m.init_pools(PAGES, PAGES), MOVE)
    h.wait()
    full, swa = _tables(cfg)
    logits, pools, _ = m.prefill(pools, tokens[PREFIX * PAGE :], PREFIX * PAGE, full, swa)
    return np.asarray(logits), pools


def _fused(m, eng, cfg, tokens, mutate=None):
    pools = m.init_pools(PAGES, PAGES)
    lw = eng.prepare_layerwise(pools, MOVE)
    if mutate is not None:
        lw = mutate(lw)
    full, swa = _tables(cfg)
    logits, pools, _ = m.prefill(pools, tokens[PREFIX * PAGE :], PREFIX * PAGE, full, swa, load=lw)
    return np.asarray(logits), pools


def _caught(bad, good) -> bool:
    return (not np.all(np.isfinite(bad))) or float(np.max(np.abs(bad - good))) > TOL


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize(("pp", "partition"), LAYOUTS, ids=IDS)
def test_fused_load_equals_load_then_prefill(s, pp, partition, path):
    m, full_logits, _ = s.layout(pp, partition)
    eng = s.engine(pp, partition, path)
    sep_logits, sep_pools = _separate(m, eng, s.cfg, s.tokens)
    fused_logits, fused_pools = _fused(m, eng, s.cfg, s.tokens)
    np.testing.assert_array_equal(fused_logits, sep_logits)
    for kind in sep_pools.kinds():
        np.testing.assert_array_equal(
            np.asarray(fused_pools[kind]), np.asarray(sep_pools[kind]), err_msg=str(kind)
        )
    # ... and both continue the uncached run bit-exactly (the restore really happened)
    np.testing.assert_array_equal(fused_logits, full_logits[PREFIX * PAGE :])
    # request B's pages (merged into the same move) landed too: equal to A's
    swa_kv = np.asarray(fused_pools[PoolKind.SWA_KV])
    np.testing.assert_array_equal(swa_kv[:, :, 9], swa_kv[:, :, 4])
    c4 = np.asarray(fused_pools[PoolKind.C4_KV])
    np.testing.assert_array_equal(c4[:, :, [7, 8]], c4[:, :, [5, 2]])
    assert c4[:, :, [7, 8]].any()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_layer_mixup_is_caught(s, path):
    """Negative control: the rows of each kind's sub-pool row ``k`` land in row ``k + 1``
    (rolled along the layer axis) -> the fused run's logits differ."""
    m, full_logits, _ = s.layout(2, None)
    eng = s.engine(2, None, path)
    # the layer axis: staging [pp, Lk, nb, *row]; page-first slab [pp, pages, Lk, *row]
    axis = 1 if path is CopyPath.STAGED else 2

    def roll(lw):
        return lw.replace(rows={k: jnp.roll(a, 1, axis=axis) for k, a in lw.rows.items()})

    bad, _ = _fused(m, eng, s.cfg, s.tokens, mutate=roll)
    assert _caught(bad, full_logits[PREFIX * PAGE :])


def test_stage_local_id_for_subpool_row_is_caught(s, monkeypatch):
    """Negative control for the reference system's bug: the fused load addresses the
    sub-pools with the stage-local layer id -> the logits differ."""
    pp, partition = 4, [1, 2, 2, 1]
    full_logits = s.layout(pp, partition)[1]
    eng = s.engine(pp, partition, CopyPath.STAGED)

    def local_id(view, kind, local_layer):
        l2s = view.local_to_subpool[kind]
        has = jnp.asarray(l2s)[jnp.clip(local_layer, 0, l2s.shape[0] - 1)] >= 0
        return jnp.where(has & (local_layer < l2s.shape[0]), local_layer, -1)

    monkeypatch.setattr(layerwise_mod, "_subpool_row", local_id)
    fresh = PagedModel(s.cfg, s.params, pp=pp, partition=partition)  # retrace with the bug
    bad, _ = _fused(fresh, eng, s.cfg, s.tokens)
    assert _caught(bad, full_logits[PREFIX * PAGE :])


def _subjaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, tuple | list) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _find(jaxpr, pred, inside=False, out=None):
    """``[(inside the stage's layer-scan body, eqn)]`` for every eqn matching ``pred``."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        here = inside or "stage_layer" in str(eqn.source_info.name_stack)
        if pred(eqn):
            out.append((here, eqn))
        for sub in _subjaxprs(eqn.params):
            _find(sub, pred, here, out)
    return out


def _to_device(eqn) -> bool:
    return eqn.primitive.name == "device_put" and any(
        d is jax.memory.Space.Device for d in eqn.params.get("devices", ())
    )


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_per_layer_copies_sit_inside_the_layer_scan(s, path):
    m, _, _ = s.layout(2, None)
    eng = s.engine(2, None, path)
    pools = m.init_pools(PAGES, PAGES)
    lw = eng.prepare_layerwise(pools, MOVE)
    full, swa = _tables(s.cfg)
    args = (pools, s.tokens[PREFIX * PAGE :], PREFIX * PAGE, full, swa)
    jaxpr = m.trace_first_chunk(*args, load=lw).jaxpr.jaxpr
    plain = m.trace_first_chunk(*args).jaxpr.jaxpr
    assert not _find(plain, _to_device)
    row_shape = {k: tuple(a.shape[2:]) for k, a in lw.rows.items()}  # [nb, *row] (staged)
    if path is CopyPath.STAGED:
        puts = _find(jaxpr, _to_device)
        one_layer = {row_shape[k] for k in lw.kinds}
        assert puts and all(tuple(e.invars[0].aval.shape) in one_layer for _, e in puts)
        assert all(str(e.invars[0].aval.memory_space).lower().endswith("host") for _, e in puts)
        inside = [e for here, e in puts if here]
        outside = [e for here, e in puts if not here]
        assert len(inside) >= len(lw.kinds)  # every kind's copy runs per layer in the body
        assert len(outside) == len(lw.kinds)  # only layer 0's, one layer ahead
    else:  # the slabs are read with per-page dynamic slices inside the body only
        slab_shape = {tuple(a.shape[1:]) for a in lw.rows.values()}
        reads = _find(
            jaxpr,
            lambda e: (
                e.primitive.name == "dynamic_slice" and tuple(e.invars[0].aval.shape) in slab_shape
            ),
        )
        assert reads and all(here for here, _ in reads)
        assert not _find(jaxpr, _to_device)


def test_fused_program_lowers_for_cuda_with_triton(s):
    """The fused first chunk with the Triton scatter and pinned-host rows lowers for CUDA."""
    m, _, _ = s.layout(2, None)
    host = HostPools(m.spec, m.layer_maps, 6, 6)
    eng = TransferEngine(
        m.mesh, m.layer_maps, host, backend=Backend.TRITON, copy_path=CopyPath.STAGED
    )
    pools = m.init_pools(PAGES, PAGES)
    lw = eng.prepare_layerwise(pools, MOVE)
    full, swa = _tables(s.cfg)
    traced = m.trace_first_chunk(
        pools, s.tokens[PREFIX * PAGE :], PREFIX * PAGE, full, swa, load=lw
    )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()
    assert 'mhlo.memory_kind = "pinned_host"' in text
    assert "annotate_device_placement" in text
    eng.close()


def test_fused_load_is_checked_against_the_pools(s):
    m, _, _ = s.layout(2, None)
    eng = s.engine(2, None, CopyPath.DIRECT)
    lw = eng.prepare_layerwise(m.init_pools(PAGES, PAGES), MOVE)
    full, swa = _tables(s.cfg)
    with pytest.raises(ValueError, match="prepared for pools of 12/12"):
        m.prefill(m.init_pools(PAGES + 1, PAGES), s.tokens[32:], 32, full, swa, load=lw)
    with pytest.raises(ValueError, match="at least one token"):
        m.prefill(m.init_pools(PAGES, PAGES), s.tokens[:0], 32, full, swa, load=lw)
