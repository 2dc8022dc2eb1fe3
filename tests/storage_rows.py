"""Test helper: the bytes of host pages that an L3 object stores (SWA space: the window rows)."""

from __future__ import annotations

import numpy as np

from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PageSpace
from jaxhicache.storage import Namespace, plan_units
from jaxhicache.storage.layout import StagePages


def stored_bytes(h: HostPools, rank: int, space: PageSpace, ids) -> np.ndarray:
    """uint8 ``[len(ids), payload]``: page by page, what an object of ``space`` holds,
    read from stage ``rank``'s slabs (any slab layout) in payload order."""
    m = h.layer_maps[rank]
    units = plan_units(h.spec, m, Namespace.for_stage(h.spec, m), space)
    pages = StagePages(h, rank, units)
    parts = [np.zeros((len(ids), 0), np.uint8)]
    for u in units:
        for p in u.parts:
            rows = [np.ascontiguousarray(pages.view(p, int(i))).view(np.uint8).ravel() for i in ids]
            parts.append(np.stack(rows) if rows else np.zeros((0, p.nbytes), np.uint8))
    return np.concatenate(parts, axis=1)
