"""``PageLedger``: the page allocators of every tier and page space, and who holds what.

Ownership invariant (checked by :meth:`PageLedger.check` against the tree): every
allocated page is held by exactly one of

* the radix tree (a node's device or host value),
* an admitted request (its own pages, allocated and not yet inserted or freed,
  and the host slots of an L3 prefetch it claimed, until its release),
* an in-flight backup or L3 prefetch (host pages whose copy has not landed or
  been claimed yet).

Six allocators: ``(Tier.DEVICE | Tier.HOST) × (PageSpace.FULL | SWA | STATE)``
(``STATE``: recurrent-state snapshot slots, held by the tree's nodes, by requests
— their read, write and not yet attached snapshot slots — or by in-flight backups).
A model without an SWA or state component still gets a one-id allocator that is
never used, so callers need no special case.
"""

from __future__ import annotations

from typing import final

import numpy as np

from jaxhicache.pools.allocator import PageAllocator
from jaxhicache.spec import PageSpace, Tier

__all__ = ["PageLedger"]


@final
class PageLedger:
    """Allocators per ``(tier, space)`` plus the count of pages held by requests."""

    def __init__(
        self,
        device_pages: int,
        device_swa: int,
        host_pages: int,
        host_swa: int,
        device_states: int = 0,
        host_states: int = 0,
    ):
        self._alloc = {
            (Tier.DEVICE, PageSpace.FULL): PageAllocator(device_pages, "device-full"),
            (Tier.DEVICE, PageSpace.SWA): PageAllocator(max(device_swa, 1), "device-swa"),
            (Tier.HOST, PageSpace.FULL): PageAllocator(host_pages, "host-full"),
            (Tier.HOST, PageSpace.SWA): PageAllocator(max(host_swa, 1), "host-swa"),
            (Tier.DEVICE, PageSpace.STATE): PageAllocator(max(device_states, 1), "device-state"),
            (Tier.HOST, PageSpace.STATE): PageAllocator(max(host_states, 1), "host-state"),
        }
        self._held = dict.fromkeys(PageSpace, 0)  # device pages with requests
        self._held_host = dict.fromkeys(PageSpace, 0)  # L3 slots with requests

    def __getitem__(self, key: tuple[Tier, PageSpace]) -> PageAllocator:
        return self._alloc[key]

    def items(self):
        return self._alloc.items()

    def num_free(self, tier: Tier, space: PageSpace) -> int:
        return self._alloc[tier, space].num_free

    def alloc(self, tier: Tier, space: PageSpace, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, np.int32)
        return self._alloc[tier, space].alloc(n)

    def free(self, tier: Tier, space: PageSpace, ids) -> None:
        """Frees the ``>= 0`` entries of ``ids`` (``-1`` entries are skipped)."""
        ids = np.asarray(ids, np.int32).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self._alloc[tier, space].free(ids)

    # ------------------------------------------------ device pages of requests
    def hold(self, space: PageSpace, n: int) -> None:
        """``n`` device pages of ``space`` go to a request."""
        self._held[space] += n

    def unhold(self, space: PageSpace, n: int) -> None:
        """``n`` device pages leave a request (inserted into the tree or freed)."""
        if n > self._held[space]:
            raise ValueError(
                f"{n} device {space.value} pages leave requests that hold only {self._held[space]}"
            )
        self._held[space] -= n

    def held(self, space: PageSpace) -> int:
        return self._held[space]

    def hold_host(self, space: PageSpace, n: int) -> None:
        """``n`` host slots (an L3 prefetch's) go to a request until its release."""
        self._held_host[space] += n

    def unhold_host(self, space: PageSpace, n: int) -> None:
        if n > self._held_host[space]:
            raise ValueError(
                f"{n} host {space.value} slots leave requests that hold {self._held_host[space]}"
            )
        self._held_host[space] -= n

    # ------------------------------------------------------------------ checks
    def host_is_current(self, space: PageSpace, ids: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """Whether host pages are still allocated at the generation a backup saw."""
        a = self._alloc[Tier.HOST, space]
        return a.is_allocated(ids) & (a.generation(ids) == gens)

    def check(self, tree, in_flight: dict[PageSpace, int]) -> None:
        """Asserts the ownership invariant (see the module docstring)."""
        for a in self._alloc.values():
            assert a.num_free + a.num_used == a.capacity, a
        want = {
            (Tier.DEVICE, PageSpace.FULL): tree.total_device_pages() + self._held[PageSpace.FULL],
            (Tier.DEVICE, PageSpace.SWA): tree.total_device_swa_pages() + self._held[PageSpace.SWA],
            (Tier.HOST, PageSpace.FULL): tree.total_host_pages()
            + in_flight[PageSpace.FULL]
            + self._held_host[PageSpace.FULL],
            (Tier.HOST, PageSpace.SWA): tree.total_host_swa_pages()
            + in_flight[PageSpace.SWA]
            + self._held_host[PageSpace.SWA],
        }
        st = tree.states
        if st is not None:
            want[Tier.DEVICE, PageSpace.STATE] = len(st.dev) + self._held[PageSpace.STATE]
            want[Tier.HOST, PageSpace.STATE] = (
                len(st.host) + in_flight.get(PageSpace.STATE, 0) + self._held_host[PageSpace.STATE]
            )
        for key, n in want.items():
            used = self._alloc[key].num_used
            assert used == n, (
                f"{key[0].value} {key[1].value} pages: {used} allocated, {n} owned by the tree, "
                f"requests and in-flight backups"
            )
