"""Tests of kernels_pallas.paged_copy: Pallas (interpret) vs the jnp reference,
bucketing, id validation, tuning validation, and CUDA cross-lowering."""

from __future__ import annotations

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import paged_copy as pc
from kernels_pallas.paged_copy import Backend, Layout, PagedCopyTuning

INTERP = Backend.INTERPRET
DSV4_BYTE_ROWS = (149_760, 37_440, 8_448, 1_728, 65_536, 16_384)
MHA_ROW = (2, 16, 4, 64)  # K/V, page size 16, 4 heads, head dim 64
MHA_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn, jnp.uint8)
NUM_PAGES = 11
# Non-contiguous, unsorted ids for page counts 1, 3, 5, 8 (8 = an exact bucket).
IDS = {
    1: [3],
    3: [6, 0, 4],
    5: [7, 2, 9, 0, 4],
    8: [5, 1, 8, 3, 10, 0, 7, 2],
}


def _bits(x) -> np.ndarray:
    """Raw bytes of an array (bit-exact comparison for every dtype, NaNs included)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, -1)


def assert_bits_equal(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(_bits(a), _bits(b))


def _random(rng, shape, dtype) -> jax.Array:
    """Fresh random non-zero bytes reinterpreted as ``dtype`` (no zeros, no NaN/inf)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.name.startswith(("bfloat", "float8")):
        x = rng.uniform(0.5, 4.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        return jnp.asarray(x, dtype)
    return jnp.asarray(rng.integers(1, 200, size=shape), dtype)


def _staging_shape(num_layers, n, row, layout, layer):
    if layer is not None:
        return (n, *row)
    if layout == Layout.PAGE_FIRST:
        return (n, num_layers, *row)
    return (num_layers, n, *row)


# ---------------------------------------------------------------------------
# Kernel (interpret) vs reference.
# ---------------------------------------------------------------------------

PF, LF = Layout.PAGE_FIRST, Layout.LAYER_FIRST
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
    # Word packing (uint8 -> uint32; fp8 rows of 14 bytes -> uint16).
    _case(jnp.uint8, (8_448,), _T(chunk_elems=512, pack_words=True), LF, None, 3, "u8-8448-pack"),
    _case(
        jnp.float8_e4m3fn, (7, 2), _T(chunk_elems=16, pack_words=True), PF, None, 5, "fp8-7x2-pack"
    ),
]


def _np_gather(pool, ids, layout, layer):
    pool = np.asarray(pool)
    if layer is not None:
        return pool[layer][ids]
    out = pool[:, ids]
    return np.swapaxes(out, 0, 1) if layout == Layout.PAGE_FIRST else out


def _np_scatter(pool, ids, staging, layout, layer):
    pool = np.array(pool, copy=True)
    staging = np.asarray(staging)
    if layer is not None:
        pool[layer, ids] = staging
    elif layout == Layout.PAGE_FIRST:
        pool[:, ids] = np.swapaxes(staging, 0, 1)
    else:
        pool[:, ids] = staging
    return pool


@pytest.mark.parametrize(("dtype", "row", "tuning", "layout", "layer", "n"), _KERNEL_CASES)
def test_kernel_matches_reference(request, dtype, row, tuning, layout, layer, n):
    num_layers = 2
    ids = IDS[n]
    rng = np.random.default_rng(zlib.crc32(request.node.callspec.id.encode()))
    pool = _random(rng, (num_layers, NUM_PAGES, *row), dtype)
    staging = _random(rng, _staging_shape(num_layers, n, row, layout, layer), dtype)

    got = pc.paged_gather(pool, ids, layout=layout, layer=layer, backend=INTERP, tuning=tuning)
    assert got.shape == _staging_shape(num_layers, n, row, layout, layer)
    assert_bits_equal(got, _np_gather(pool, ids, layout, layer))

    new = pc.paged_scatter(
        pool, ids, staging, layout=layout, layer=layer, backend=INTERP, tuning=tuning
    )
    # The written pages really changed (a no-op kernel fails: staging != pool bytes) ...
    assert_bits_equal(new, _np_scatter(pool, ids, staging, layout, layer))
    # ... and every untouched (layer, page) keeps its bytes.
    touched = np.zeros((num_layers, NUM_PAGES), bool)
    if layer is None:
        touched[:, ids] = True
    else:
        touched[layer, ids] = True
    np.testing.assert_array_equal(_bits(new)[~touched], _bits(pool)[~touched])


@pytest.mark.parametrize(("dtype", "row", "tuning", "layout", "layer", "n"), _KERNEL_CASES[::3])
def test_reference_matches_numpy(dtype, row, tuning, layout, layer, n):
    """The XLA backend (= the jnp reference) against plain numpy indexing."""
    del tuning
    rng = np.random.default_rng(n)
    pool = _random(rng, (2, NUM_PAGES, *row), dtype)
    staging = _random(rng, _staging_shape(2, n, row, layout, layer), dtype)
    ids = IDS[n]
    got = pc.paged_gather(pool, ids, layout=layout, layer=layer, backend=Backend.XLA)
    assert_bits_equal(got, _np_gather(pool, ids, layout, layer))
    new = pc.paged_scatter(pool, ids, staging, layout=layout, layer=layer, backend=Backend.XLA)
    assert_bits_equal(new, _np_scatter(pool, ids, staging, layout, layer))


def test_gather_output_is_not_stale_memory():
    """Gather into a poisoned (NaN) first result, then real data: no reuse/no-op."""
    rng = np.random.default_rng(1)
    pool = _random(rng, (3, 6, 5, 9), jnp.float32)
    ids = [4, 1, 5]
    want = _np_gather(pool, ids, PF, None)
    poison = jnp.full_like(pool, jnp.nan)
    tuning = PagedCopyTuning(chunk_elems=16)
    assert np.isnan(pc.paged_gather(poison, ids, backend=INTERP, tuning=tuning)).all()
    assert_bits_equal(pc.paged_gather(pool, ids, backend=INTERP, tuning=tuning), want)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_duplicate_ids_allowed_in_gather(backend):
    rng = np.random.default_rng(2)
    pool = _random(rng, (2, 5, 40), jnp.float32)
    ids = [3, 3, 0]
    got = pc.paged_gather(pool, ids, backend=backend, tuning=PagedCopyTuning(chunk_elems=16))
    assert_bits_equal(got, _np_gather(pool, ids, PF, None))


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
    pool = _random(rng, (num_layers, num_pages, *row), jnp.float32)
    staging = _random(rng, _staging_shape(num_layers, 5, row, layout, layer), jnp.float32)
    new = pc.paged_scatter(
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
    assert_bits_equal(new, _np_scatter(pool, ids, staging, layout, layer))


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_bucket_sized_staging_is_accepted(backend):
    """Staging already padded to the bucket: rows past n are ignored."""
    rng = np.random.default_rng(4)
    pool = _random(rng, (2, 9, 33), jnp.float32)
    ids = [8, 0, 5]
    staging = _random(rng, (4, 2, 33), jnp.float32)  # bucket_size(3) == 4
    new = pc.paged_scatter(pool, ids, staging, backend=backend)
    assert_bits_equal(new, _np_scatter(pool, ids, staging[:3], PF, None))


def test_one_trace_per_bucket(monkeypatch):
    """n = 5, 6, 7, 8 share one trace of the bucket-8 functions; n = 9 retraces."""
    gather = jax.jit(chex.assert_max_traces(pc._gather_impl, n=1), static_argnames=pc._STATIC)
    scatter = jax.jit(chex.assert_max_traces(pc._scatter_impl, n=1), static_argnames=pc._STATIC)
    monkeypatch.setattr(pc, "_gather_jit", gather)
    monkeypatch.setattr(pc, "_scatter_jit", scatter)
    rng = np.random.default_rng(5)
    pool = _random(rng, (2, 16, 24), jnp.float32)
    tuning = PagedCopyTuning(chunk_elems=16)
    for n in (5, 6, 7, 8):
        ids = rng.permutation(16)[:n]
        out = pc.paged_gather(pool, ids, backend=INTERP, tuning=tuning)
        assert out.shape == (n, 2, 24)
        assert_bits_equal(out, _np_gather(pool, ids, PF, None))
        staging = _random(rng, (n, 2, 24), jnp.float32)
        new = pc.paged_scatter(pool, ids, staging, backend=INTERP, tuning=tuning)
        assert_bits_equal(new, _np_scatter(pool, ids, staging, PF, None))
    with pytest.raises(AssertionError, match="trace"):
        pc.paged_gather(pool, rng.permutation(16)[:9], backend=INTERP, tuning=tuning)


def test_per_layer_compiles_once_for_all_layers(monkeypatch):
    gather = jax.jit(chex.assert_max_traces(pc._gather_impl, n=1), static_argnames=pc._STATIC)
    monkeypatch.setattr(pc, "_gather_jit", gather)
    rng = np.random.default_rng(6)
    pool = _random(rng, (4, 7, 20), jnp.float32)
    for layer in range(4):
        got = pc.paged_gather(pool, [6, 1], layer=layer, backend=INTERP)
        assert_bits_equal(got, _np_gather(pool, [6, 1], PF, layer))


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_traced_ids_inside_user_jit(backend):
    """Ids traced by the caller's jit: no host validation, padding done with jnp;
    sentinel (== P) and negative ids are skipped, as is an out-of-range layer."""
    rng = np.random.default_rng(7)
    num_pages = 10
    pool = _random(rng, (2, num_pages, 3, 11), jnp.float32)
    staging = _random(rng, (5, 2, 3, 11), jnp.float32)
    ids = jnp.asarray([9, num_pages, 4, -1, 0], jnp.int32)
    live = [0, 2, 4]  # positions of the live ids 9, 4, 0
    tuning = PagedCopyTuning(chunk_elems=16)

    @jax.jit
    def roundtrip(pool, ids, staging, layer):
        new = pc.paged_scatter(pool, ids, staging, backend=backend, tuning=tuning)
        got = pc.paged_gather(new, ids, layer=layer, backend=backend, tuning=tuning)
        untouched = pc.paged_scatter(
            new, ids, staging[:, 0], layer=layer + 7, backend=backend, tuning=tuning
        )
        return new, got, untouched

    new, got, untouched = roundtrip(pool, ids, staging, jnp.int32(1))
    assert got.shape == (5, 3, 11)
    assert_bits_equal(new, _np_scatter(pool, [9, 4, 0], staging[np.asarray(live)], PF, None))
    assert_bits_equal(got[np.asarray(live)], staging[np.asarray(live), 1])
    assert_bits_equal(untouched, new)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_donated_scatter(backend):
    rng = np.random.default_rng(8)
    pool = _random(rng, (2, 6, 40), jnp.float32)
    keep = np.array(pool, copy=True)  # (a zero-copy numpy view would block donation)
    staging = _random(rng, (2, 2, 40), jnp.float32)
    new = pc.paged_scatter_donated(pool, [5, 0], staging, backend=backend)
    assert_bits_equal(new, _np_scatter(keep, [5, 0], staging, PF, None))
    assert pool.is_deleted()


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_empty_page_list(backend):
    pool = jnp.ones((2, 4, 3), jnp.float32)
    assert pc.paged_gather(pool, [], backend=backend).shape == (0, 2, 3)
    assert pc.paged_gather(pool, [], layout=Layout.LAYER_FIRST, backend=backend).shape == (2, 0, 3)
    new = pc.paged_scatter(pool, [], jnp.zeros((0, 2, 3)), backend=backend)
    assert_bits_equal(new, pool)


def test_default_backend_and_bucket_size():
    assert pc.default_backend() == (
        Backend.TRITON if jax.default_backend() == "gpu" else Backend.XLA
    )
    assert [pc.bucket_size(n) for n in (0, 1, 2, 3, 5, 8, 9, 1000)] == [
        1, 1, 2, 4, 8, 8, 16, 1024,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="-1"):
        pc.bucket_size(-1)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP, Backend.TRITON])
@pytest.mark.parametrize(
    ("ids", "match"),
    [([0, -1, 2], r"\[-1\]"), ([3, 11], r"\[11\]"), ([2, 40, -5], r"\[-5, 40\]")],
)
def test_out_of_range_ids_rejected(backend, ids, match):
    pool = jnp.zeros((2, 11, 4), jnp.float32)
    with pytest.raises(ValueError, match=match):
        pc.paged_gather(pool, ids, backend=backend)
    with pytest.raises(ValueError, match=match):
        pc.paged_scatter(pool, ids, jnp.zeros((len(ids), 2, 4)), backend=backend)


@pytest.mark.parametrize("backend", [Backend.XLA, INTERP])
def test_duplicate_ids_rejected_in_scatter(backend):
    pool = jnp.zeros((2, 11, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"duplicate page ids in scatter: \[3, 7\]"):
        pc.paged_scatter(pool, [3, 7, 1, 7, 3], jnp.zeros((5, 2, 4)), backend=backend)


def test_validate_page_ids():
    out = pc.validate_page_ids([4, 0, 4], 5, unique=False)
    assert out.dtype == np.int32 and out.tolist() == [4, 0, 4]
    with pytest.raises(ValueError, match=r"\[4\]"):
        pc.validate_page_ids([4, 0, 4], 5, unique=True)
    with pytest.raises(ValueError, match=r"\[5\]"):
        pc.validate_page_ids(np.array([5]), 5, unique=False)
    with pytest.raises(ValueError, match="1-D"):
        pc.validate_page_ids([[1]], 5, unique=False)
    with pytest.raises(ValueError, match="integers"):
        pc.validate_page_ids([1.0], 5, unique=False)


def test_bad_layer_and_staging_rejected():
    pool = jnp.zeros((2, 5, 4), jnp.float32)
    with pytest.raises(ValueError, match="layer=2"):
        pc.paged_gather(pool, [1], layer=2, backend=Backend.XLA)
    with pytest.raises(ValueError, match="layer=-1"):
        pc.paged_gather(pool, [1], layer=-1, backend=Backend.XLA)
    with pytest.raises(ValueError, match=r"\(3, 2, 4\)"):
        pc.paged_scatter(pool, [1, 2], jnp.zeros((3, 2, 4)), backend=Backend.XLA)
    with pytest.raises(ValueError, match="float16"):
        pc.paged_scatter(pool, [1], jnp.zeros((1, 2, 4), jnp.float16), backend=Backend.XLA)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_warps": 3}, "num_warps=3"),
        ({"num_warps": 64}, "num_warps=64"),
        ({"num_warps": 0}, "num_warps=0"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"num_stages": 9}, "num_stages=9"),
        ({"chunk_elems": 1000}, "chunk_elems=1000"),
        ({"chunk_elems": 8}, "chunk_elems=8"),
        ({"chunk_elems": 1 << 17}, "chunk_elems=131072"),
        ({"num_warps": 4.0}, "4.0"),
        ({"num_stages": True}, "True"),
        ({"pack_words": 1}, "pack_words"),
    ],
)
def test_bad_tuning_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedCopyTuning(**kwargs)


def test_tuning_is_frozen_and_hashable():
    t = PagedCopyTuning(num_warps=8, num_stages=2, chunk_elems=1024)
    assert hash(t) == hash(PagedCopyTuning(num_warps=8, num_stages=2, chunk_elems=1024))
    with pytest.raises(AttributeError):
        t.num_warps = 2  # type: ignore[misc]


@pytest.mark.parametrize("pack", [False, True])
def test_bool_pool(pack):
    rng = np.random.default_rng(12)
    pool = jnp.asarray(rng.random((2, 6, 3, 8)) > 0.5)
    staging = jnp.asarray(rng.random((3, 2, 3, 8)) > 0.5)
    ids = [5, 0, 3]
    tuning = PagedCopyTuning(chunk_elems=16, pack_words=pack)
    got = pc.paged_gather(pool, ids, backend=INTERP, tuning=tuning)
    assert_bits_equal(got, _np_gather(pool, ids, PF, None))
    new = pc.paged_scatter(pool, ids, staging, backend=INTERP, tuning=tuning)
    assert_bits_equal(new, _np_scatter(pool, ids, staging, PF, None))


def test_kernel_word_selection():
    u8 = np.dtype(jnp.uint8)
    assert pc._kernel_word(u8, 149_760, 1 << 20, False) == u8
    assert pc._kernel_word(u8, 149_760, 1 << 20, True) == np.uint32
    assert pc._kernel_word(u8, 149_760, 3 << 30, False) == np.uint32  # > 2 GiB: packed
    assert pc._kernel_word(u8, 6, 3 << 30, False) == np.uint16
    with pytest.raises(ValueError, match="149759"):
        pc._kernel_word(u8, 149_759, 3 << 30, False)
    fp8 = np.dtype(jnp.float8_e4m3fn)
    assert pc._kernel_word(fp8, 7, 100, False) == np.uint8  # fp8 copied as bytes
    assert pc._kernel_word(np.dtype(jnp.bfloat16), 7, 100, False) == jnp.bfloat16
    assert pc._kernel_word(np.dtype(jnp.bfloat16), 8, 100, True) == np.uint32


# ---------------------------------------------------------------------------
# CUDA cross-lowering (real Pallas -> Triton lowering, no GPU needed).
# ---------------------------------------------------------------------------


def _lower_cuda(dtype, row, layout, layer, op, *, num_layers=3, num_pages=64, n=5, tuning=None):
    """Lowers the public function with traced ids (and traced layer) for CUDA."""
    pool = jax.ShapeDtypeStruct((num_layers, num_pages, *row), dtype)
    ids = jax.ShapeDtypeStruct((n,), jnp.int32)
    per_layer = layer is not None
    lyr = jax.ShapeDtypeStruct((), jnp.int32)
    kw = dict(layout=layout, backend=Backend.TRITON, tuning=tuning)
    if op == "gather":

        def f(pool, ids, lyr):
            return pc.paged_gather(pool, ids, layer=lyr if per_layer else None, **kw)

        args = (pool, ids, lyr)
    else:
        staging = jax.ShapeDtypeStruct(_staging_shape(num_layers, n, row, layout, layer), dtype)

        def f(pool, ids, lyr, staging):
            return pc.paged_scatter(pool, ids, staging, layer=lyr if per_layer else None, **kw)

        args = (pool, ids, lyr, staging)
    donate = (0,) if op == "scatter" else ()
    return jax.jit(f, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",))


def _check_lowered(lowered, op, num_programs=None):
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1, text[:2000]
    if op == "scatter":
        assert "output_operand_aliases" in text
    if num_programs is not None:
        assert f"grid_x = {num_programs[0]} : i32" in text


_LOWER_VARIANTS = [
    pytest.param(Layout.PAGE_FIRST, None, id="page_first"),
    pytest.param(Layout.LAYER_FIRST, None, id="layer_first"),
    pytest.param(Layout.PAGE_FIRST, 0, id="per_layer"),
]


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize(("layout", "layer"), _LOWER_VARIANTS)
@pytest.mark.parametrize("row_bytes", DSV4_BYTE_ROWS)
def test_cuda_lowering_dsv4_rows(row_bytes, layout, layer, op):
    lowered = _lower_cuda(jnp.uint8, (row_bytes,), layout, layer, op)
    _check_lowered(lowered, op, num_programs=(8,))  # 5 ids -> bucket 8


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize(("layout", "layer"), _LOWER_VARIANTS)
@pytest.mark.parametrize("dtype", MHA_DTYPES, ids=lambda d: np.dtype(d).name)
def test_cuda_lowering_mha(dtype, layout, layer, op):
    _check_lowered(_lower_cuda(dtype, MHA_ROW, layout, layer, op), op)


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize(
    "tuning",
    [
        PagedCopyTuning(num_warps=1, num_stages=1, chunk_elems=16),
        PagedCopyTuning(num_warps=8, num_stages=3, chunk_elems=65536),
        PagedCopyTuning(num_warps=32, num_stages=8, chunk_elems=1024, pack_words=True),
    ],
    ids=["small", "large", "packed"],
)
def test_cuda_lowering_tunings(tuning, op):
    _check_lowered(
        _lower_cuda(jnp.uint8, (37_440,), Layout.PAGE_FIRST, None, op, tuning=tuning), op
    )
    _check_lowered(_lower_cuda(jnp.bfloat16, (3, 7), Layout.LAYER_FIRST, 1, op, tuning=tuning), op)


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize(
    "dtype",
    [jnp.bool_, jnp.int8, jnp.int32, jnp.float8_e5m2],
    ids=lambda d: np.dtype(d).name,
)
def test_cuda_lowering_other_dtypes(dtype, op):
    _check_lowered(_lower_cuda(dtype, (5, 9), Layout.LAYER_FIRST, None, op), op)


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_cuda_lowering_large_byte_pool_is_packed(op):
    """A 2.4 GB uint8 pool (shape only) lowers with uint32 words (32-bit offsets safe)."""
    lowered = _lower_cuda(jnp.uint8, (149_760,), Layout.PAGE_FIRST, None, op, num_layers=4,
                          num_pages=4000)  # fmt: skip
    _check_lowered(lowered, op)
    assert "tensor<4x4000x37440xui32>" in lowered.as_text()


def test_cuda_lowering_fp8_is_bitcast_to_bytes():
    lowered = _lower_cuda(jnp.float8_e4m3fn, MHA_ROW, Layout.PAGE_FIRST, None, "scatter")
    text = lowered.as_text()
    assert "bitcast_convert" in text and "xui8>" in text


# ---------------------------------------------------------------------------
# Real GPU (skipped on CPU by conftest).
# ---------------------------------------------------------------------------


@pytest.mark.gpu
class TestTritonOnGpu:
    @pytest.mark.parametrize(("layout", "layer"), _LOWER_VARIANTS)
    @pytest.mark.parametrize(
        ("dtype", "row"),
        [(jnp.uint8, (r,)) for r in DSV4_BYTE_ROWS]
        + [(d, MHA_ROW) for d in MHA_DTYPES]
        + [(jnp.float32, (3, 7))],
        ids=lambda v: getattr(v, "__name__", str(v)),
    )
    def test_triton_matches_reference(self, dtype, row, layout, layer):
        rng = np.random.default_rng(9)
        num_layers, num_pages = 3, 40
        pool = _random(rng, (num_layers, num_pages, *row), dtype)
        for n in (1, 5):  # buckets 1 and 8 (3 sentinel slots)
            ids = rng.permutation(num_pages)[:n]
            got = pc.paged_gather(pool, ids, layout=layout, layer=layer, backend=Backend.TRITON)
            want = pc.paged_gather_reference(pool, jnp.asarray(ids), layout=layout, layer=layer)
            assert_bits_equal(got, want)
            staging = _random(rng, _staging_shape(num_layers, n, row, layout, layer), dtype)
            new = pc.paged_scatter(
                pool, ids, staging, layout=layout, layer=layer, backend=Backend.TRITON
            )
            want_pool = pc.paged_scatter_reference(
                pool, jnp.asarray(ids), staging, layout=layout, layer=layer
            )
            assert_bits_equal(new, want_pool)

    def test_donated_scatter_in_place(self):
        rng = np.random.default_rng(10)
        pool = _random(rng, (4, 64, 8_448), jnp.uint8)
        keep = np.array(pool, copy=True)
        staging = _random(rng, (5, 4, 8_448), jnp.uint8)
        ids = [63, 0, 17, 5, 30]
        new = pc.paged_scatter_donated(pool, ids, staging, backend=Backend.TRITON)
        assert pool.is_deleted()
        assert_bits_equal(new, _np_scatter(keep, ids, staging, PF, None))

    @pytest.mark.parametrize(
        "tuning", [PagedCopyTuning(pack_words=True), PagedCopyTuning(num_warps=8, chunk_elems=1024)]
    )
    def test_tunings(self, tuning):
        rng = np.random.default_rng(11)
        pool = _random(rng, (3, 40, 37_440), jnp.uint8)
        ids = [39, 0, 7, 21, 8]
        got = pc.paged_gather(pool, ids, backend=Backend.TRITON, tuning=tuning)
        assert_bits_equal(got, _np_gather(pool, ids, PF, None))
        staging = _random(rng, (5, 3, 37_440), jnp.uint8)
        new = pc.paged_scatter(pool, ids, staging, backend=Backend.TRITON, tuning=tuning)
        assert_bits_equal(new, _np_scatter(pool, ids, staging, PF, None))

    def test_large_byte_pool_packed(self):
        """2.4 GB uint8 pool (> 2 GiB, copied as uint32 words); pages near the end."""
        shape = (4, 4000, 149_760)
        pool = jax.random.bits(jax.random.key(0), shape, jnp.uint8)
        ids = [3999, 0, 2500, 3998, 1234]
        got = pc.paged_gather(pool, ids, backend=Backend.TRITON)
        assert bool(jnp.array_equal(got, pc.paged_gather_reference(pool, jnp.asarray(ids))))
        staging = jax.random.bits(jax.random.key(1), (5, 4, 149_760), jnp.uint8)
        want = pc.paged_scatter_reference(pool, jnp.asarray(ids), staging)
        new = pc.paged_scatter_donated(pool, ids, staging, backend=Backend.TRITON)
        assert bool(jnp.array_equal(new, want))

    def test_default_backend_is_triton(self):
        assert pc.default_backend() == Backend.TRITON


def test_reference_functions_are_jittable():
    rng = np.random.default_rng(11)
    pool = _random(rng, (2, 5, 3), jnp.int32)
    ids = jnp.asarray([4, 1, 5])  # 5 == sentinel: filled on gather, dropped on scatter
    g = jax.jit(functools.partial(pc.paged_gather_reference, layout=Layout.LAYER_FIRST))(pool, ids)
    assert g.shape == (2, 3, 3)
    assert (np.asarray(g[:, 2]) == 0).all()
    new = jax.jit(pc.paged_scatter_reference)(pool, ids, jnp.swapaxes(g, 0, 1) + 1)
    assert_bits_equal(new[:, jnp.asarray([0, 2, 3])], pool[:, jnp.asarray([0, 2, 3])])
