"""Recurrent-state snapshots at node ends: the tree's third component, beside FULL and SWA.

A hybrid model's linear-attention layers keep one fixed-size state per sequence,
valid only at the exact position it was taken. The tree keeps such snapshots at
node ends, as slot ids of a separate id space (``PageSpace.STATE``): ``state_dev``
on device and ``state_host`` on host, ``-1`` for none. Rules (checked by
:meth:`Snapshots.check`):

* a snapshot lives at a node end on the grid (``end % grid == 0`` pages); a split
  leaves the upper part without one (a tombstone), so splitting never moves one;
* a device snapshot needs the node's device KV, a host one its host KV: evicting a
  node's KV from a tier takes its snapshot of that tier with it (a demoted node keeps
  its host snapshot and stays matchable from host), and a node that leaves the tree
  takes both;
* evicting a snapshot takes nothing else: snapshots have their own capacity and LRU
  (``state_access``, stamped only on the node a match used, never along its path);
* a match stops at the deepest node of its path holding a snapshot on device or host
  (:meth:`Snapshots.usable_end`); the KV of a longer match stays in the tree;
* requests never write a snapshot slot they matched (copy-on-write: the cache gives
  each request its own slots), and a locked node keeps its snapshots: the request
  that matched it may not have read them yet, and an in-flight backup may be
  copying them.

Nothing is freed here: every dropped slot is returned to the caller.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import final

import numpy as np

from jaxhicache.tree.arrays import ids
from jaxhicache.tree.node import TreeNode

__all__ = ["Snapshots"]


@final
class Snapshots:
    """The snapshot component of one tree (see module docstring).

    Args:
      grid: pages between two possible snapshot positions (``state_interval /
        page_size``).

    Raises:
      ValueError: ``grid`` < 1.
    """

    __slots__ = ("dev", "grid", "host")

    def __init__(self, grid: int):
        if grid < 1:
            raise ValueError(f"the snapshot grid must be >= 1 page, got {grid}")
        self.grid = grid
        self.dev: set[TreeNode] = set()  # nodes with a device snapshot
        self.host: set[TreeNode] = set()  # nodes with a host snapshot

    # ------------------------------------------------------------------ match
    def usable_end(self, path: list[TreeNode], pages: int) -> int:
        """Where a match of ``pages`` KV pages along ``path`` may end.

        Args:
          path: the matched nodes, root first.
          pages: the KV match, in pages (a node end on ``path``, or beyond it).

        Returns:
          The end (in pages) of the deepest node of ``path`` ending at or before
          ``pages`` that holds a snapshot on device or host; 0 if none does.
        """
        for n in reversed(path):
            e = n.start + n.num_pages
            if e <= pages and (n.state_dev >= 0 or n.state_host >= 0):
                return e
        return 0

    # ------------------------------------------------------------------ values
    def set_device(self, n: TreeNode, slot: int) -> int:
        """Give ``n`` a device snapshot.

        Args:
          n: a node on device whose end is on the grid.
          slot: the device snapshot slot (the caller's; the tree owns it if kept).

        Returns:
          ``-1`` if kept; ``slot`` itself if ``n`` already has a device snapshot
          (the caller frees it).

        Raises:
          ValueError: ``slot`` < 0, ``n`` not on device, or its end off the grid.
        """
        self._check(n, slot, on_device=True)
        if n.state_dev >= 0:
            return slot
        n.state_dev = slot
        self.dev.add(n)
        return -1

    def set_host(self, n: TreeNode, slot: int) -> int:
        """Give ``n`` a host snapshot (a backup of its device one landed).

        Args:
          n: a node with host KV whose end is on the grid.
          slot: the host snapshot slot.

        Returns:
          ``-1`` if kept; ``slot`` itself if ``n`` already has a host snapshot.

        Raises:
          ValueError: ``slot`` < 0, ``n`` has no host KV, or its end is off the grid.
        """
        self._check(n, slot, on_device=False)
        if n.state_host >= 0:
            return slot
        n.state_host = slot
        self.host.add(n)
        return -1

    def clear_device(self, n: TreeNode, out: list[int]) -> None:
        """Drop ``n``'s device snapshot, if any, appending its slot to ``out``.

        Args:
          n: a node.
          out: collects freed slots.
        """
        if n.state_dev >= 0:
            out.append(n.state_dev)
            n.state_dev = -1
            self.dev.discard(n)

    def clear_host(self, n: TreeNode, out: list[int]) -> None:
        """Drop ``n``'s host snapshot, if any, appending its slot to ``out``.

        Args:
          n: a node.
          out: collects freed slots.
        """
        if n.state_host >= 0:
            out.append(n.state_host)
            n.state_host = -1
            self.host.discard(n)

    def _check(self, n: TreeNode, slot: int, *, on_device: bool) -> None:
        if int(slot) != slot or slot < 0:
            raise ValueError(f"a snapshot slot must be an integer >= 0, got {slot!r}")
        if n.parent is None:
            raise ValueError(f"node {n.id} is the root or no longer in the tree")
        tier, value = ("device", n.device_full) if on_device else ("host", n.host_full)
        if value is None:
            raise ValueError(f"node {n.id} has no {tier} KV for a {tier} snapshot to anchor")
        if n.end % self.grid:
            raise ValueError(
                f"node {n.id} ends at page {n.end}, off the snapshot grid of {self.grid} pages"
            )

    # ------------------------------------------------------------------ eviction
    def evict(
        self, num: int, on_device: bool, *, write_back: bool = False
    ) -> tuple[np.ndarray, list[TreeNode]]:
        """Free at least ``num`` snapshots of a tier, LRU, never a node's KV.

        Locked nodes keep theirs. On device, a snapshot without a host copy
        is dropped, or with ``write_back`` reported and kept.

        Args:
          num: snapshots to free.
          on_device: the device tier (else the host tier).
          write_back: report unbacked device snapshots instead of dropping them.

        Returns:
          ``(freed slots, nodes whose device snapshot needs a backup first)``.
        """
        pool = self.dev if on_device else self.host
        heap = [(n.state_access, n) for n in pool if n.lock_ref == 0]
        heapq.heapify(heap)
        out: list[int] = []
        needs: list[TreeNode] = []
        while len(out) < num and heap:
            _, n = heapq.heappop(heap)
            if not on_device:
                self.clear_host(n, out)
            elif n.state_host < 0 and write_back:
                needs.append(n)
            else:
                self.clear_device(n, out)
        return np.asarray(out, np.int32), needs

    # ------------------------------------------------------------------ backup
    def backup_plan(self, path: Iterable[TreeNode]) -> tuple[list[TreeNode], np.ndarray]:
        """The device snapshots of ``path`` that have no host copy yet.

        Args:
          path: nodes (e.g. the path of a backup), root first.

        Returns:
          ``(nodes, their device slots)``, in path order.
        """
        nodes = [n for n in path if n.state_dev >= 0 and n.state_host < 0]
        return nodes, np.asarray([n.state_dev for n in nodes], np.int32)

    def mark_backed_up(self, nodes: list[TreeNode], host_slots) -> np.ndarray:
        """Record host copies of the snapshots of ``nodes`` (a :meth:`backup_plan`).

        A node that left the tree, lost its host KV, or got a host snapshot meanwhile
        does not take its slot.

        Args:
          nodes: the plan's nodes.
          host_slots: one host slot per node, in order.

        Returns:
          The host slots not taken, for the caller to free.

        Raises:
          ValueError: not one slot per node.
        """
        slots = ids(host_slots, "host_slots")
        if slots.size != len(nodes):
            raise ValueError(f"{len(nodes)} snapshots but {slots.size} host slots")
        unused = []
        for n, s in zip(nodes, slots.tolist(), strict=True):
            if n.parent is None or n.host_full is None or self.set_host(n, s) >= 0:
                unused.append(s)
        return np.asarray(unused, np.int32)

    # ------------------------------------------------------------------ invariants
    def check(self, nodes: Iterable[TreeNode]) -> None:
        """Recounts the component over every node of the tree (``AssertionError``).

        Args:
          nodes: every node of the tree, the root included.
        """
        dev, host = set(), set()
        dev_slots: list[int] = []
        host_slots: list[int] = []
        for n in nodes:
            if n.state_dev >= 0:
                assert n.device_full is not None, f"node {n.id}: device snapshot without KV"
                dev.add(n)
                dev_slots.append(n.state_dev)
            if n.state_host >= 0:
                assert n.host_full is not None, f"node {n.id}: host snapshot without KV"
                host.add(n)
                host_slots.append(n.state_host)
            if n.state_dev >= 0 or n.state_host >= 0:
                assert n.parent is not None, "the root holds no snapshot"
                assert n.end % self.grid == 0, f"node {n.id}: snapshot off the grid"
        assert dev == self.dev, "device snapshot set differs from a recount"
        assert host == self.host, "host snapshot set differs from a recount"
        assert len(set(dev_slots)) == len(dev_slots), "a device snapshot slot is held twice"
        assert len(set(host_slots)) == len(host_slots), "a host snapshot slot is held twice"
