"""The tiny DSV4 model: config invariants, streaming ≡ dense reference, prefix restore,
negative controls (single device).

Comparisons (``DSV4_MODEL.md`` §8.4):

* Same computation (a restored run vs the uncached run with the same chunk
  boundaries): bit-exact.
* Different computation (chunk sizes, decode, the dense reference):
  ``max |Δlogit| <= TOL`` with ``TOL = 1e-4`` (observed ~1e-5 on logits of
  magnitude ~4), valid only because the reference's top-K selection margin
  (gap between the K-th and (K+1)-th indexer score, or the ReLU kink for an
  exact tie at 0) is asserted ``>= MIN_MARGIN = 2e-5``, far above fp32 score
  noise (~1e-7), so no near-tie can flip the selection.
* A negative control (a corrupted restore) must give ``max |Δlogit| > TOL``
  against the uncached run: the same comparison that the positive tests pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind
from models.config import TinyDSV4Config
from models.dsv4 import TinyDSV4, init_params
from models.reference import reference_with_margins
from models.restore import restore_prefix
from models.streaming import (
    _chunk,
    cache_spec,
    init_stream_state,
    restored_state,
    run_chunked,
    single_stage_params,
    stream_forward,
)

TOL = 1e-4
MIN_MARGIN = 2e-5
N_MINI = 80
SEED = 0


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class _Setup:
    def __init__(self, cfg, n, seed=SEED):
        self.cfg = cfg
        self.spec = cache_spec(cfg)
        self.params = init_params(cfg, seed)
        self.sp = single_stage_params(cfg, self.params)
        self.tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab, n).astype(np.int32)
        ref, margins = reference_with_margins(cfg, self.params, self.tokens)
        self.ref = np.asarray(ref)
        self.margin = float(np.min(margins))
        self.n_pages = -(-n // cfg.page_size)

    def fresh(self):
        """A request on pages [0, n_pages) of pools with room for a second request."""
        return init_stream_state(self.cfg, len(self.tokens), num_pages=2 * self.n_pages)

    @functools.cached_property
    def uncached(self):
        """Page-chunked run of the whole sequence: (logits, final state)."""
        logits, state = run_chunked(
            self.cfg, self.sp, self.fresh(), self.tokens, self.cfg.page_size
        )
        return np.asarray(logits), state

    def restore(self, prefix_len, control=None):
        """Restore the uncached run's prefix into pages [n, 2n) and continue from it.

        ``control(m)`` (a negative control) returns ``{"skip": ..., "corrupt": ...}``.
        """
        how = control(prefix_len // self.cfg.page_size) if control else {}
        skip, corrupt = how.get("skip"), how.get("corrupt")
        _, state = self.uncached
        src = np.arange(self.n_pages, dtype=np.int32)
        dst = src + self.n_pages
        pools, (full, swa) = restore_prefix(
            self.spec, state.pools, prefix_len, src, src, dst, dst, skip=skip
        )
        if corrupt is not None:
            pools = corrupt(pools, prefix_len // self.cfg.page_size, dst)
        st = restored_state(self.cfg, pools, full, swa, prefix_len)
        logits, _ = run_chunked(self.cfg, self.sp, st, self.tokens[prefix_len:], self.cfg.page_size)
        return np.asarray(logits)


@pytest.fixture(scope="module")
def mini():
    return _Setup(TinyDSV4Config.mini(), N_MINI)


# ------------------------------------------------------------------------ config
def test_presets():
    f = TinyDSV4Config.tiny_faithful()
    assert f.compress_ratios == (0, 0, 4, 128, 4, 128)
    assert (f.hidden, f.vocab, f.num_heads, f.head_dim, f.rope_dim) == (64, 512, 4, 32, 8)
    assert (f.q_lora, f.o_groups, f.o_lora, f.window, f.page_size) == (32, 2, 16, 128, 256)
    assert (f.index_heads, f.index_head_dim, f.index_topk) == (4, 16, 8)
    m = TinyDSV4Config.mini()
    assert m.compress_ratios == (0, 0, 4, 8, 4, 8)
    assert (m.window, m.page_size, m.index_topk, m.index_heads, m.index_head_dim) == (
        8,
        16,
        4,
        4,
        16,
    )
    assert TinyDSV4Config.mini(num_layers=9).compress_ratios == (0, 0, 4, 8, 4, 8, 4, 8, 4)
    assert m.cache_compress_ratios() == (0, 0, 4, 8, 4, 8, 0)
    assert cache_spec(m).kinds() == tuple(PoolKind)[:6]
    with pytest.raises(dataclasses_frozen_error()):
        m.window = 4


def test_cache_spec_is_derived_once():
    """The config derives its one ModelCacheSpec (``ModelCacheSpec.tiny_dsv4``); every other
    cache fact of the model (ratios with the MTP slot, ring, trailing SWA pages, C4/HCA
    layers, ``streaming.cache_spec``) is read from it, never computed a second time."""
    configs = (
        TinyDSV4Config.mini(),
        TinyDSV4Config.mini(num_layers=9),
        TinyDSV4Config.mini(compress_ratios=(0, 0, 4)),  # no HCA layer
        TinyDSV4Config.mini(window=16),  # window == page
        TinyDSV4Config.tiny_faithful(),
    )
    for cfg in configs:
        spec = cfg.cache_spec()
        assert cache_spec(cfg) is spec and cfg.cache_spec() is spec  # built once, aliased
        assert spec.compress_ratios == (*cfg.compress_ratios, 0) == cfg.cache_compress_ratios()
        assert (spec.num_layers, spec.window, spec.page_size) == (
            cfg.num_layers,
            cfg.window,
            cfg.page_size,
        )
        assert (spec.head_dim, spec.rope_dim, spec.indexer_head_dim, spec.c4_ring) == (
            cfg.head_dim,
            cfg.rope_dim,
            cfg.index_head_dim,
            cfg.c4_ring,
        )
        assert cfg.swa_trailing_pages == spec.swa_trailing_pages == 1
        kinds = spec.attention_kinds
        assert cfg.c4_layers == tuple(g for g, a in enumerate(kinds) if a is AttentionKind.CSA)
        assert cfg.hca_layers == tuple(g for g, a in enumerate(kinds) if a is AttentionKind.HCA)
        renamed = cache_spec(cfg, name="other")
        assert renamed.name == "other" and dataclasses.replace(renamed, name=spec.name) == spec
    # the model's spec is the library's preset (``jaxhicache`` CLI "tiny-faithful")
    assert TinyDSV4Config.tiny_faithful().cache_spec() == ModelCacheSpec.tiny_dsv4(
        window=128, page_size=256, hca_ratio=128
    )
    assert TinyDSV4Config.mini(compress_ratios=(0, 0, 4)).cache_spec().hca_ratio is None


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"page_size": 20}, "page_size=20"),  # not a multiple of the HCA ratio 8 / ring 8
        ({"hca_ratio": 32}, "page_size=16"),  # page % HCA ratio != 0
        ({"hca_ratio": 4, "compress_ratios": (0, 0, 4)}, "hca_ratio=4"),
        ({"window": 3}, "window=3"),
        ({"window": 32}, r"no valid cache spec: window must be in \[4, page_size=16\], got 32"),
        ({"compress_ratios": (0, 2, 4)}, "ratio 2"),
        ({"rope_dim": 7}, "rope_dim=7"),
        ({"rope_dim": 16}, "rope_dim=16"),
        ({"o_groups": 3}, "o_groups=3"),
        ({"index_topk": 0}, "index_topk=0"),
        ({"compress_ratios": (0, 0, 4.5)}, "ratio 4.5 is not an int"),  # was truncated to 4
        ({"hidden": True}, "hidden=True: must be a positive int"),
    ],
)
def test_config_rejects_broken_invariants(overrides, match):
    with pytest.raises(ValueError, match=match):
        TinyDSV4Config.mini(**overrides)


def test_nnx_module_matches_plain_params(mini):
    model = TinyDSV4(mini.cfg, seed=SEED)
    params = model.params()
    assert len(params["layers"]) == 6 and "idx" in params["layers"][2]
    assert "comp" not in params["layers"][0] and "idx" not in params["layers"][3]
    assert params["layers"][3]["comp"]["ape"].shape == (8, mini.cfg.head_dim)  # HCA: no overlap
    assert params["layers"][2]["comp"]["ape"].shape == (4, 2 * mini.cfg.head_dim)  # C4: A|B
    jax.tree.map(np.testing.assert_array_equal, params, mini.params)
    # two independent computations each way: the module's forward (the dense reference
    # on the module's weights) against the paged streaming run of the plain params, and
    # the paged streaming run of the module's weights against the dense reference
    d = _diff(model(mini.tokens), mini.uncached[0])
    assert d <= TOL, f"module forward vs streaming: max |Δlogit| {d:.3g}"
    streamed, _ = run_chunked(
        mini.cfg, single_stage_params(mini.cfg, params), mini.fresh(), mini.tokens, 16
    )
    d = _diff(streamed, mini.ref)
    assert d <= TOL, f"streaming of the module's weights vs reference: max |Δlogit| {d:.3g}"


def test_reference_is_causal():
    """Changing a future token never changes earlier logits."""
    cfg = TinyDSV4Config.mini()
    params = init_params(cfg, 1)
    a = np.arange(N_MINI, dtype=np.int32) % cfg.vocab
    b = a.copy()
    b[50] = (b[50] + 1) % cfg.vocab
    la, lb = (np.asarray(reference_with_margins(cfg, params, t)[0]) for t in (a, b))
    np.testing.assert_array_equal(la[:50], lb[:50])
    assert _diff(la[50:], lb[50:]) > TOL


# ------------------------------------------------------------ chunking / decode
def test_reference_is_sparse_and_far_from_ties(mini):
    assert mini.cfg.sparse_indexer_from + 16 < N_MINI  # the indexer really selects a subset
    assert mini.margin >= MIN_MARGIN, mini.margin
    assert np.all(np.isfinite(mini.ref))


@pytest.mark.parametrize(
    ("sizes", "pad_to"),
    [
        (N_MINI, None),  # one-shot prefill
        (16, None),  # page-boundary chunks
        (1, None),  # token-by-token decode
        (13, 16),  # odd chunks through the padded (n_valid) path
        (3, 16),
        (5, 16),
        ([1, 3, 5, 13, 2, 7], 16),  # mixed alignments
    ],
    ids=["oneshot", "page", "decode", "13", "3", "5", "mixed"],
)
def test_streaming_matches_reference(mini, sizes, pad_to):
    logits, state = run_chunked(mini.cfg, mini.sp, mini.fresh(), mini.tokens, sizes, pad_to)
    assert state.pos == N_MINI
    d = _diff(logits, mini.ref)
    assert d <= TOL, f"chunks {sizes}: max |Δlogit| {d:.3g} > {TOL}"
    # and the same against the page-chunked run
    assert _diff(logits, mini.uncached[0]) <= TOL


def test_prefill_then_decode(mini):
    state = mini.fresh()
    a, state = run_chunked(mini.cfg, mini.sp, state, mini.tokens[:37], 13, pad_to=16)
    b, state = run_chunked(mini.cfg, mini.sp, state, mini.tokens[37:], 1)
    assert _diff(np.concatenate([a, b]), mini.ref) <= TOL


# ------------------------------------------------------------------- restore
def test_restore_every_page_boundary_is_bit_exact(mini):
    full, _ = mini.uncached
    page = mini.cfg.page_size
    for p in range(page, N_MINI, page):
        got = mini.restore(p)
        np.testing.assert_array_equal(got, full[p:], err_msg=f"restore at {p}")
        assert _diff(got, mini.ref[p:]) <= TOL


def _ring_rows(fn, kinds):
    """A corruption of the C4 ring rows of the last prefix page (SWA page m-1)."""

    def corrupt(pools, m, dst):
        out = dict(pools)
        for k in kinds:
            host = np.array(out[k])
            host[:, dst[m - 1]] = fn(host[:, dst[m - 1]])
            out[k] = jax.device_put(host, out[k].sharding)
        return out

    return corrupt


def _first_window(rows):  # "missing" treated as "first window": A slots kv 0, score -inf
    dc = rows.shape[-1] // 4
    rows = rows.copy()
    rows[..., :dc] = 0.0
    rows[..., 2 * dc : 3 * dc] = -np.inf
    return rows


def _swap_ab(rows):
    dc = rows.shape[-1] // 4
    a_kv, b_kv, a_sc, b_sc = (rows[..., i * dc : (i + 1) * dc] for i in range(4))
    return np.concatenate([b_kv, a_kv, b_sc, a_sc], axis=-1)


def _prev_page_state(pools, m, dst):
    """The C4 states of SWA page m-1 replaced by those of page m-2 (the source run's page)."""
    out = dict(pools)
    for k in (PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
        host = np.array(out[k])
        host[:, dst[m - 1]] = host[:, m - 2]  # the uncached request's pages are 0..n-1
        out[k] = jax.device_put(host, out[k].sharding)
    return out


_C4S = (PoolKind.C4_STATE,)
_C4IS = (PoolKind.C4_INDEXER_STATE,)
NEGATIVE_CONTROLS = {
    "c4_state_dropped": lambda m: {"skip": {PoolKind.C4_STATE: [m - 1]}},
    "c4_state_as_first_window": lambda m: {"corrupt": _ring_rows(_first_window, _C4S)},
    "c4_indexer_state_dropped": lambda m: {"skip": {PoolKind.C4_INDEXER_STATE: [m - 1]}},
    "state_from_previous_page": lambda m: {"corrupt": _prev_page_state},
    "last_swa_page_omitted": lambda m: {"skip": {PoolKind.SWA_KV: [m - 1]}},
    "c4_page_omitted": lambda m: {"skip": {PoolKind.C4_KV: [0]}},
    "indexer_page_omitted": lambda m: {"skip": {PoolKind.C4_INDEXER: [0]}},
    "c128_page_omitted": lambda m: {"skip": {PoolKind.C128_KV: [0]}},
    "ab_halves_swapped": lambda m: {"corrupt": _ring_rows(_swap_ab, _C4S + _C4IS)},
}


def test_negative_controls_are_detected(mini, capsys):
    """Every corrupted restore at P = 32 (page m = 2) fails the comparison the real one passes."""
    full, _ = mini.uncached
    p = 2 * mini.cfg.page_size
    good = _diff(mini.restore(p), full[p:])
    assert good == 0.0
    found = {}
    for name, how in NEGATIVE_CONTROLS.items():
        found[name] = _diff(mini.restore(p, how), full[p:])
    with capsys.disabled():
        print(f"\nmini negative controls max|Δlogit| (TOL {TOL:.0e}): ", end="")
        print(", ".join(f"{k}={v:.3g}" for k, v in found.items()))
    missed = {k: v for k, v in found.items() if not v > TOL}
    assert not missed, f"negative controls not detected: {missed}"


def test_tombstoned_page_cannot_be_read(mini):
    _, state = mini.uncached
    src = np.arange(mini.n_pages, dtype=np.int32)
    p = 2 * mini.cfg.page_size
    pools, (full, swa) = restore_prefix(mini.spec, state.pools, p, src, src, src + 5, src + 5)
    swa = swa.copy()
    swa[1] = -1  # the last prefix page (window + C4 state) tombstoned
    st = restored_state(mini.cfg, pools, full, swa, p)
    with pytest.raises(ValueError, match=r"SWA pages \[1\] are tombstoned"):
        stream_forward(mini.cfg, mini.sp, st, mini.tokens[p : p + 16])
    # bypassing the host check: the read is poisoned, never a silent "first window"
    tables = jax.tree.map(jax.numpy.asarray, st.tables)
    i32 = jax.numpy.int32
    logits, _, _ = _chunk(
        mini.cfg, mini.sp, st.pools, st.scratch, mini.tokens[p : p + 16], i32(p), i32(16), tables
    )
    assert np.all(np.isnan(np.asarray(logits)))


def test_hca_partial_window_is_never_restored(mini):
    st = init_stream_state(mini.cfg, N_MINI)
    st.pos, st.scratch_from = 12, 12  # 12 % 8 != 0: the HCA window [8, 12) is not cached
    with pytest.raises(ValueError, match=r"HCA partial-window tokens \[8, 12\)"):
        stream_forward(mini.cfg, mini.sp, st, mini.tokens[12:13])


# ------------------------------------------------------------- tiny faithful
def test_tiny_faithful_600_tokens(capsys):
    """DSV4's structural constants: W 128, page 256, ratios 4/128, K 8."""
    s = _Setup(TinyDSV4Config.tiny_faithful(), 600)
    assert s.margin >= MIN_MARGIN, s.margin
    full, _ = s.uncached
    assert _diff(full, s.ref) <= TOL
    for p in (256, 512):
        np.testing.assert_array_equal(s.restore(p), full[p:], err_msg=f"restore at {p}")
    found = {
        name: _diff(s.restore(512, NEGATIVE_CONTROLS[name]), full[512:])
        for name in ("c4_state_dropped", "ab_halves_swapped", "last_swa_page_omitted")
    }
    with capsys.disabled():
        print("\ntiny-faithful negative controls max|Δlogit|: ", end="")
        print(", ".join(f"{k}={v:.3g}" for k, v in found.items()))
    assert all(v > TOL for v in found.values()), found
