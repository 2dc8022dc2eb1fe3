"""Tests of kernels_pallas.paged_gather / paged_scatter on CPU: the Pallas kernel
(interpret) and the XLA backend vs the jnp reference and numpy, bucketing, traced ids,
donation, id/layer/staging validation in the wrappers."""

from __future__ import annotations

import functools
import importlib
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_copy_harness import (
    IDS,
    INTERP,
    LF,
    MHA_ROW,
    NUM_PAGES,
    PF,
    assert_bits_equal,
    bits,
    np_gather,
    np_scatter,
    random_array,
    staging_shape,
)

from kernels_pallas.common import _STATIC, Backend, Layout, PagedCopyTuning
from kernels_pallas.paged_gather import paged_gather, paged_gather_reference
from kernels_pallas.paged_scatter import (
    paged_scatter,
    paged_scatter_donated,
    paged_scatter_reference,
)

# The modules (``kernels_pallas.paged_gather`` is the re-exported function).
gather_mod = importlib.import_module("kernels_pallas.paged_gather")
scatter_mod = importlib.import_module("kernels_pallas.paged_scatter")

# ---------------------------------------------------------------------------
# Kernel (interpret) vs reference.
# ---------------------------------------------------------------------------

_T = PagedCopyTuning


def _case(dtype, row, tuning, layout, layer, n, name):
    return pytest.param(
        dtype, row, tuning, layout, layer, n, id=f"{name}-{layout.value}-L{layer}-n{n}"
    )


# (dtype, row, tuning, layout, layer, n). Interpret mode compiles slowly, so the grid is
# a covering set, not a Cartesian product: every row size / dtype runs at least one
# layout, every layout and the per-layer variant run with several dtypes, and page
# counts 1, 3, 5, 8 rotate. Small chunks on small rows exercise multi-chunk + tail masks.
_KERNEL_CASES = [
    # float32, row not a power of two, 16-element chunks: 2 chunks per row, masked tail.
    _case(jnp.float32, (3, 7), _T(chunk_elems=16), PF, None, 5, "f32-3x7-c16"),
    _case(jnp.float32, (3, 7), _T(chunk_elems=16), LF, None, 3, "f32-3x7-c16"),
    _case(jnp.float32, (3, 7), _T(chunk_elems=16), PF, 1, 8, "f32-3x7-c16"),
    _case(jnp.float32, (16, 32), _T(chunk_elems=128), LF, 0, 1, "f32-16x32-c128"),
    # MHA K/V pools, 4 chunks per row.
    _case(jnp.bfloat16, MHA_ROW, _T(chunk_elems=2048), PF, None, 3, "mha-bf16"),
    _case(jnp.float16, MHA_ROW, _T(chunk_elems=2048), LF, None, 8, "mha-f16"),
    _case(jnp.float32, MHA_ROW, _T(chunk_elems=2048), PF, 1, 5, "mha-f32"),
    _case(jnp.float8_e4m3fn, MHA_ROW, _T(chunk_elems=2048), PF, None, 1, "mha-fp8"),
    _case(jnp.float8_e4m3fn, MHA_ROW, _T(chunk_elems=2048), LF, 1, 3, "mha-fp8"),
    _case(jnp.uint8, MHA_ROW, _T(chunk_elems=2048), LF, None, 5, "mha-u8"),
    # DSV4 byte rows (masked tail except 65536 / 16384, which tile exactly).
    _case(jnp.uint8, (149_760,), _T(chunk_elems=16384), PF, None, 3, "u8-149760"),
    _case(jnp.uint8, (37_440,), _T(chunk_elems=16384), LF, None, 5, "u8-37440"),
    _case(jnp.uint8, (8_448,), _T(chunk_elems=4096), PF, 1, 8, "u8-8448"),
    _case(jnp.uint8, (1_728,), _T(chunk_elems=256), PF, None, 8, "u8-1728-c256"),
    _case(jnp.uint8, (65_536,), _T(chunk_elems=16384), LF, None, 1, "u8-65536"),
    _case(jnp.uint8, (16_384,), _T(chunk_elems=4096), PF, 0, 5, "u8-16384"),
    # MLA / DSA byte rows: one token's indexer key (132 B) or fp8 latent (656 B), a
    # 64-token FP8_MLA latent page (41,984 B) and a tiny-model indexer page (16 x 20 B).
    _case(jnp.uint8, (132,), _T(chunk_elems=64), LF, None, 5, "u8-132-c64"),
    _case(jnp.uint8, (656,), _T(chunk_elems=256), PF, 1, 3, "u8-656-c256"),
    _case(jnp.uint8, (41_984,), _T(chunk_elems=16384), PF, None, 3, "u8-41984"),
    _case(jnp.uint8, (320,), _T(chunk_elems=128, pack_words=True), LF, 0, 3, "u8-320-pack"),
    # Word packing (uint8 -> uint32; fp8 rows of 14 bytes -> uint16).
    _case(jnp.uint8, (8_448,), _T(chunk_elems=512, pack_words=True), LF, None, 3, "u8-8448-pack"),
    _case(
        jnp.float8_e4m3fn, (7, 2), _T(chunk_elems=16, pack_words=True), PF, None, 5, "fp8-7x2-pack"
    ),
]


@pytest.mark.parametrize(("dtype", "row", "tuning", "layout", "layer", "n"), _KERNEL_CASES)
def test_kernel_matches_reference(request, dtype, row, tuning, layout, layer, n):
    num_layers = 2
    ids = IDS[n]
    rng = np.random.default_rng(zlib.crc32(request.node.callspec.id.encode()))
    pool = random_array(rng, (num_layers, NUM_PAGES, *row), dtype)
    staging = random_array(rng, staging_shape(num_layers, n, row, layout, layer), dtype)

    got = paged_gather(pool, ids, layout=layout, layer=layer, backend=INTERP, tuning=tuning)
    assert got.shape == staging_shape(num_layers, n, row, layout, layer)
    assert_bits_equal(got, np_gather(pool, ids, layout, layer))

    new = paged_scatter(
        pool, ids, staging, layout=layout, layer=layer, backend=INTERP, tuning=tuning
    )
    # The written pages really changed (a no-op kernel fails: staging != pool bytes) ...
    assert_bits_equal(new, np_scatter(pool, ids, staging, layout, layer))
    # ... and every untouched (layer, page) keeps its bytes.
    touched = np.zeros((num_layers, NUM_PAGES), bool)
    if layer is None:
        touched[:, ids] = True
    else:
        touched[layer, ids] = True
    np.testing.assert_array_equal(bits(new)[~touched], bits(pool)[~touched])


@pytest.mark.parametrize(("dtype", "row", "tuning", "layout", "layer", "n"), _KERNEL_CASES[::3])
def test_reference_matches_numpy(dtype, row, tuning, layout, layer, n):
    """The XLA backend (= the jnp reference) against plain numpy indexing."""
    del tuning
    rng = np.random.default_rng(n)
    pool = random_array(rng, (2, NUM_PAGES, *row), dtype)
    staging = random_array(rng, staging_shape(2, n, row, layout, layer), dtype)
    ids = IDS[n]
    got = paged_gather(pool, ids, layout=layout, layer=layer, backend=Backend.XLA)
    assert_bits_equal(got, np_gather(pool, ids, layout, layer))
    new = paged_scatter(pool, ids, staging, layout=layout, layer=layer, backend=Backend.XLA)
    assert_bits_equal(new, np_scatter(pool, ids, staging, layout, layer))


def test_gather_output_is_not_stale_memory():
    """Gather into a poisoned (NaN) first result, then real data: no reuse/no-op."""
    rng = np.random.default_rng(1)
    pool = random_array(rng, (3, 6, 5, 9), jnp.float32)
    ids = [4, 1, 5]
    want = np_gather(pool, ids, PF, None)
    poison = jnp.full_like(pool, jnp.nan)
    tuning = PagedCopyTuning(chunk_elems=16)
    assert np.isnan(paged_gather(poison, ids, backend=INTERP, tuning=tuning)).all()
    assert_bits_equal(paged_gather(pool, ids, backend=INTERP, tuning=tuning), want)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_duplicate_ids_allowed_in_gather(backend):
    rng = np.random.default_rng(2)
    pool = random_array(rng, (2, 5, 40), jnp.float32)
    ids = [3, 3, 0]
    got = paged_gather(pool, ids, backend=backend, tuning=PagedCopyTuning(chunk_elems=16))
    assert_bits_equal(got, np_gather(pool, ids, PF, None))


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
@pytest.mark.parametrize(
    ("layout", "layer"),
    [(Layout.PAGE_FIRST, None), (Layout.LAYER_FIRST, None), (Layout.LAYER_FIRST, 2)],
)
def test_bucket_padding_never_clobbers(backend, layout, layer):
    """5 ids padded to 8 with sentinel ids: every other page (incl. 0 and P-1) intact."""
    num_layers, num_pages, row = 3, 12, (5, 7)
    ids = [6, 2, 9, 4, 1]  # excludes page 0 and page P-1
    rng = np.random.default_rng(3)
    pool = random_array(rng, (num_layers, num_pages, *row), jnp.float32)
    staging = random_array(rng, staging_shape(num_layers, 5, row, layout, layer), jnp.float32)
    new = paged_scatter(
        pool,
        ids,
        staging,
        layout=layout,
        layer=layer,
        backend=backend,
        tuning=PagedCopyTuning(chunk_elems=16),
    )
    untouched = [p for p in range(num_pages) if p not in ids]
    assert 0 in untouched and num_pages - 1 in untouched
    assert_bits_equal(new[:, untouched], pool[:, untouched])
    layers = range(num_layers) if layer is None else [layer]
    for lyr in set(range(num_layers)) - set(layers):
        assert_bits_equal(new[lyr], pool[lyr])
    assert_bits_equal(new, np_scatter(pool, ids, staging, layout, layer))


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_bucket_sized_staging_is_accepted(backend):
    """Staging already padded to the bucket: rows past n are ignored."""
    rng = np.random.default_rng(4)
    pool = random_array(rng, (2, 9, 33), jnp.float32)
    ids = [8, 0, 5]
    staging = random_array(rng, (4, 2, 33), jnp.float32)  # bucket_size(3) == 4
    new = paged_scatter(pool, ids, staging, backend=backend)
    assert_bits_equal(new, np_scatter(pool, ids, staging[:3], PF, None))


def test_one_trace_per_bucket(monkeypatch):
    """n = 5, 6, 7, 8 share one trace of the bucket-8 functions; n = 9 retraces."""
    gather = jax.jit(chex.assert_max_traces(gather_mod._gather_impl, n=1), static_argnames=_STATIC)
    scatter = jax.jit(
        chex.assert_max_traces(scatter_mod._scatter_impl, n=1), static_argnames=_STATIC
    )
    monkeypatch.setattr(gather_mod, "_gather_jit", gather)
    monkeypatch.setattr(scatter_mod, "_scatter_jit", scatter)
    rng = np.random.default_rng(5)
    pool = random_array(rng, (2, 16, 24), jnp.float32)
    tuning = PagedCopyTuning(chunk_elems=16)
    for n in (5, 6, 7, 8):
        ids = rng.permutation(16)[:n]
        out = paged_gather(pool, ids, backend=INTERP, tuning=tuning)
        assert out.shape == (n, 2, 24)
        assert_bits_equal(out, np_gather(pool, ids, PF, None))
        staging = random_array(rng, (n, 2, 24), jnp.float32)
        new = paged_scatter(pool, ids, staging, backend=INTERP, tuning=tuning)
        assert_bits_equal(new, np_scatter(pool, ids, staging, PF, None))
    with pytest.raises(AssertionError, match="trace"):
        paged_gather(pool, rng.permutation(16)[:9], backend=INTERP, tuning=tuning)


def test_per_layer_compiles_once_for_all_layers(monkeypatch):
    gather = jax.jit(chex.assert_max_traces(gather_mod._gather_impl, n=1), static_argnames=_STATIC)
    monkeypatch.setattr(gather_mod, "_gather_jit", gather)
    rng = np.random.default_rng(6)
    pool = random_array(rng, (4, 7, 20), jnp.float32)
    for layer in range(4):
        got = paged_gather(pool, [6, 1], layer=layer, backend=INTERP)
        assert_bits_equal(got, np_gather(pool, [6, 1], PF, layer))


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_traced_ids_inside_user_jit(backend):
    """Ids traced by the caller's jit: no host validation, padding done with jnp;
    sentinel (== P) and negative ids are skipped, as is an out-of-range layer."""
    rng = np.random.default_rng(7)
    num_pages = 10
    pool = random_array(rng, (2, num_pages, 3, 11), jnp.float32)
    staging = random_array(rng, (5, 2, 3, 11), jnp.float32)
    ids = jnp.asarray([9, num_pages, 4, -1, 0], jnp.int32)
    live = [0, 2, 4]  # positions of the live ids 9, 4, 0
    tuning = PagedCopyTuning(chunk_elems=16)

    @jax.jit
    def roundtrip(pool, ids, staging, layer):
        new = paged_scatter(pool, ids, staging, backend=backend, tuning=tuning)
        got = paged_gather(new, ids, layer=layer, backend=backend, tuning=tuning)
        untouched = paged_scatter(
            new, ids, staging[:, 0], layer=layer + 7, backend=backend, tuning=tuning
        )
        return new, got, untouched

    new, got, untouched = roundtrip(pool, ids, staging, jnp.int32(1))
    assert got.shape == (5, 3, 11)
    assert_bits_equal(new, np_scatter(pool, [9, 4, 0], staging[np.asarray(live)], PF, None))
    assert_bits_equal(got[np.asarray(live)], staging[np.asarray(live), 1])
    assert_bits_equal(untouched, new)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_donated_scatter(backend):
    rng = np.random.default_rng(8)
    pool = random_array(rng, (2, 6, 40), jnp.float32)
    keep = np.array(pool, copy=True)  # (a zero-copy numpy view would block donation)
    staging = random_array(rng, (2, 2, 40), jnp.float32)
    new = paged_scatter_donated(pool, [5, 0], staging, backend=backend)
    assert_bits_equal(new, np_scatter(keep, [5, 0], staging, PF, None))
    assert pool.is_deleted()


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_empty_page_list(backend):
    pool = jnp.ones((2, 4, 3), jnp.float32)
    assert paged_gather(pool, [], backend=backend).shape == (0, 2, 3)
    assert paged_gather(pool, [], layout=Layout.LAYER_FIRST, backend=backend).shape == (2, 0, 3)
    new = paged_scatter(pool, [], jnp.zeros((0, 2, 3)), backend=backend)
    assert_bits_equal(new, pool)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP, Backend.TRITON])
@pytest.mark.parametrize(
    ("ids", "match"),
    [([0, -1, 2], r"\[-1\]"), ([3, 11], r"\[11\]"), ([2, 40, -5], r"\[-5, 40\]")],
)
def test_out_of_range_ids_rejected(backend, ids, match):
    pool = jnp.zeros((2, 11, 4), jnp.float32)
    with pytest.raises(ValueError, match=match):
        paged_gather(pool, ids, backend=backend)
    with pytest.raises(ValueError, match=match):
        paged_scatter(pool, ids, jnp.zeros((len(ids), 2, 4)), backend=backend)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_duplicate_ids_rejected_in_scatter(backend):
    pool = jnp.zeros((2, 11, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"duplicate page ids in scatter: \[3, 7\]"):
        paged_scatter(pool, [3, 7, 1, 7, 3], jnp.zeros((5, 2, 4)), backend=backend)


def test_bad_layer_and_staging_rejected():
    pool = jnp.zeros((2, 5, 4), jnp.float32)
    with pytest.raises(ValueError, match="layer=2"):
        paged_gather(pool, [1], layer=2, backend=Backend.XLA)
    with pytest.raises(ValueError, match="layer=-1"):
        paged_gather(pool, [1], layer=-1, backend=Backend.XLA)
    with pytest.raises(ValueError, match=r"\(3, 2, 4\)"):
        paged_scatter(pool, [1, 2], jnp.zeros((3, 2, 4)), backend=Backend.XLA)
    with pytest.raises(ValueError, match="float16"):
        paged_scatter(pool, [1], jnp.zeros((1, 2, 4), jnp.float16), backend=Backend.XLA)


@pytest.mark.parametrize("pack", [False, True])
def test_bool_pool(pack):
    rng = np.random.default_rng(12)
    pool = jnp.asarray(rng.random((2, 6, 3, 8)) > 0.5)
    staging = jnp.asarray(rng.random((3, 2, 3, 8)) > 0.5)
    ids = [5, 0, 3]
    tuning = PagedCopyTuning(chunk_elems=16, pack_words=pack)
    got = paged_gather(pool, ids, backend=INTERP, tuning=tuning)
    assert_bits_equal(got, np_gather(pool, ids, PF, None))
    new = paged_scatter(pool, ids, staging, backend=INTERP, tuning=tuning)
    assert_bits_equal(new, np_scatter(pool, ids, staging, PF, None))


def test_reference_functions_are_jittable():
    rng = np.random.default_rng(11)
    pool = random_array(rng, (2, 5, 3), jnp.int32)
    ids = jnp.asarray([4, 1, 5])  # 5 == sentinel: filled on gather, dropped on scatter
    g = jax.jit(functools.partial(paged_gather_reference, layout=Layout.LAYER_FIRST))(pool, ids)
    assert g.shape == (2, 3, 3)
    assert (np.asarray(g[:, 2]) == 0).all()
    new = jax.jit(paged_scatter_reference)(pool, ids, jnp.swapaxes(g, 0, 1) + 1)
    assert_bits_equal(new[:, jnp.asarray([0, 2, 3])], pool[:, jnp.asarray([0, 2, 3])])
