"""Paged radix tree over token ids with FULL and SWA components on device and host.

Pure Python/numpy bookkeeping (the control plane): the tree never allocates or
frees pages itself. Every method that drops a value returns the ids so the
caller (``HiCache``) frees them with its page allocators.

Invariants (all checked by :meth:`RadixTree.check_invariants`, O(tree)):

* keys are whole pages of ``page_size`` tokens, stored as int64 bytes; a node's
  children are keyed by their first page (the root's behind the salt prefix,
  :func:`~jaxhicache.tree.node.child_key`), and ``start`` is the parent's end;
* tenant isolation: every node has its path's ``salt`` (``None`` = unsalted), so
  requests with different salts never share or match a node;
* ``page_hashes``, where computed, are the L3 hash chain of the path
  (:func:`jaxhicache.storage.keys.page_hashes` of the path's tokens and salt) and
  prefix-closed (a node with hashes has a parent with hashes);
* every node holds a device or a host value; device-resident nodes form a
  prefix-closed set (a device node's parent is on device), and so do backed-up
  nodes (DESIGN §7);
* each page id is owned once per space (full / SWA) and tier (device / host);
* ``lock_ref`` = own locks + the children's ``lock_ref``, so locks count along
  the path to the root; locked nodes are never evicted;
* the O(1) counters, the device / host leaf sets and the SWA summaries match a
  recount. The SWA hit and reclaim rules are in :mod:`jaxhicache.tree.window`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import final

import numpy as np

from jaxhicache.spec import Tier
from jaxhicache.tree.arrays import EMPTY, TOK, TOK_BYTES, cat, key_bytes
from jaxhicache.tree.hashes import key_hashes as _key_hashes
from jaxhicache.tree.hashes import path_hashes as _path_hashes
from jaxhicache.tree.hashes import salt_bytes, walk
from jaxhicache.tree.invariants import check_tree
from jaxhicache.tree.node import BackupPlan, EvictResult, InsertResult, MatchResult, TreeNode
from jaxhicache.tree.policy import WritePolicy, _check_write_policy
from jaxhicache.tree.residency import Residency
from jaxhicache.tree.states import Snapshots
from jaxhicache.tree.structure import Structure
from jaxhicache.tree.window import SwaWindows

__all__ = ["RadixTree"]


def _is_device(tier: Tier) -> bool:
    t = tier if isinstance(tier, Tier) else Tier(tier)
    if t is Tier.STORAGE:
        raise ValueError("the radix tree holds device and host pages only, not storage")
    return t is Tier.DEVICE


@final
class RadixTree:
    """Paged radix tree with device/host residency per node (see module docstring).

    Args:
      page_size: tokens per page (>= 1).
      swa_pages: trailing pages covering the sliding window (0: no SWA, full attention).
      write_policy: default for :meth:`evict_device` (``WRITE_BACK`` reports
        unbacked leaves instead of deleting them); otherwise informational.
      state_interval: tokens between recurrent-state snapshot positions (a multiple
        of ``page_size``; 0: no snapshot component). With it, a match ends at a
        node holding a snapshot: :mod:`jaxhicache.tree.states`, reached as
        :attr:`states`.

    Raises:
      ValueError: ``page_size`` not a positive integer, ``swa_pages`` negative or
        not an integer, ``write_policy`` not a :class:`WritePolicy`, or
        ``state_interval`` not a non-negative multiple of ``page_size``.
    """

    def __init__(
        self,
        page_size: int,
        swa_pages: int = 0,
        *,
        write_policy: WritePolicy = WritePolicy.WRITE_THROUGH,
        state_interval: int = 0,
    ):
        if int(page_size) != page_size or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if int(swa_pages) != swa_pages or swa_pages < 0:
            raise ValueError(f"swa_pages must be a non-negative integer, got {swa_pages!r}")
        self.page_size = int(page_size)
        self.swa_pages = int(swa_pages)
        self.write_policy = _check_write_policy(write_policy)
        self._root = TreeNode(0, b"", 0, 0, None)
        self._root.device_full = EMPTY
        self._root.host_full = EMPTY
        if (
            int(state_interval) != state_interval
            or state_interval < 0
            or state_interval % page_size
        ):
            raise ValueError(
                f"state_interval must be a non-negative multiple of page_size={page_size}, "
                f"got {state_interval!r}"
            )
        self.state_interval = int(state_interval)
        self.states: Snapshots | None = (
            Snapshots(self.state_interval // self.page_size) if state_interval else None
        )
        self._w = SwaWindows(self.swa_pages)
        self._r = Residency(self._root, self.page_size * TOK_BYTES, self._w, self.states)
        self._s = Structure(self._root, self.page_size, self._w, self._r)

    # ------------------------------------------------------------------ counters (O(1))
    @property
    def root(self) -> TreeNode:
        """The root node (no pages)."""
        return self._root

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, the root excluded."""
        return self._r.num_nodes

    def total_device_pages(self) -> int:
        """Full pages with a device value.

        Returns:
          The count (O(1)).
        """
        return self._r.dev_pages

    def total_host_pages(self) -> int:
        """Full pages with a host value.

        Returns:
          The count (O(1)).
        """
        return self._r.host_pages

    def total_device_swa_pages(self) -> int:
        """Live SWA pages with a device value.

        Returns:
          The count (O(1)).
        """
        return self._w.dev_live

    def total_host_swa_pages(self) -> int:
        """Live SWA pages with a host value.

        Returns:
          The count (O(1)).
        """
        return self._w.host_live

    def reclaimable_swa_pages(self, tier: Tier) -> int:
        """SWA pages of ``tier`` that :meth:`reclaim_swa` may free (classes 1 and 2).

        Args:
          tier: ``Tier.DEVICE`` or ``Tier.HOST``.

        Returns:
          The live SWA pages of that tier outside every leaf and lock window.

        Raises:
          ValueError: ``tier`` is ``Tier.STORAGE`` or not a tier.
        """
        w = self._w
        return w.dev_live - w.dev_prot if _is_device(tier) else w.host_live - w.host_prot

    def evictable_device_pages(self) -> int:
        """Device full pages in unlocked nodes.

        Returns:
          The count (O(1)).
        """
        return self._r.evictable_dev

    def evictable_host_pages(self) -> int:
        """Host full pages in unlocked host-only nodes.

        Returns:
          The count (O(1)).
        """
        return self._r.evictable_host

    def protected_device_pages(self) -> int:
        """Device full pages in locked nodes (not evictable now).

        Returns:
          The count (O(1)).
        """
        return self._r.dev_pages - self._r.evictable_dev

    # ------------------------------------------------------------------ match
    def match_prefix(self, key, *, salt=None, touch: bool = True) -> MatchResult:
        """Longest usable page-aligned prefix of ``key`` among the pages inserted with
        the same salt.

        Splits a node where the match ends inside it. With SWA the prefix is cut to
        the last page boundary whose trailing window is still available.

        Args:
          key: token ids, any length (a partial trailing page is ignored).
          salt: ``str`` / ``bytes`` cache salt; ``None`` = unsalted (matches only
            unsalted pages).
          touch: a use, not an inspection: bump ``last_access`` and ``hit_count``
            along the usable path.

        Returns:
          A :class:`MatchResult`: lengths in tokens, the device and host full ids
          of the prefix, the SWA window's ids and the node to lock.

        Raises:
          ValueError: ``key`` is not 1-D integer token ids.
        """
        return self._s.match(key, salt, touch)

    def cached_len(self, key, *, salt=None) -> int:
        """How much of ``key`` the tree holds, page-wise (no SWA rule, no side effects).

        Args:
          key: token ids, any length.
          salt: as in :meth:`match_prefix`.

        Returns:
          Tokens of ``key``'s leading whole pages present under ``salt``.
        """
        kb, _ = key_bytes(key, self.page_size, aligned=False)
        *_, pages = walk(self._root, kb, salt_bytes(salt), self.page_size)
        return pages * self.page_size

    # ------------------------------------------------------------------ snapshots
    def attach_state(self, key, slot: int, *, salt=None) -> tuple[TreeNode, int]:
        """Keep a recurrent-state snapshot taken right after ``key`` (on device).

        The node ending exactly at ``key``'s end is made if needed (a split; its upper
        part holds no snapshot). The snapshot is read-only from now on: requests that
        match it read it and write their advanced state to their own slots.

        Args:
          key: the page-aligned token ids before the snapshot (its length, a multiple
            of ``state_interval``, is the snapshot's position); every page on device.
          slot: the device snapshot slot holding the state at that position.
          salt: the request's cache salt.

        Returns:
          ``(node, unused)``: the node now ending at the position, and ``slot`` if
          that node already had a device snapshot (the caller frees it), else -1.

        Raises:
          ValueError: a tree without snapshots, a key the tree does not hold on
            device, a position off the grid, or a bad slot.
        """
        if self.states is None:
            raise ValueError("this tree has no snapshot component (state_interval=0)")
        node = self._s.node_at(key, salt)
        return node, self.states.set_device(node, slot)

    # ------------------------------------------------------------------ insert
    def insert(self, key, full_device_ids, swa_device_ids=None, *, salt=None) -> InsertResult:
        """Insert a page-aligned ``key`` under ``salt``.

        Pages already on device keep their values; the caller's ids for them
        come back in ``dup_full_ids`` / ``free_swa_ids`` (SWA tombstones are
        filled with the caller's id instead). Host-only pages adopt the caller's
        device ids. New pages get the caller's ids. Nothing is freed. Validation
        happens before any value changes.

        Args:
          key: token ids, a whole number of pages.
          full_device_ids: the caller's own device full-page ids for the
            *trailing* ``n`` pages of the key (``n <= pages``); the leading pages
            must already be cached on device (typically the caller's locked match).
          swa_device_ids: the caller's device SWA ids, right-aligned too, any
            length up to the key's pages, ``-1`` = none; give all the SWA pages
            the request computed: out-of-window ones stay reclaimable.
          salt: as in :meth:`match_prefix`: the pages are shared only with
            requests of the same salt.

        Returns:
          An :class:`InsertResult`: the node ending the key, the prefix / adopted /
          new lengths in tokens, and the caller's ids to free.

        Raises:
          ValueError: a key that is not whole pages of integer tokens, more ids than
            pages, a negative full id, or leading pages that are not cached on
            device and have no id.
        """
        return self._s.insert(key, full_device_ids, swa_device_ids, salt)

    # ------------------------------------------------------------------ SWA reclaim
    def reclaim_swa(self, num_pages: int, tier: Tier, *, keep_branch_windows: bool = False):
        """Free SWA pages that no leaf or lock window needs.

        LRU by node, pages outside every leaf / lock / branch-point window first,
        then pages only in branch-point windows. Pages in the window ending at a
        leaf or at a locked node are never taken: they go with their node
        (``evict_device`` / ``evict_host``).

        Args:
          num_pages: how many to free, at most.
          tier: ``Tier.DEVICE`` or ``Tier.HOST``.
          keep_branch_windows: never take pages of branch-point windows.

        Returns:
          The freed ids (now ``-1`` in the tree), int32, for the caller to free;
          empty without SWA.

        Raises:
          ValueError: ``tier`` is ``Tier.STORAGE`` or not a tier.
        """
        if not self.swa_pages:
            return EMPTY
        return self._w.reclaim(int(num_pages), _is_device(tier), keep_branch_windows)

    # ------------------------------------------------------------------ locks
    def inc_lock(self, node: TreeNode) -> None:
        """Lock ``node`` and its ancestors (never evicted while locked); the node's
        trailing SWA window is never reclaimed while locked.

        Args:
          node: a node of this tree (the root: nothing to lock).

        Raises:
          ValueError: ``node`` is no longer in the tree.
        """
        self._r.inc_lock(node)

    def dec_lock(self, node: TreeNode) -> None:
        """Undo one ``inc_lock(node)``.

        Args:
          node: a node locked with :meth:`inc_lock`.

        Raises:
          ValueError: ``node`` is no longer in the tree or has no lock of its own.
        """
        self._r.dec_lock(node)

    # ------------------------------------------------------------------ eviction
    def evict_device(self, num_pages: int, *, write_back: bool | None = None) -> EvictResult:
        """Free at least ``num_pages`` device full pages (if possible), LRU over unlocked
        device leaves. Backed-up leaves are demoted (host kept); others are deleted,
        or with write-back reported in ``needs_backup`` and left in place. SWA pages
        go with their node.

        Args:
          num_pages: device full pages to free (whole nodes: may free more).
          write_back: report unbacked leaves instead of deleting them; ``None``:
            ``write_policy is WRITE_BACK``.

        Returns:
          An :class:`EvictResult` with the freed device ids for the caller to free.
        """
        wb = self.write_policy is WritePolicy.WRITE_BACK if write_back is None else write_back
        return self._r.evict_device(num_pages, wb)

    def evict_host(self, num_pages: int, *, skip=None) -> EvictResult:
        """Free at least ``num_pages`` host full pages (if possible): LRU over unlocked
        host-only leaves, which leave the tree (with their host SWA pages).

        Args:
          num_pages: host full pages to free (whole nodes: may free more).
          skip: ``skip(host_full ids) -> bool``: leaves to pass over (their
            ancestors stay too), e.g. pages an L3 write still reads.

        Returns:
          An :class:`EvictResult` with the freed host ids for the caller to free.
        """
        return self._r.evict_host(num_pages, skip)

    # ------------------------------------------------------------------ backup / load back
    def device_ids(self, node: TreeNode) -> tuple[np.ndarray, np.ndarray]:
        """The device page ids of the path to ``node``: a request's page table after an
        insert.

        Args:
          node: a node whose whole path is on device (a locked node's is).

        Returns:
          ``(full_ids, swa_ids)``, int32, one per page of the path, root first;
          SWA ``-1``: tombstone (all ``-1`` without SWA).

        Raises:
          ValueError: a node of the path is not on device, or ``node`` is no
            longer in the tree.
        """
        path = self._s.path(node) if node is not self._root else []
        if any(n.device_full is None for n in path):
            raise ValueError(f"the path to node {node.id} is not all on device")
        full = cat([n.device_full for n in path])
        swa = cat([n.device_swa for n in path]) if self.swa_pages else full * 0 - 1
        return full, swa

    def backup_plan(self, node: TreeNode) -> BackupPlan:
        """What to copy to host so ``node``'s whole path is backed up.

        Args:
          node: a node of this tree.

        Returns:
          A :class:`BackupPlan`: the unbacked nodes ending the path and their device
          ids (empty when the path is backed up already).
        """
        return self._r.backup_plan(node)

    def mark_backed_up(
        self, node: TreeNode, host_full_ids, host_swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Record host copies for the pages of ``node``'s path that are not backed up.

        Args:
          node: the node of the :meth:`backup_plan`.
          host_full_ids: host full ids, root order, covering at least the trailing
            unbacked pages of the path.
          host_swa_ids: host SWA ids, one per ``host_full_ids`` entry (``-1`` = no
            SWA page copied); all kept (out-of-window ones reclaimable).

        Returns:
          ``(unused_full_ids, unused_swa_ids)``: leading surplus ids (pages an
          overlapping backup recorded meanwhile), for the caller to free.

        Raises:
          ValueError: ``node`` is no longer in the tree or a node of its unbacked
            path is not on device, too few or negative ids, or SWA ids of another
            length.
        """
        return self._r.mark_backed_up(node, host_full_ids, host_swa_ids)

    def set_device_value(
        self, node: TreeNode, full_ids, swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Load-back bookkeeping: device ids for the host-only pages ending ``node``'s path.

        Args:
          node: the matched node (e.g. ``MatchResult.node``).
          full_ids: device full ids, root order, covering at least the trailing
            host-only pages of the path (``match.host_len / page_size`` ids).
          swa_ids: device SWA ids, right-aligned over the path, ``-1`` = none; they
            fill device SWA tombstones (e.g. the trailing window loaded from host).

        Returns:
          ``(unused_full_ids, unused_swa_ids)``: ids that were not needed (leading
          surplus full ids, SWA ids for pages that already have a device SWA page,
          as after an overlapping load or insert), for the caller to free.

        Raises:
          ValueError: ``node`` is no longer in the tree, too few or negative full
            ids, or more SWA ids than the path has pages.
        """
        return self._r.set_device_value(node, full_ids, swa_ids)

    # ------------------------------------------------------------------ inspection
    def iter_nodes(self) -> Iterator[TreeNode]:
        """All nodes except the root.

        Yields:
          Each node once, parents before children.
        """
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def digest(self) -> bytes:
        """A hash of the whole tree state that decisions depend on: per node (children in
        key order) its tokens, salt, page ids on every tier, locks and LRU stamp.

        Processes that replay the same request stream must have equal digests.

        Returns:
          16 bytes (BLAKE2b).
        """
        h = hashlib.blake2b(digest_size=16)
        stack = [self._root]
        while stack:
            n = stack.pop()
            h.update(n.key)
            h.update(n.salt or b"-")
            for arr in (n.device_full, n.device_swa, n.host_full, n.host_swa):
                h.update(b"." if arr is None else np.asarray(arr, np.int32).tobytes())
            h.update(
                np.array(
                    [n.num_pages, n.lock_ref, n.last_access, n.state_dev, n.state_host],
                    np.int64,
                ).tobytes()
            )
            stack.extend(n.children[k] for k in sorted(n.children, reverse=True))
        return h.digest()

    def path_hashes(self, node: TreeNode) -> list[str]:
        """L3 page hashes (64-char hex) of the path from the root to the end of ``node``,
        root first: ``storage.keys.page_hashes(path_tokens(node), page_size,
        salt=node.salt)``. Computed on first request per node and kept on the nodes
        (``node.page_hashes``); splits slice them.

        Args:
          node: a node of this tree.

        Returns:
          One hash per page of the path; ``[]`` for the root.

        Raises:
          ValueError: ``node`` is no longer in the tree.
        """
        if node.parent is None:
            if node is self._root:
                return []
            raise ValueError(f"node {node.id} is no longer in the tree")
        return _path_hashes(self._s.path(node), self.page_size)

    def key_hashes(self, key, *, salt=None) -> list[str]:
        """L3 page hashes of every whole page of ``key`` under ``salt``: equal to
        ``storage.keys.page_hashes(key, page_size, salt)``, but the pages the tree holds
        (under that salt) take their hashes from the nodes (computing and keeping them
        there if needed) and only the rest are hashed. No other side effect: no split,
        no LRU bump. For the L3 lookup / backup of pages beyond a match.

        Args:
          key: token ids (a partial trailing page is ignored).
          salt: as in :meth:`match_prefix`.

        Returns:
          One 64-char hex hash per whole page of ``key``.
        """
        return _key_hashes(self._root, key, self.page_size, salt)

    def path_tokens(self, node: TreeNode) -> np.ndarray:
        """Token ids of the path from the root to the end of ``node``.

        Args:
          node: a node of this tree.

        Returns:
          int64 ``[node.end * page_size]`` (empty for the root, and for a node no
          longer in the tree).
        """
        parts = [n.key for n in self._s.path(node)] if node.parent is not None else []
        return np.frombuffer(b"".join(parts), dtype=TOK)

    def stats(self) -> dict:
        """Node and page counts of the tree, for reports.

        Returns:
          ``{"nodes", "device_pages", "host_pages", "device_swa_pages",
          "host_swa_pages", "reclaimable_{device,host}_swa_pages",
          "evictable_{device,host}_pages"}`` → int.
        """
        w, r = self._w, self._r
        return {
            "nodes": r.num_nodes,
            "device_pages": r.dev_pages,
            "host_pages": r.host_pages,
            "device_swa_pages": w.dev_live,
            "host_swa_pages": w.host_live,
            "reclaimable_device_swa_pages": w.dev_live - w.dev_prot,
            "reclaimable_host_swa_pages": w.host_live - w.host_prot,
            "evictable_device_pages": r.evictable_dev,
            "evictable_host_pages": r.evictable_host,
        }

    def check_invariants(self) -> None:
        """Full O(tree) consistency check; raises ``AssertionError`` with a message."""
        r = self._r
        check_tree(
            self._root,
            self.page_size,
            self._w,
            counters=r.counters(),
            dev_leaves=r.dev_leaves,
            host_leaves=r.host_leaves,
        )
        if self.states is not None:
            self.states.check(self.iter_nodes())
