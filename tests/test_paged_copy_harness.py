"""Test harness for the paged gather/scatter tests (test_paged_copy*.py): shared
shapes and page ids, random pools, bit-exact comparison and the plain-numpy oracle.
No tests here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import Backend, Layout

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


def bits(x) -> np.ndarray:
    """Raw bytes of an array (bit-exact comparison for every dtype, NaNs included)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, -1)


def assert_bits_equal(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(bits(a), bits(b))


def random_array(rng, shape, dtype) -> jax.Array:
    """Fresh random non-zero bytes reinterpreted as ``dtype`` (no zeros, no NaN/inf)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.name.startswith(("bfloat", "float8")):
        x = rng.uniform(0.5, 4.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        return jnp.asarray(x, dtype)
    return jnp.asarray(rng.integers(1, 200, size=shape), dtype)


def staging_shape(num_layers, n, row, layout, layer):
    if layer is not None:
        return (n, *row)
    if layout == Layout.PAGE_FIRST:
        return (n, num_layers, *row)
    return (num_layers, n, *row)


PF, LF = Layout.PAGE_FIRST, Layout.LAYER_FIRST


def np_gather(pool, ids, layout, layer):
    pool = np.asarray(pool)
    if layer is not None:
        return pool[layer][ids]
    out = pool[:, ids]
    return np.swapaxes(out, 0, 1) if layout == Layout.PAGE_FIRST else out


def np_scatter(pool, ids, staging, layout, layer):
    pool = np.array(pool, copy=True)
    staging = np.asarray(staging)
    if layer is not None:
        pool[layer, ids] = staging
    elif layout == Layout.PAGE_FIRST:
        pool[:, ids] = np.swapaxes(staging, 0, 1)
    else:
        pool[:, ids] = staging
    return pool
