"""Tests of the Triton backend of kernels_pallas.paged_gather / paged_scatter: CUDA
cross-lowering of the real Pallas -> Triton path (no GPU needed) and, on a GPU, the
Triton kernels against the references (``gpu``-marked, skipped on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_copy_harness import (
    DSV4_BYTE_ROWS,
    MHA_DTYPES,
    MHA_ROW,
    PF,
    assert_bits_equal,
    np_gather,
    np_scatter,
    random_array,
    staging_shape,
)

from kernels_pallas.common import Backend, Layout, PagedCopyTuning, default_backend
from kernels_pallas.paged_gather import paged_gather, paged_gather_reference
from kernels_pallas.paged_scatter import (
    paged_scatter,
    paged_scatter_donated,
    paged_scatter_reference,
)

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
            return paged_gather(pool, ids, layer=lyr if per_layer else None, **kw)

        args = (pool, ids, lyr)
    else:
        staging = jax.ShapeDtypeStruct(staging_shape(num_layers, n, row, layout, layer), dtype)

        def f(pool, ids, lyr, staging):
            return paged_scatter(pool, ids, staging, layer=lyr if per_layer else None, **kw)

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
        pool = random_array(rng, (num_layers, num_pages, *row), dtype)
        for n in (1, 5):  # buckets 1 and 8 (3 sentinel slots)
            ids = rng.permutation(num_pages)[:n]
            got = paged_gather(pool, ids, layout=layout, layer=layer, backend=Backend.TRITON)
            want = paged_gather_reference(pool, jnp.asarray(ids), layout=layout, layer=layer)
            assert_bits_equal(got, want)
            staging = random_array(rng, staging_shape(num_layers, n, row, layout, layer), dtype)
            new = paged_scatter(
                pool, ids, staging, layout=layout, layer=layer, backend=Backend.TRITON
            )
            want_pool = paged_scatter_reference(
                pool, jnp.asarray(ids), staging, layout=layout, layer=layer
            )
            assert_bits_equal(new, want_pool)

    def test_donated_scatter_in_place(self):
        rng = np.random.default_rng(10)
        pool = random_array(rng, (4, 64, 8_448), jnp.uint8)
        keep = np.array(pool, copy=True)
        staging = random_array(rng, (5, 4, 8_448), jnp.uint8)
        ids = [63, 0, 17, 5, 30]
        new = paged_scatter_donated(pool, ids, staging, backend=Backend.TRITON)
        assert pool.is_deleted()
        assert_bits_equal(new, np_scatter(keep, ids, staging, PF, None))

    @pytest.mark.parametrize(
        "tuning", [PagedCopyTuning(pack_words=True), PagedCopyTuning(num_warps=8, chunk_elems=1024)]
    )
    def test_tunings(self, tuning):
        rng = np.random.default_rng(11)
        pool = random_array(rng, (3, 40, 37_440), jnp.uint8)
        ids = [39, 0, 7, 21, 8]
        got = paged_gather(pool, ids, backend=Backend.TRITON, tuning=tuning)
        assert_bits_equal(got, np_gather(pool, ids, PF, None))
        staging = random_array(rng, (5, 3, 37_440), jnp.uint8)
        new = paged_scatter(pool, ids, staging, backend=Backend.TRITON, tuning=tuning)
        assert_bits_equal(new, np_scatter(pool, ids, staging, PF, None))

    def test_large_byte_pool_packed(self):
        """2.4 GB uint8 pool (> 2 GiB, copied as uint32 words); pages near the end."""
        shape = (4, 4000, 149_760)
        pool = jax.random.bits(jax.random.key(0), shape, jnp.uint8)
        ids = [3999, 0, 2500, 3998, 1234]
        got = paged_gather(pool, ids, backend=Backend.TRITON)
        assert bool(jnp.array_equal(got, paged_gather_reference(pool, jnp.asarray(ids))))
        staging = jax.random.bits(jax.random.key(1), (5, 4, 149_760), jnp.uint8)
        want = paged_scatter_reference(pool, jnp.asarray(ids), staging)
        new = paged_scatter_donated(pool, ids, staging, backend=Backend.TRITON)
        assert bool(jnp.array_equal(new, want))

    def test_default_backend_is_triton(self):
        assert default_backend() == Backend.TRITON
