"""What the paged gather and scatter share: types, tuning, id checks, kernel plumbing.

The paged copies (``paged_gather.py``, ``paged_scatter.py``) move KV pages between
one pipeline stage's stacked sub-pool and a contiguous device staging buffer; the
staging buffer is what crosses the host<->device link in one XLA transfer (no
Pallas GPU backend can address host memory, see DESIGN.md §6).

Shapes (``L`` layers, ``P`` pages in the pool, ``n`` page ids, ``row`` any
trailing shape, e.g. ``(16, 32)`` float32, ``(149760,)`` uint8 fp8 byte rows or
``(2, 16, 4, 64)`` bf16 MHA K/V)::

  pool      [L, P, *row]
  page_ids  int32 [n]
  staging   [n, L, *row]   Layout.PAGE_FIRST   (default)
            [L, n, *row]   Layout.LAYER_FIRST
            [n, *row]      per-layer variant (``layer=<int>``), either layout

Backends:

* ``Backend.XLA``: plain ``jnp``, the production CPU path (see each module).
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
load/store of a sentinel page and the XLA scatter skips it, so padding never
reads or writes a live page. Gather slices the result back to exactly ``n``
pages.

Page ids are validated on the host (numpy) whenever they are concrete: interpret
mode silently clamps out-of-range ids and resolves duplicates last-wins, and a
GPU does neither predictably.

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
import math
from typing import Any, NamedTuple

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
    """The paged-copy backend used when a call passes ``backend=None``.

    Returns:
      ``TRITON`` when jax's default backend is a GPU, else ``XLA``.
    """
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

    Raises:
      ValueError: a field of the wrong type or out of its range (named).
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
    """The padded page count of a transfer of ``n`` pages (one compile per bucket).

    Args:
      n: the page count.

    Returns:
      The next power of two ``>= n``, at least 1.

    Raises:
      ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"bucket_size: n={n} is negative")
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_page_ids(page_ids: Any, num_pages: int, *, unique: bool) -> np.ndarray:
    """Host-side check of concrete page ids (traced ids cannot be checked; callers
    skip them).

    Args:
      page_ids: the ids, any array-like.
      num_pages: the pool's page count; ids must lie in ``[0, num_pages)``.
      unique: also refuse a repeated id (a scatter with duplicate ids has no
        defined result).

    Returns:
      The ids as an int32 numpy ``[n]``.

    Raises:
      ValueError: ``page_ids`` is not 1-D or not integer, an id is out of range,
        or (``unique``) an id repeats; the message names the offending ids.
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


def _skip_invalid(page_ids: jax.Array, num_pages: int) -> jax.Array:
    """Maps negative ids to the sentinel ``num_pages`` (jnp would wrap them)."""
    return jnp.where(page_ids < 0, num_pages, page_ids)


# --------------------------------------------------------------------------
# Argument handling of the public wrappers (host side, before the jit).
# --------------------------------------------------------------------------

# Static arguments of the jitted ``_gather_impl`` / ``_scatter_impl``.
_STATIC = ("layout", "per_layer", "backend", "tuning")


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


# --------------------------------------------------------------------------
# Word packing: the dtype the Pallas kernels copy, and the reinterpretation.
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Pallas plumbing shared by the gather and scatter kernels.
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


class _Launch(NamedTuple):
    """One paged-copy launch: the pool as kernel words and the grid over it.

    kpool [L, P, K] of ``word`` (``K`` words per row); stage_shape the staging
    buffer in words, ``[nb, L, K]`` / ``[L, nb, K]`` / ``[nb, K]`` (per layer);
    row_elems ``R``, the pool's elements per row; static the kernel's keyword
    arguments (``num_layers``, ``num_pages``, ``row_elems=K``, ``chunk``,
    ``layout``, ``per_layer``).
    """

    kpool: jax.Array
    word: np.dtype
    row_elems: int
    grid: tuple[int, ...]
    stage_shape: tuple[int, ...]
    static: dict[str, Any]
    compiler_params: pltriton.CompilerParams


def _plan_launch(
    pool: jax.Array, nb: int, *, layout: Layout, per_layer: bool, tuning: PagedCopyTuning
) -> _Launch:
    """Reinterprets ``pool [L, P, *row]`` as kernel words and tiles ``nb`` pages."""
    num_layers, num_pages = pool.shape[:2]
    row = tuple(pool.shape[2:])
    if jnp.issubdtype(pool.dtype, jnp.complexfloating):
        raise ValueError(f"pool dtype {pool.dtype} unsupported by the Pallas backends; use XLA")
    row_elems = math.prod(row)
    word = _kernel_word(
        np.dtype(pool.dtype), row_elems, pool.size * pool.dtype.itemsize, tuning.pack_words
    )
    kpool = _to_words(pool.reshape(num_layers, num_pages, row_elems), word)
    kelems = kpool.shape[-1]
    chunk = min(tuning.chunk_elems, pl.next_power_of_2(kelems))
    num_chunks = pl.cdiv(kelems, chunk)
    grid: tuple[int, ...]
    stage_shape: tuple[int, ...]
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
    return _Launch(kpool, word, row_elems, grid, stage_shape, static, compiler_params)
