"""Test-side prefix restore for the tiny model: copy a cached prefix between page tables.

This is what a cache hit must reproduce (``DSV4_MODEL.md`` §3.6): for a restore
at a page boundary ``P = m * page``,

* the full-page-space pools (``C4_KV``, ``C4_INDEXER``, ``C128_KV``) need every
  page ``< m`` (hit policy *all pages*);
* the SWA-space pools (``SWA_KV``, ``C4_STATE``, ``C4_INDEXER_STATE``) need only
  the trailing ``ceil((W-1)/page)`` pages before ``P`` (hit policy *trailing
  pages*); older SWA pages are tombstones (``-1``) in the new page table;
* nothing request-scoped (the HCA partial window is empty at ``P``).

Works on any pool layout whose page axis sits right before the row axes:
``[layers, pages, *row]`` (streaming state) or ``[pp, layers, pages, *row]``
(:class:`~jaxhicache.pools.device.DevicePools` arrays).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind


def page_axis(spec: ModelCacheSpec, kind: PoolKind, array) -> int:
    return array.ndim - 1 - len(spec.row_shape(kind))


def copy_pages(spec: ModelCacheSpec, kind: PoolKind, array, src, dst):
    """A new array: ``array`` with pages ``dst`` overwritten by pages ``src`` (all layers/stages).

    Done on the host (test helper); the result keeps ``array``'s sharding.
    """
    src, dst = np.asarray(src, np.int32), np.asarray(dst, np.int32)
    host = np.array(array)
    ax = page_axis(spec, kind, host)
    index = (slice(None),) * ax
    host[(*index, dst)] = host[(*index, src)]
    return jax.device_put(host, array.sharding)


def restore_tables(spec: ModelCacheSpec, prefix_len: int, dst_full, dst_swa):
    """The new request's page tables: SWA pages before the trailing window are tombstoned."""
    if prefix_len % spec.page_size:
        raise ValueError(f"restore point {prefix_len} is not a multiple of page {spec.page_size}")
    m = prefix_len // spec.page_size
    swa = np.asarray(dst_swa, np.int32).copy()
    swa[: max(0, m - spec.swa_trailing_pages)] = -1
    return np.asarray(dst_full, np.int32), swa


def restore_prefix(
    spec: ModelCacheSpec,
    arrays: dict,
    prefix_len: int,
    src_full,
    src_swa,
    dst_full,
    dst_swa,
    skip: dict | None = None,
):
    """Copy the cached prefix ``[0, prefix_len)`` of a request into new pages.

    ``arrays``: ``{kind: pool array}``; ``src_*``/``dst_*``: the two requests'
    page tables.  ``skip`` (negative controls): ``{kind: [page indices]}`` of
    table positions not to copy.  Returns the new arrays and the new request's
    page tables ``(full, swa)`` (with tombstones).
    """
    m = prefix_len // spec.page_size
    full_t, swa_t = restore_tables(spec, prefix_len, dst_full, dst_swa)
    out = dict(arrays)
    for kind in spec.kinds():
        if kind.page_space is PageSpace.FULL:
            pages = list(range(m))
            src, dst = np.asarray(src_full), full_t
        else:
            pages = list(range(max(0, m - spec.swa_trailing_pages), m))
            src, dst = np.asarray(src_swa), np.asarray(dst_swa)
        pages = [i for i in pages if i not in (skip or {}).get(kind, ())]
        out[kind] = copy_pages(spec, kind, out[kind], src[pages], dst[pages])
    return out, (full_t, swa_t)
