"""``StateSlots``: the cache's side of recurrent-state snapshots (hybrid models).

The tree keeps snapshots at node ends (:mod:`jaxhicache.tree.states`); this module
owns the slots around them and the contract with the model's forward::

    admit:   the match ends at a snapshot ──> the request reads it in place (device)
             or from its own slot, loaded in the batch's one H2D move (host); an L3
             hit past the match ends at a snapshot the prefetch put in a host slot:
             loaded the same way, and handed to the tree at the insert covering it;
             a longer KV match marks a branch point to snapshot during the prefill
    plan(request, end) ──> StatePlan(state_in, state_out, snapshots)
             the forward reads state_in and writes its state after ``end`` to
             state_out (never to a slot the tree holds: copy-on-write), and at each
             position p of ``snapshots`` (chunk ends) to snapshots[p]
    computed(request, plan): state_out holds the state at ``end``; positions on the
             grid the request wants (its branch point, the last grid point of
             each forward) wait for the insert that covers them
    insert:  waiting snapshots the inserted pages cover are attached to the tree
    release: the request's own slots are freed

Slots a request owns are counted as held in the ledger until the tree takes them
or they are freed; device slots come from the free list, then from the tree's
snapshot LRU (never its KV). With an L3 tier (:attr:`StateSlots.l3`), host slots
short drop unclaimed prefetches first, and evicting host snapshots first waits for
the L3 writes that read them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, final

import numpy as np

from jaxhicache.cache.ledger import PageLedger
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.spec import PageSpace, Tier

if TYPE_CHECKING:
    from jaxhicache.cache.requests import LoadParts, Request
    from jaxhicache.tree import MatchResult, RadixTree

__all__ = ["StatePlan", "StateSlots"]

_S = PageSpace.STATE


@final
@dataclasses.dataclass(frozen=True)
class StatePlan:
    """The snapshot slots of one forward of one request.

    Attributes:
      start: the position the forward starts at (the request's state position).
      end: the position after the forward's last token.
      state_in: the slot holding the state at ``start`` (``-1``: the zero state,
        ``start == 0``); read only.
      state_out: the request's own slot that receives the state at ``end``.
      snapshots: positions strictly inside ``(start, end)`` (chunk ends) whose
        state the forward also writes, to these slots.
    """

    start: int
    end: int
    state_in: int
    state_out: int
    snapshots: dict[int, int]


@final
class StateSlots:
    """Snapshot slots of one cache (see module docstring).

    Args:
      tree: the cache's tree (with its snapshot component).
      ledger: the cache's ledger (device and host ``STATE`` allocators).
      interval: tokens between snapshot positions.
    """

    def __init__(self, tree: RadixTree, ledger: PageLedger, interval: int):
        assert tree.states is not None
        self._tree = tree
        self._ledger = ledger
        self.interval = interval
        self.l3: Any = None  # the cache's StorageTier, if any (set once both are built)

    # ------------------------------------------------------------------ slots
    def alloc(self, tier: Tier, n: int) -> np.ndarray:
        """``n`` free slots of ``tier``, evicting the tree's LRU snapshots if needed.

        Args:
          tier: ``Tier.DEVICE`` or ``Tier.HOST``.
          n: slots wanted.

        Returns:
          The slots (the caller owns them).

        Raises:
          OutOfPages: fewer than ``n`` even after evicting every unlocked snapshot.
        """
        a = self._ledger[tier, _S]
        if n > a.num_free and tier is Tier.HOST and self.l3 is not None:
            self.l3.drop_landed()  # prefetched snapshots nobody claimed
        if n > a.num_free:
            self.evict(tier, n - a.num_free)
        if a.num_free < n:
            raise OutOfPages(a.name, n, a.num_free)
        return self._ledger.alloc(tier, _S, n)

    def evict(self, tier: Tier, n: int) -> int:
        """Frees up to ``n`` of the tree's snapshots of ``tier`` (LRU; locked nodes keep
        theirs; their KV always stays).

        Args:
          tier: ``Tier.DEVICE`` or ``Tier.HOST``.
          n: snapshots to free.

        Returns:
          Snapshots freed.
        """
        assert self._tree.states is not None
        freed, _ = self._tree.states.evict(n, tier is Tier.DEVICE)
        if tier is Tier.HOST and self.l3 is not None:
            self.l3.finish_writes({_S: freed})  # the writes reading these snapshot slots
        self._ledger.free(tier, _S, freed)
        return int(freed.size)

    def _own(self, req: Request, n: int) -> list[int]:
        slots = self.alloc(Tier.DEVICE, n).tolist()
        self._ledger.hold(_S, n)
        req.state_owned.extend(slots)
        return slots

    def _disown(self, req: Request, slot: int, *, free: bool) -> None:
        req.state_owned.remove(slot)
        self._ledger.unhold(_S, 1)
        if free:
            self._ledger.free(Tier.DEVICE, _S, [slot])

    # ------------------------------------------------------------------ admission
    def admit(
        self,
        req: Request,
        m: MatchResult,
        parts: LoadParts,
        slot: int,
        l3_slot: int = -1,
        l3_pos: int = 0,
    ) -> None:
        """Where a new request's state comes from (its prefix ends at a snapshot).

        Args:
          req: the request, admitted at ``m``'s end (or at ``l3_pos``).
          m: its match.
          parts: the batch's loads (a host snapshot joins them).
          slot: a device slot from :meth:`alloc` for a host snapshot (``-1``: none
            needed: the match has a device snapshot or none).
          l3_slot: the host slot of the snapshot an L3 hit past the match fetched
            (``-1``: none); it wins over the match's.
          l3_pos: that hit's end (tokens), where the request's state is then.
        """
        req.state_pos = m.matched_len
        if l3_slot >= 0:  # as a host snapshot, and the tree gets it at insert
            assert slot >= 0, "admission allocates the slot an L3 snapshot loads into"
            self._ledger.hold(_S, 1)
            req.state_owned.append(slot)
            parts.state_device.append(np.array([slot], np.int32))
            parts.state_host.append(np.array([l3_slot], np.int32))
            req.state_read, req.state_pos = slot, l3_pos
            req.pending_states[l3_pos] = slot
        elif m.state_device_slot >= 0:
            req.state_read = m.state_device_slot  # the tree's: read in place, never written
        elif m.state_host_slot >= 0:
            assert slot >= 0, "admission allocates the slot a host snapshot loads into"
            self._ledger.hold(_S, 1)
            req.state_owned.append(slot)
            parts.state_device.append(np.array([slot], np.int32))
            parts.state_host.append(np.array([m.state_host_slot], np.int32))
            req.state_read = slot
        branch = m.full_match_len // self.interval * self.interval
        req.snapshot_at = branch if branch > req.state_pos else 0

    # ------------------------------------------------------------------ forwards
    def plan(self, req: Request, end: int, chunk: int | None = None) -> StatePlan:
        """The slots of the request's next forward, over positions ``[state_pos, end)``.

        Args:
          req: an open request.
          end: the position after the forward's last token.
          chunk: the forward's chunk length (snapshots inside the forward only at
            chunk ends; ``None``: none inside).

        Returns:
          The plan; pass its slots to the model, then call :meth:`computed`.

        Raises:
          ValueError: ``end`` not after the request's state position.
          OutOfPages: no free device slot.
        """
        start = req.state_pos
        if end <= start:
            raise ValueError(f"a forward must end after position {start}, got end={end}")
        g = self.interval
        wanted = {p for p in (req.snapshot_at, (end - 1) // g * g) if start < p < end}
        if chunk:
            wanted = {p for p in wanted if (p - start) % chunk == 0}
        in_place = (  # the request's own state, not waiting to be a snapshot
            req.state_read in req.state_owned
            and req.state_read not in req.pending_states.values()
            and end % g != 0
        )
        n_new = len(wanted) + (0 if in_place else 1)
        slots = self._own(req, n_new) if n_new else []
        out = req.state_read if in_place else slots.pop()
        return StatePlan(
            start, end, req.state_read, out, dict(zip(sorted(wanted), slots, strict=True))
        )

    def computed(self, req: Request, plan: StatePlan) -> None:
        """Records that ``plan``'s forward ran: its slots hold the states it promised.

        Args:
          req: the request the plan was made for.
          plan: its :meth:`plan`.

        Raises:
          ValueError: a stale plan (the request's state moved since).
        """
        if plan.start != req.state_pos:
            raise ValueError(f"stale state plan: it starts at {plan.start}, the request at "
                             f"{req.state_pos}")  # fmt: skip
        req.pending_states.update(plan.snapshots)
        if plan.end % self.interval == 0:
            req.pending_states[plan.end] = plan.state_out
        old = req.state_read
        pending = set(req.pending_states.values())
        if old in req.state_owned and old != plan.state_out and old not in pending:
            self._disown(req, old, free=True)  # the state it held is superseded
        req.state_read, req.state_pos = plan.state_out, plan.end

    # ------------------------------------------------------------------ insert / release
    def attach(self, req: Request, key: np.ndarray) -> int:
        """Hands the tree the waiting snapshots that the inserted ``key`` covers.

        Args:
          req: the request just inserted.
          key: the page-aligned tokens the tree now holds for it.

        Returns:
          Snapshots the tree took.
        """
        taken = 0
        for pos in sorted(p for p in req.pending_states if p <= key.size):
            slot = req.pending_states.pop(pos)
            _, unused = self._tree.attach_state(key[:pos], slot, salt=req.salt)
            if unused < 0:  # the tree's now (read-only: a later write goes elsewhere)
                self._disown(req, slot, free=False)
                taken += 1
            elif slot != req.state_read:  # a snapshot was already there
                self._disown(req, slot, free=True)
        return taken

    def release(self, req: Request) -> None:
        """Frees every slot the request still owns.

        Args:
          req: a request being released.
        """
        for slot in list(req.state_owned):
            self._disown(req, slot, free=True)
        req.pending_states.clear()
        req.state_read = -1
