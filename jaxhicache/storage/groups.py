"""Objects that hold several pages: one object per group of ``g`` consecutive pages.

On a store that charges per request (an object store serving requests one after
another, 10-50 ms per request in production), per-page objects make a restore cost
a request per page for the lookup and another for the fetch. A namespace with
``pages_per_object = g > 1`` stores its full-space pages ``g`` to an object: the
group ``[g i, g i + g)`` of a prefix (absolute page indices from the root) is one
object per unit, keyed by the hash of its last page (which chains all ``g`` pages
and everything before them). SWA-space (window) and state-space objects stay one
per page or snapshot: a restore needs them at one end only.

:class:`PageGroups` presents ``n`` groups of host slots as ``n`` pages to
:mod:`~jaxhicache.storage.page_io`: "page" ``i`` is group ``i``, its payload the
payloads of its ``g`` slots in page order (``g`` times a page's bytes per unit).
Everything else (verification, scrubbing a failed group's slots, conditional
deletes) is the per-page code, unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import final

import numpy as np

from jaxhicache.spec import PageSpace, PoolKind

from .layout import StagePages

__all__ = ["GroupUnit", "PageGroups"]


@final
@dataclasses.dataclass(frozen=True)
class GroupUnit:
    """One object of a group: its key unit and its payload bytes (``g`` pages' worth)."""

    unit: PageSpace | PoolKind
    nbytes: int


@final
class PageGroups:
    """:class:`~jaxhicache.storage.layout.StagePages` of groups of ``g`` host slots.

    Args:
      pages: the stage's page views of the space.
      table: ``[n, g]`` host slots, one row per group in page order.
    """

    def __init__(self, pages: StagePages, table: np.ndarray):
        self._pages = pages
        self._table = np.asarray(table).reshape(len(table), -1)
        g = self._table.shape[1]
        self.units = tuple(GroupUnit(u.unit, g * u.nbytes) for u in pages.units)
        self.staged_nbytes = [g * n for n in pages.staged_nbytes]
        self.contiguous = pages.contiguous

    def _slots(self, i: int) -> list[int]:
        return self._table[i].tolist()

    def direct(self, j: int, i: int) -> list[memoryview]:
        """Writable views of unit ``j``'s stored bytes of group ``i``, page by page."""
        return [v for h in self._slots(i) for v in self._pages.direct(j, h)]

    def direct_staged(self, j: int, i: int, staging: memoryview) -> list[memoryview]:
        """:meth:`StagePages.direct_staged` of each page of group ``i``, each with its
        share of ``staging`` (``staged_nbytes[j]`` bytes in all)."""
        n = self._pages.staged_nbytes[j]
        return [
            v
            for t, h in enumerate(self._slots(i))
            for v in self._pages.direct_staged(j, h, staging[t * n : (t + 1) * n])
        ]

    def unstage(self, j: int, i: int, staging: np.ndarray) -> None:
        """Moves each page's share of ``staging`` into its slot (see :meth:`direct_staged`)."""
        n = self._pages.staged_nbytes[j]
        for t, h in enumerate(self._slots(i)):
            self._pages.unstage(j, h, staging[t * n : (t + 1) * n])

    def source(self, j: int, i: int) -> list[memoryview]:
        """Unit ``j``'s payload of group ``i``: its pages' payloads in page order."""
        return [b for h in self._slots(i) for b in self._pages.source(j, h)]

    def write(self, j: int, i: int, payload: memoryview) -> None:
        """Copies a verified payload of unit ``j`` into the slots of group ``i``."""
        n = self._pages.units[j].nbytes
        for t, h in enumerate(self._slots(i)):
            self._pages.write(j, h, payload[t * n : (t + 1) * n])

    def scrub(self, i: int) -> None:
        """Zeroes the stored rows of every slot of group ``i``."""
        for h in self._slots(i):
            self._pages.scrub(h)
