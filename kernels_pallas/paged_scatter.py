"""Paged scatter: a contiguous staging buffer into pages of a KV pool.

Shapes (``L`` layers, ``P`` pool pages, ``n`` page ids, ``row`` any trailing
shape; see ``common.py`` for backends, bucketing and dtypes)::

  pool      [L, P, *row]
  page_ids  int32 [n]      unique
  staging   [n, L, *row]   Layout.PAGE_FIRST   (default)
            [L, n, *row]   Layout.LAYER_FIRST
            [n, *row]      ``layer=<int>``, either layout
            (or the same with ``bucket_size(n)`` pages)
  out       [L, P, *row]   ``pool`` with those pages replaced

``Backend.XLA`` runs ``_paged_scatter_xla``, an in-place loop of per-page
``dynamic_update_slice`` (no transposed staging copy), checked against
``paged_scatter_reference`` (``.at[].set``), the test oracle. The Pallas backends
run ``_scatter_kernel`` over a ``(page, layer, chunk)`` grid (``(page, chunk)``
per layer).

In-place scatter: the Pallas scatter aliases the pool to its output
(``input_output_aliases``). The aliasing only avoids a full pool copy when the
caller's ``jax.jit`` donates the pool (``donate_argnums``); ``paged_scatter``
itself does not donate (the caller's pool stays valid, XLA copies it), while
``paged_scatter_donated`` is the jitted, donating variant that updates the pool
buffer in place and invalidates the argument.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.common import (
    _STATIC,
    Backend,
    Layout,
    PagedCopyTuning,
    _check_pool,
    _from_words,
    _layer_operand,
    _padded_ids,
    _page_axis_is_1,
    _plan_launch,
    _program_coords,
    _resolve,
    _skip_invalid,
    _staging_shape,
    _to_words,
)

__all__ = ["paged_scatter", "paged_scatter_donated", "paged_scatter_reference"]


def paged_scatter_reference(
    pool: jax.Array,
    page_ids: jax.Array,
    staging: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
) -> jax.Array:
    """Plain-``jnp`` scatter, the reference the kernels are tested against.

    Args:
      pool: ``[L, P, *row]``.
      page_ids: int ``[n]``, not validated: ids outside ``[0, P)`` (the bucket
        padding sentinel ``P``) are dropped; duplicates: last write wins in XLA.
      staging: shaped as :func:`paged_gather_reference`'s output for the same
        ``layout`` / ``layer``; cast to the pool's dtype.
      layout: staging layout.
      layer: if given, write only that layer (one outside ``[0, L)`` writes
        nothing).

    Returns:
      ``pool`` with those pages replaced; other pages keep their bytes.
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
    """Inverse of ``paged_gather._gather_kernel``; ``pool_ref`` aliases ``pool_in_ref``.

    ids_ref [nb] int32, layer_ref [1] int32, staging_ref [nb, L, R] / [L, nb, R] /
    [nb, R] (per-layer), pool_in_ref and pool_ref [L, P, R].
    """
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


def _pallas_scatter(
    pool: jax.Array,
    ids: jax.Array,
    layer: jax.Array,
    staging: jax.Array,
    *,
    layout: Layout,
    per_layer: bool,
    interpret: bool,
    tuning: PagedCopyTuning,
) -> jax.Array:
    """Runs ``_scatter_kernel``. pool [L, P, *row]; ids int32 [nb]; layer int32
    [1]; staging with nb pages → updated pool [L, P, *row]."""
    launch = _plan_launch(pool, ids.shape[0], layout=layout, per_layer=per_layer, tuning=tuning)
    kstaging = _to_words(staging.reshape(*launch.stage_shape[:-1], launch.row_elems), launch.word)
    out = pl.pallas_call(
        functools.partial(_scatter_kernel, **launch.static),
        grid=launch.grid,
        out_shape=jax.ShapeDtypeStruct(launch.kpool.shape, launch.word),
        input_output_aliases={3: 0},
        compiler_params=launch.compiler_params,
        interpret=interpret,
        name="paged_scatter",
    )(ids, layer, kstaging, launch.kpool)
    return _from_words(out, np.dtype(pool.dtype)).reshape(pool.shape)


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
    return _pallas_scatter(
        pool,
        ids,
        layer,
        staging,
        layout=layout,
        per_layer=per_layer,
        interpret=backend == Backend.INTERPRET,
        tuning=tuning,
    )


_scatter_jit = jax.jit(_scatter_impl, static_argnames=_STATIC)
_scatter_donated_jit = jax.jit(_scatter_impl, static_argnames=_STATIC, donate_argnums=(0,))


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

    Raises:
      ValueError: as :func:`~kernels_pallas.paged_gather` raises it, a repeated
        concrete id, or ``staging`` of the wrong dtype or shape.
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
    """:func:`paged_scatter` through a jit that donates ``pool`` (``donate_argnums=0``).

    The Pallas kernel aliases the pool to its output, so with donation the pages
    are written into the existing buffer: no pool copy.

    Args:
      pool: ``[L, P, *row]``; invalidated by the call (use the returned array).
      page_ids, staging, layout, layer, backend, tuning: as in :func:`paged_scatter`.

    Returns:
      The updated pool, in ``pool``'s buffer.

    Raises:
      ValueError: as :func:`paged_scatter` raises it.
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
