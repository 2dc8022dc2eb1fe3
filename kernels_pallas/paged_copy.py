"""Paged gather/scatter between a paged KV pool and a contiguous staging buffer.

These kernels move KV pages between one pipeline stage's stacked sub-pool and a
contiguous device staging buffer; the staging buffer is what crosses the
host<->device link in one XLA transfer (no Pallas GPU backend can address host
memory, see DESIGN.md §6).

Shapes (``L`` layers, ``P`` pages in the pool, ``n`` page ids, ``row`` any
trailing shape, e.g. ``(16, 32)`` float32, ``(149760,)`` uint8 fp8 byte rows or
``(2, 16, 4, 64)`` bf16 MHA K/V)::

  pool      [L, P, *row]
  page_ids  int32 [n]
  staging   [n, L, *row]   Layout.PAGE_FIRST   (default)
            [L, n, *row]   Layout.LAYER_FIRST
            [n, *row]      per-layer variant (``layer=<int>``), either layout

Backends:

* ``Backend.XLA``: plain ``jnp``, the production CPU path. The gather is
  ``paged_gather_reference``; the scatter is a loop of per-page
  ``dynamic_update_slice`` (in place, no transposed staging copy), checked
  against ``paged_scatter_reference``, the test oracle.
* ``Backend.TRITON``: a Pallas kernel lowered through Triton with explicit
  ``pltriton.CompilerParams(num_warps, num_stages)``; the default on GPU.
* ``Backend.INTERPRET``: the same Pallas kernel with ``interpret=True`` (CPU
  tests).

Kernel design: each row is flattened to ``R = prod(row)`` elements and tiled into
power-of-two chunks of ``C`` elements (Triton needs power-of-two block shapes);
the tail chunk is masked. The grid is ``(page, layer, chunk)`` (``(page, chunk)``
for the per-layer variant, where the layer is a dynamic scalar operand so one
compile serves every layer). The pool is never padded.

Bucketing: the public functions pad ``page_ids`` (and the scatter's staging) to
``bucket_size(n)``, the next power of two, so each transfer compiles once per
bucket. Padding ids are the out-of-range sentinel ``P``; the kernels mask every
load/store of a sentinel page and the XLA scatter uses ``mode="drop"``, so
padding never reads or writes a live page. Gather slices the result back to
exactly ``n`` pages.

Page ids are validated on the host (numpy) whenever they are concrete: interpret
mode silently clamps out-of-range ids and resolves duplicates last-wins, and a
GPU does neither predictably.

In-place scatter: the Pallas scatter aliases the pool to its output
(``input_output_aliases``). The aliasing only avoids a full pool copy when the
caller's ``jax.jit`` donates the pool (``donate_argnums``); ``paged_scatter``
itself does not donate (the caller's pool stays valid, XLA copies it), while
``paged_scatter_donated`` is the jitted, donating variant that updates the pool
buffer in place and invalidates the argument.

Dtypes: the copy is bit-exact for any dtype. Triton does not lower every dtype
(e.g. ``float8_e4m3fn`` on some versions, ``bool``); such pools are
reinterpreted with ``jax.lax.bitcast_convert_type`` as a same-width unsigned
integer around the kernel (free in XLA). 1-byte pools larger than 2 GiB are
reinterpreted as 2- or 4-byte words (rows must allow it), because the Pallas
Triton lowering uses 32-bit element offsets below 4 GiB which would overflow
past 2**31 bytes; ``PagedCopyTuning(pack_words=True)`` requests the same
packing for any pool (wider, better vectorised accesses).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = [
    "Backend",
    "Layout",
    "PagedCopyTuning",
    "bucket_size",
    "default_backend",
    "paged_gather",
    "paged_gather_reference",
    "paged_scatter",
    "paged_scatter_donated",
    "paged_scatter_reference",
    "validate_page_ids",
]


class Layout(enum.Enum):
    """Staging layout. ``PAGE_FIRST``: ``[n, L, *row]``; ``LAYER_FIRST``: ``[L, n, *row]``."""

    PAGE_FIRST = "page_first"
    LAYER_FIRST = "layer_first"


class Backend(enum.Enum):
    """Implementation of a paged copy (see module docstring)."""

    XLA = "xla"
    TRITON = "triton"
    INTERPRET = "interpret"


def default_backend() -> Backend:
    """``TRITON`` when jax's default backend is a GPU, else ``XLA``."""
    return Backend.TRITON if jax.default_backend() in ("gpu", "cuda", "rocm") else Backend.XLA


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _check_int(name: str, value: Any, lo: int, hi: int, *, pow2: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"PagedCopyTuning.{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"PagedCopyTuning.{name}={value} out of range [{lo}, {hi}]")
    if pow2 and not _is_pow2(int(value)):
        raise ValueError(f"PagedCopyTuning.{name}={value} is not a power of two")


@dataclasses.dataclass(frozen=True)
class PagedCopyTuning:
    """Launch parameters of the Pallas paged-copy kernels (ignored by ``XLA``).

    Attributes:
      num_warps: warps per program, a power of two in ``[1, 32]``.
      num_stages: Triton software-pipelining stages, in ``[1, 8]``.
      chunk_elems: elements per program along the flattened row, a power of two
        in ``[16, 65536]``; clamped to ``next_power_of_2(R)`` for short rows.
      pack_words: reinterpret sub-4-byte rows as the widest unsigned word (up
        to 4 bytes) that divides the row byte size. Automatic, regardless of
        this flag, for 1-byte pools over 2 GiB.
    """

    num_warps: int = 4
    num_stages: int = 1
    chunk_elems: int = 4096
    pack_words: bool = False

    def __post_init__(self):
        _check_int("num_warps", self.num_warps, 1, 32, pow2=True)
        _check_int("num_stages", self.num_stages, 1, 8, pow2=False)
        _check_int("chunk_elems", self.chunk_elems, 16, 65536, pow2=True)
        if not isinstance(self.pack_words, bool):
            raise ValueError(f"PagedCopyTuning.pack_words must be a bool, got {self.pack_words!r}")


def bucket_size(n: int) -> int:
    """Next power of two ``>= n`` (minimum 1): the padded page count of a transfer."""
    if n < 0:
        raise ValueError(f"bucket_size: n={n} is negative")
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_page_ids(page_ids: Any, num_pages: int, *, unique: bool) -> np.ndarray:
    """Host-side check of concrete page ids; returns them as an int32 numpy ``[n]``.

    Raises ``ValueError`` naming the offending ids when an id is outside
    ``[0, num_pages)``, when ``unique`` and an id repeats (a scatter with
    duplicate ids has no defined result), or when ``page_ids`` is not 1-D
    integer. Traced ids cannot be checked; callers skip them.
    """
    ids = np.asarray(page_ids)
    if ids.ndim != 1:
        raise ValueError(f"page_ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"page_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= num_pages)]
    if bad.size:
        raise ValueError(f"page ids out of range [0, {num_pages}): {sorted(set(bad.tolist()))}")
    if unique:
        vals, counts = np.unique(ids, return_counts=True)
        dups = vals[counts > 1]
        if dups.size:
            raise ValueError(f"duplicate page ids in scatter: {dups.tolist()}")
    return ids.astype(np.int32)


# --------------------------------------------------------------------------
# Reference (XLA) implementation: also the production CPU path.
# --------------------------------------------------------------------------


def _skip_invalid(page_ids: jax.Array, num_pages: int) -> jax.Array:
    """Maps negative ids to the sentinel ``num_pages`` (jnp would wrap them)."""
    return jnp.where(page_ids < 0, num_pages, page_ids)


def paged_gather_reference(
    pool: jax.Array,
    page_ids: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
) -> jax.Array:
    """Plain-``jnp`` gather. ``pool [L, P, *row]``, ``page_ids [n]`` →
    ``[n, L, *row]`` (PAGE_FIRST), ``[L, n, *row]`` (LAYER_FIRST) or
    ``[n, *row]`` (``layer`` given). Ids outside ``[0, P)`` (the bucket padding
    sentinel ``P``) read zeros. Does not validate ids.
    """
    page_ids = _skip_invalid(jnp.asarray(page_ids, jnp.int32), pool.shape[1])
    if layer is not None:
        return jnp.take(pool[layer], page_ids, axis=0, mode="fill", fill_value=0)
    out = jnp.take(pool, page_ids, axis=1, mode="fill", fill_value=0)  # [L, n, *row]
    return jnp.swapaxes(out, 0, 1) if layout == Layout.PAGE_FIRST else out


def paged_scatter_reference(
    pool: jax.Array,
    page_ids: jax.Array,
    staging: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
) -> jax.Array:
    """Plain-``jnp`` scatter: ``pool`` with pages ``page_ids`` replaced by
    ``staging`` (shapes as in ``paged_gather_reference``'s output). Ids outside
    ``[0, P)`` (the bucket padding sentinel ``P``) and a ``layer`` outside
    ``[0, L)`` are dropped; other pages keep their bytes. Does not validate ids
    (duplicates: last write wins in XLA).
    """
    page_ids = _skip_invalid(jnp.asarray(page_ids, jnp.int32), pool.shape[1])
    staging = staging.astype(pool.dtype)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
        layer = jnp.where((layer < 0) | (layer >= pool.shape[0]), pool.shape[0], layer)
        return pool.at[layer, page_ids].set(staging, mode="drop")
    if layout == Layout.PAGE_FIRST:
        staging = jnp.swapaxes(staging, 0, 1)  # [L, n, *row]
    return pool.at[:, page_ids].set(staging, mode="drop")


# --------------------------------------------------------------------------
# Pallas kernels.
# --------------------------------------------------------------------------


def _program_coords(ids_ref, layer_ref, num_layers, num_pages, row_elems, chunk, per_layer):
    """(staging page slot, layer, pool page, chunk start, element mask) of this program.

    Grid ``(page slot, layer, chunk)``, or ``(page slot, chunk)`` per layer with the
    layer read from ``layer_ref``. Sentinel (padding) ids and an out-of-range traced
    layer give an all-false mask (their indices are clamped to 0 so no address is
    out of bounds); the tail chunk masks elements ``>= row_elems``.
    """
    p = pl.program_id(0)
    if per_layer:
        c = pl.program_id(1)
        lyr = layer_ref[0]
    else:
        lyr = pl.program_id(1)
        c = pl.program_id(2)
    page = ids_ref[p]
    live = (page >= 0) & (page < num_pages) & (lyr >= 0) & (lyr < num_layers)
    page = jnp.where(live, page, 0)
    lyr = jnp.where(live, lyr, 0)
    start = c * chunk
    mask = (start + jnp.arange(chunk, dtype=jnp.int32) < row_elems) & live
    return p, lyr, page, start, mask


def _gather_kernel(
    ids_ref,
    layer_ref,
    pool_ref,
    out_ref,
    *,
    num_layers,
    num_pages,
    row_elems,
    chunk,
    layout,
    per_layer,
):
    """One program copies ``chunk`` elements of one (page, layer) row.

    ids_ref [nb] int32, layer_ref [1] int32, pool_ref [L, P, R],
    out_ref [nb, L, R] / [L, nb, R] / [nb, R] (per-layer).
    """
    p, lyr, page, start, mask = _program_coords(
        ids_ref, layer_ref, num_layers, num_pages, row_elems, chunk, per_layer
    )
    x = pltriton.load(pool_ref.at[lyr, page, pl.ds(start, chunk)], mask=mask)
    if per_layer:
        dst = out_ref.at[p, pl.ds(start, chunk)]
    elif layout == Layout.PAGE_FIRST:
        dst = out_ref.at[p, lyr, pl.ds(start, chunk)]
    else:
        dst = out_ref.at[lyr, p, pl.ds(start, chunk)]
    pltriton.store(dst, x, mask=mask)


def _scatter_kernel(
    ids_ref,
    layer_ref,
    staging_ref,
    pool_in_ref,
    pool_ref,
    *,
    num_layers,
    num_pages,
    row_elems,
    chunk,
    layout,
    per_layer,
):
    """Inverse of ``_gather_kernel``; ``pool_ref`` aliases ``pool_in_ref``."""
    del pool_in_ref  # Same buffer as pool_ref (input_output_aliases).
    p, lyr, page, start, mask = _program_coords(
        ids_ref, layer_ref, num_layers, num_pages, row_elems, chunk, per_layer
    )
    if per_layer:
        src = staging_ref.at[p, pl.ds(start, chunk)]
    elif layout == Layout.PAGE_FIRST:
        src = staging_ref.at[p, lyr, pl.ds(start, chunk)]
    else:
        src = staging_ref.at[lyr, p, pl.ds(start, chunk)]
    x = pltriton.load(src, mask=mask)
    pltriton.store(pool_ref.at[lyr, page, pl.ds(start, chunk)], x, mask=mask)


# Dtypes the Pallas Triton lowering may reject; reinterpreted as same-width uints.
_UINT_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
_TRITON_NATIVE = frozenset(
    np.dtype(d)
    for d in (
        jnp.float32,
        jnp.float16,
        jnp.bfloat16,
        jnp.int8,
        jnp.int16,
        jnp.int32,
        jnp.uint8,
        jnp.uint16,
        jnp.uint32,
    )
)
_TWO_GIB = 2**31


def _kernel_word(dtype: np.dtype, row_elems: int, pool_bytes: int, pack: bool) -> np.dtype:
    """The dtype the kernel copies: the pool dtype or a same/wider unsigned word."""
    itemsize = dtype.itemsize
    row_bytes = row_elems * itemsize
    if itemsize < 4 and (pack or (itemsize == 1 and pool_bytes > _TWO_GIB)):
        for width in (4, 2):
            if width > itemsize and row_bytes % width == 0:
                return np.dtype(_UINT_OF_WIDTH[width])
        if itemsize == 1 and pool_bytes > _TWO_GIB:
            raise ValueError(
                f"1-byte pool of {pool_bytes} bytes (> 2 GiB) needs an even row byte size "
                f"to be packed into wider words; got {row_bytes}"
            )
    if dtype in _TRITON_NATIVE:
        return dtype
    return np.dtype(_UINT_OF_WIDTH[itemsize])


def _to_words(x: jax.Array, word: np.dtype) -> jax.Array:
    """Reinterpret ``x [..., R]`` as ``word [..., R * itemsize / word.itemsize]``."""
    if x.dtype == word:
        return x
    if x.dtype == jnp.bool_:  # bitcast_convert_type rejects bool; 0/1 bytes are exact.
        return _to_words(x.astype(jnp.uint8), word)
    src, dst = x.dtype.itemsize, word.itemsize
    if src == dst:
        return jax.lax.bitcast_convert_type(x, word)
    # src < dst: group dst // src elements into one word.
    x = x.reshape(*x.shape[:-1], x.shape[-1] * src // dst, dst // src)
    return jax.lax.bitcast_convert_type(x, word)


def _from_words(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """Inverse of ``_to_words``."""
    if x.dtype == dtype:
        return x
    if dtype == jnp.bool_:
        return _from_words(x, np.dtype(jnp.uint8)).astype(jnp.bool_)
    src, dst = x.dtype.itemsize, dtype.itemsize
    y = jax.lax.bitcast_convert_type(x, dtype)
    if src == dst:
        return y
    return y.reshape(*x.shape[:-1], x.shape[-1] * src // dst)


def _pallas_paged_copy(
    pool: jax.Array,
    ids: jax.Array,
    layer: jax.Array,
    staging: jax.Array | None,
    *,
    layout: Layout,
    per_layer: bool,
    interpret: bool,
    tuning: PagedCopyTuning,
) -> jax.Array:
    """Runs the gather (``staging is None``) or scatter kernel.

    pool [L, P, *row]; ids int32 [nb]; layer int32 [1]; staging as the gather
    output. Returns the gathered staging or the updated pool.
    """
    num_layers, num_pages, *row = pool.shape
    row = tuple(row)
    if jnp.issubdtype(pool.dtype, jnp.complexfloating):
        raise ValueError(f"pool dtype {pool.dtype} unsupported by the Pallas backends; use XLA")
    nb = ids.shape[0]
    row_elems = math.prod(row)
    word = _kernel_word(
        np.dtype(pool.dtype), row_elems, pool.size * pool.dtype.itemsize, tuning.pack_words
    )
    kpool = _to_words(pool.reshape(num_layers, num_pages, row_elems), word)
    kelems = kpool.shape[-1]
    chunk = min(tuning.chunk_elems, pl.next_power_of_2(kelems))
    num_chunks = pl.cdiv(kelems, chunk)
    if per_layer:
        grid = (nb, num_chunks)
        stage_shape = (nb, kelems)
    else:
        grid = (nb, num_layers, num_chunks)
        stage_shape = (
            (nb, num_layers, kelems) if layout == Layout.PAGE_FIRST else (num_layers, nb, kelems)
        )
    static = dict(
        num_layers=num_layers,
        num_pages=num_pages,
        row_elems=kelems,
        chunk=chunk,
        layout=layout,
        per_layer=per_layer,
    )
    compiler_params = pltriton.CompilerParams(
        num_warps=tuning.num_warps, num_stages=tuning.num_stages
    )
    if staging is None:
        out = pl.pallas_call(
            functools.partial(_gather_kernel, **static),
            grid=grid,
            out_shape=jax.ShapeDtypeStruct(stage_shape, word),
            compiler_params=compiler_params,
            interpret=interpret,
            name="paged_gather",
        )(ids, layer, kpool)
        out = _from_words(out, np.dtype(pool.dtype))
        return out.reshape(*stage_shape[:-1], *row)
    kstaging = _to_words(staging.reshape(*stage_shape[:-1], row_elems), word)
    out = pl.pallas_call(
        functools.partial(_scatter_kernel, **static),
        grid=grid,
        out_shape=jax.ShapeDtypeStruct(kpool.shape, word),
        input_output_aliases={3: 0},
        compiler_params=compiler_params,
        interpret=interpret,
        name="paged_scatter",
    )(ids, layer, kstaging, kpool)
    return _from_words(out, np.dtype(pool.dtype)).reshape(pool.shape)


# --------------------------------------------------------------------------
# Jitted pure inner functions (one compile per bucket) and the public API.
# --------------------------------------------------------------------------


def _gather_impl(pool, ids, layer, *, layout, per_layer, backend, tuning):
    """pool [L, P, *row], ids int32 [nb] (padded with P), layer int32 [1] →
    staging with nb pages (see module docstring)."""
    if backend == Backend.XLA:
        return paged_gather_reference(
            pool, ids, layout=layout, layer=layer[0] if per_layer else None
        )
    return _pallas_paged_copy(
        pool,
        ids,
        layer,
        None,
        layout=layout,
        per_layer=per_layer,
        interpret=backend == Backend.INTERPRET,
        tuning=tuning,
    )


def _paged_scatter_xla(pool, ids, staging, *, layout, layer):
    """The XLA backend's scatter: one ``dynamic_update_slice`` per page in a loop.

    Same result as ``paged_scatter_reference`` (ids outside ``[0, P)`` and an
    out-of-range ``layer`` write nothing), but in place on a donated pool and with
    no transposed copy of the staging: XLA's scatter op normalises its updates
    page-first and copies them, which on CPU runs at a fraction of memcpy speed,
    while this loop moves each page row once.
    """
    num_layers, num_pages = pool.shape[:2]
    ids = jnp.asarray(ids, jnp.int32)
    staging = staging.astype(pool.dtype)
    zeros = (0,) * (pool.ndim - 2)

    def page(j):
        if layer is not None:  # staging [nb, *row] -> [1, 1, *row]
            return jax.lax.dynamic_index_in_dim(staging, j, 0, keepdims=False)[None, None]
        if layout == Layout.LAYER_FIRST:  # staging [L, nb, *row]
            return jax.lax.dynamic_slice_in_dim(staging, j, 1, axis=1)
        return jax.lax.dynamic_index_in_dim(staging, j, 0, keepdims=False)[:, None]

    def body(j, pool):
        pid = ids[j]
        ok = (pid >= 0) & (pid < num_pages)
        lyr = jnp.int32(0)
        if layer is not None:
            lyr = jnp.asarray(layer, jnp.int32)
            ok &= (lyr >= 0) & (lyr < num_layers)

        def write(pool):
            return jax.lax.dynamic_update_slice(pool, page(j), (lyr, pid, *zeros))

        return jax.lax.cond(ok, write, lambda p: p, pool)

    return jax.lax.fori_loop(0, ids.shape[0], body, pool)


def _scatter_impl(pool, ids, layer, staging, *, layout, per_layer, backend, tuning):
    """pool [L, P, *row], ids int32 [nb] (padded with P), layer int32 [1],
    staging with nb pages → updated pool [L, P, *row]."""
    if backend == Backend.XLA:
        return _paged_scatter_xla(
            pool, ids, staging, layout=layout, layer=layer[0] if per_layer else None
        )
    return _pallas_paged_copy(
        pool,
        ids,
        layer,
        staging,
        layout=layout,
        per_layer=per_layer,
        interpret=backend == Backend.INTERPRET,
        tuning=tuning,
    )


_STATIC = ("layout", "per_layer", "backend", "tuning")
_gather_jit = jax.jit(_gather_impl, static_argnames=_STATIC)
_scatter_jit = jax.jit(_scatter_impl, static_argnames=_STATIC)
_scatter_donated_jit = jax.jit(_scatter_impl, static_argnames=_STATIC, donate_argnums=(0,))


def _resolve(backend, tuning, layout):
    backend = default_backend() if backend is None else Backend(backend)
    tuning = PagedCopyTuning() if tuning is None else tuning
    if not isinstance(tuning, PagedCopyTuning):
        raise ValueError(f"tuning must be a PagedCopyTuning, got {tuning!r}")
    return backend, tuning, Layout(layout)


def _check_pool(pool) -> tuple[int, int, tuple[int, ...]]:
    if pool.ndim < 2:
        raise ValueError(f"pool must be [layers, pages, *row], got shape {pool.shape}")
    num_layers, num_pages, *row = pool.shape
    return num_layers, num_pages, tuple(row)


def _layer_operand(layer, num_layers: int) -> jax.Array:
    if layer is None:
        return jnp.zeros((1,), jnp.int32)
    if _is_concrete(layer):
        lyr = np.asarray(layer)
        if lyr.ndim != 0 or not np.issubdtype(lyr.dtype, np.integer) or isinstance(layer, bool):
            raise ValueError(f"layer must be an integer scalar, got {layer!r}")
        if not 0 <= int(lyr) < num_layers:
            raise ValueError(f"layer={int(lyr)} out of range [0, {num_layers})")
        return jnp.asarray([int(lyr)], jnp.int32)
    return jnp.reshape(layer, (1,)).astype(jnp.int32)


def _padded_ids(page_ids, num_pages: int, *, unique: bool) -> tuple[jax.Array, int, int]:
    """Validates (when concrete) and pads ids with the sentinel ``num_pages``."""
    if _is_concrete(page_ids):
        ids = validate_page_ids(page_ids, num_pages, unique=unique)
        n = ids.shape[0]
        nb = bucket_size(n)
        ids = np.concatenate([ids, np.full((nb - n,), num_pages, np.int32)])
        return jnp.asarray(ids), n, nb
    if page_ids.ndim != 1:
        raise ValueError(f"page_ids must be 1-D, got shape {page_ids.shape}")
    n = page_ids.shape[0]
    nb = bucket_size(n)
    pad = jnp.full((nb - n,), num_pages, jnp.int32)
    return jnp.concatenate([page_ids.astype(jnp.int32), pad]), n, nb


def _page_axis_is_1(layout: Layout, per_layer: bool) -> bool:
    return layout == Layout.LAYER_FIRST and not per_layer


def _staging_shape(num_layers, count, row, layout, per_layer) -> tuple[int, ...]:
    if per_layer:
        return (count, *row)
    if layout == Layout.PAGE_FIRST:
        return (count, num_layers, *row)
    return (num_layers, count, *row)


def paged_gather(
    pool: jax.Array,
    page_ids: Sequence[int] | np.ndarray | jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
    backend: Backend | None = None,
    tuning: PagedCopyTuning | None = None,
) -> jax.Array:
    """Gathers pages of ``pool`` into a contiguous staging buffer.

    Args:
      pool: ``[L, P, *row]``, one PP stage's stacked sub-pool.
      page_ids: int ``[n]``, any order, duplicates allowed; validated on the host
        when concrete (``ValueError`` for ids outside ``[0, P)``). Traced ids
        (inside a caller's jit) are not validated: an id outside ``[0, P)``, e.g.
        the padding sentinel ``P``, is skipped and its staging row is
        unspecified (zeros on ``XLA``, untouched memory on the Pallas backends).
      layout: staging layout (``PAGE_FIRST`` ``[n, L, *row]`` or ``LAYER_FIRST``
        ``[L, n, *row]``).
      layer: if given (int in ``[0, L)`` or a traced int32 scalar), gather only
        that layer: ``[n, *row]``. The layer is a dynamic operand (one compile
        serves all layers). A traced layer outside ``[0, L)`` gives unspecified
        rows.
      backend: ``None`` → ``default_backend()``.
      tuning: Pallas launch parameters (``PagedCopyTuning()`` by default).

    Returns:
      The staging buffer with exactly ``n`` pages, dtype of ``pool``.
    """
    backend, tuning, layout = _resolve(backend, tuning, layout)
    num_layers, num_pages, row = _check_pool(pool)
    per_layer = layer is not None
    layer_arr = _layer_operand(layer, num_layers)
    ids, n, _ = _padded_ids(page_ids, num_pages, unique=False)
    if n == 0:
        return jnp.zeros(_staging_shape(num_layers, 0, row, layout, per_layer), pool.dtype)
    out = _gather_jit(
        pool, ids, layer_arr, layout=layout, per_layer=per_layer, backend=backend, tuning=tuning
    )
    if n == out.shape[1 if _page_axis_is_1(layout, per_layer) else 0]:
        return out
    if _page_axis_is_1(layout, per_layer):
        return out[:, :n]
    return out[:n]


def _scatter(jitted, pool, page_ids, staging, *, layout, layer, backend, tuning) -> jax.Array:
    backend, tuning, layout = _resolve(backend, tuning, layout)
    num_layers, num_pages, row = _check_pool(pool)
    per_layer = layer is not None
    layer_arr = _layer_operand(layer, num_layers)
    ids, n, nb = _padded_ids(page_ids, num_pages, unique=True)
    page_axis = 1 if _page_axis_is_1(layout, per_layer) else 0
    want = _staging_shape(num_layers, n, row, layout, per_layer)
    want_b = _staging_shape(num_layers, nb, row, layout, per_layer)
    if staging.dtype != pool.dtype:
        raise ValueError(f"staging dtype {staging.dtype} != pool dtype {pool.dtype}")
    if tuple(staging.shape) not in (want, want_b):
        raise ValueError(
            f"staging shape {tuple(staging.shape)} does not match {want} "
            f"(or the bucket-padded {want_b}) for layout={layout.name}, layer={layer}"
        )
    if n == 0:
        return pool
    if staging.shape[page_axis] != nb:
        pad = [(0, 0)] * staging.ndim
        pad[page_axis] = (0, nb - n)
        staging = jnp.pad(staging, pad)  # Rows of sentinel ids: never written.
    return jitted(
        pool,
        ids,
        layer_arr,
        staging,
        layout=layout,
        per_layer=per_layer,
        backend=backend,
        tuning=tuning,
    )


def paged_scatter(
    pool: jax.Array,
    page_ids: Sequence[int] | np.ndarray | jax.Array,
    staging: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
    backend: Backend | None = None,
    tuning: PagedCopyTuning | None = None,
) -> jax.Array:
    """Writes ``staging`` into pages ``page_ids`` of ``pool``; returns the new pool.

    Args:
      pool: ``[L, P, *row]``.
      page_ids: int ``[n]``, unique, in ``[0, P)`` (``ValueError`` otherwise, when
        concrete). Traced ids are not validated: ids outside ``[0, P)`` (e.g.
        the sentinel ``P``) are skipped; traced duplicates are undefined.
      staging: the gather's output shape for the same ``layout``/``layer``, with
        ``n`` pages or already ``bucket_size(n)`` pages (rows past ``n`` are
        ignored; passing the bucket size avoids a padding copy and a per-``n``
        compile of that copy).
      layout, layer, backend, tuning: as in ``paged_gather``; a traced layer
        outside ``[0, L)`` writes nothing.

    Returns:
      ``[L, P, *row]``: ``pool`` with those pages replaced; every other page keeps
      its bytes. Does not donate ``pool`` (XLA copies it before the in-place
      kernel); use ``paged_scatter_donated`` or call inside your own ``jax.jit``
      with ``donate_argnums`` on the pool to update it in place.
    """
    return _scatter(
        _scatter_jit,
        pool,
        page_ids,
        staging,
        layout=layout,
        layer=layer,
        backend=backend,
        tuning=tuning,
    )


def paged_scatter_donated(
    pool: jax.Array,
    page_ids: Sequence[int] | np.ndarray | jax.Array,
    staging: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
    backend: Backend | None = None,
    tuning: PagedCopyTuning | None = None,
) -> jax.Array:
    """``paged_scatter`` through a jit that donates ``pool`` (``donate_argnums=0``).

    The Pallas kernel aliases the pool to its output, so with donation the pages
    are written into the existing buffer: no pool copy. ``pool`` is invalidated;
    use the returned array.
    """
    return _scatter(
        _scatter_donated_jit,
        pool,
        page_ids,
        staging,
        layout=layout,
        layer=layer,
        backend=backend,
        tuning=tuning,
    )
