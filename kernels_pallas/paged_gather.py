"""Paged gather: pages of a KV pool into a contiguous staging buffer.

Shapes (``L`` layers, ``P`` pool pages, ``n`` page ids, ``row`` any trailing
shape; see ``common.py`` for backends, bucketing and dtypes)::

  pool      [L, P, *row]
  page_ids  int32 [n]      any order, duplicates allowed
  out       [n, L, *row]   Layout.PAGE_FIRST   (default)
            [L, n, *row]   Layout.LAYER_FIRST
            [n, *row]      ``layer=<int>``, either layout

``Backend.XLA`` runs ``paged_gather_reference`` (plain ``jnp.take``); the Pallas
backends run ``_gather_kernel`` over a ``(page, layer, chunk)`` grid
(``(page, chunk)`` per layer) and slice the bucket-padded result back to ``n``
pages.
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
)

__all__ = ["paged_gather", "paged_gather_reference"]


def paged_gather_reference(
    pool: jax.Array,
    page_ids: jax.Array,
    *,
    layout: Layout = Layout.PAGE_FIRST,
    layer: int | jax.Array | None = None,
) -> jax.Array:
    """Plain-``jnp`` gather, the reference the kernels are tested against.

    Args:
      pool: ``[L, P, *row]``.
      page_ids: int ``[n]``, not validated; ids outside ``[0, P)`` (the bucket
        padding sentinel ``P``) read zeros.
      layout: staging layout, as in :func:`paged_gather`.
      layer: if given, gather only that layer.

    Returns:
      ``[n, L, *row]`` (``PAGE_FIRST``), ``[L, n, *row]`` (``LAYER_FIRST``) or
      ``[n, *row]`` (``layer`` given), dtype of ``pool``.
    """
    page_ids = _skip_invalid(jnp.asarray(page_ids, jnp.int32), pool.shape[1])
    if layer is not None:
        return jnp.take(pool[layer], page_ids, axis=0, mode="fill", fill_value=0)
    out = jnp.take(pool, page_ids, axis=1, mode="fill", fill_value=0)  # [L, n, *row]
    return jnp.swapaxes(out, 0, 1) if layout == Layout.PAGE_FIRST else out


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


def _pallas_gather(
    pool: jax.Array,
    ids: jax.Array,
    layer: jax.Array,
    *,
    layout: Layout,
    per_layer: bool,
    interpret: bool,
    tuning: PagedCopyTuning,
) -> jax.Array:
    """Runs ``_gather_kernel``. pool [L, P, *row]; ids int32 [nb]; layer int32 [1]
    → staging with nb pages, dtype of ``pool``."""
    row = tuple(pool.shape[2:])
    launch = _plan_launch(pool, ids.shape[0], layout=layout, per_layer=per_layer, tuning=tuning)
    out = pl.pallas_call(
        functools.partial(_gather_kernel, **launch.static),
        grid=launch.grid,
        out_shape=jax.ShapeDtypeStruct(launch.stage_shape, launch.word),
        compiler_params=launch.compiler_params,
        interpret=interpret,
        name="paged_gather",
    )(ids, layer, launch.kpool)
    out = _from_words(out, np.dtype(pool.dtype))
    return out.reshape(*launch.stage_shape[:-1], *row)


def _gather_impl(pool, ids, layer, *, layout, per_layer, backend, tuning):
    """pool [L, P, *row], ids int32 [nb] (padded with P), layer int32 [1] →
    staging with nb pages (see module docstring)."""
    if backend == Backend.XLA:
        return paged_gather_reference(
            pool, ids, layout=layout, layer=layer[0] if per_layer else None
        )
    return _pallas_gather(
        pool,
        ids,
        layer,
        layout=layout,
        per_layer=per_layer,
        interpret=backend == Backend.INTERPRET,
        tuning=tuning,
    )


_gather_jit = jax.jit(_gather_impl, static_argnames=_STATIC)


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

    Raises:
      ValueError: ``pool`` has fewer than 2 dimensions, ``tuning`` is not a
        :class:`PagedCopyTuning`, ``page_ids`` is not 1-D (or, when concrete, not
        integer or out of range), or a concrete ``layer`` is not an integer in
        ``[0, L)``.
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
