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
from jaxhicache.tree.arrays import (
    EMPTY,
    I32_DT,
    TOK,
    TOK_BYTES,
    TOK_DT,
    cat,
    common_pages,
    concat,
    ids,
    key_bytes,
)
from jaxhicache.tree.hashes import key_hashes as _key_hashes
from jaxhicache.tree.hashes import path_hashes as _path_hashes
from jaxhicache.tree.hashes import salt_bytes, walk
from jaxhicache.tree.invariants import check_tree
from jaxhicache.tree.node import (
    BackupPlan,
    EvictResult,
    InsertResult,
    MatchResult,
    TreeNode,
    child_key,
    salt_prefix,
)
from jaxhicache.tree.policy import WritePolicy, _check_write_policy
from jaxhicache.tree.residency import Residency
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

    Raises:
      ValueError: ``page_size`` not a positive integer, ``swa_pages`` negative or
        not an integer, or ``write_policy`` not a :class:`WritePolicy`.
    """

    def __init__(
        self,
        page_size: int,
        swa_pages: int = 0,
        *,
        write_policy: WritePolicy = WritePolicy.WRITE_THROUGH,
    ):
        if int(page_size) != page_size or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if int(swa_pages) != swa_pages or swa_pages < 0:
            raise ValueError(f"swa_pages must be a non-negative integer, got {swa_pages!r}")
        self.page_size = int(page_size)
        self.swa_pages = int(swa_pages)
        self.write_policy = _check_write_policy(write_policy)
        self._pb = self.page_size * TOK_BYTES
        self._next_id = 1
        self._tick = 0
        self._root = TreeNode(0, b"", 0, 0, None)
        self._root.device_full = EMPTY
        self._root.host_full = EMPTY
        self._w = SwaWindows(self.swa_pages)
        self._r = Residency(self._root, self._pb, self._w)

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

    def _split(self, child: TreeNode, k: int) -> TreeNode:
        """Split ``child`` after ``k`` pages; returns the new upper node (the original
        object keeps the lower part, so references to deep nodes stay valid)."""
        pb = self._pb
        ck = child.key
        p = child.parent
        new = TreeNode(self._next_id, ck[: k * pb], k, child.start, p, child.salt)
        self._next_id += 1
        self._r.num_nodes += 1
        child.key = ck[k * pb :]
        child.num_pages -= k
        child.start += k
        child.parent = new
        new.children[child.key[:pb]] = child
        p.children[child_key(new, pb)] = new  # replaces child: same first page and salt
        h = child.page_hashes
        if h is not None:  # the chain is per page: slice it, never recompute
            new.page_hashes = h[:k]
            child.page_hashes = h[k:]
        new.lock_ref = child.lock_ref
        new.last_access = child.last_access
        new.hit_count = child.hit_count
        if child.device_full is not None:
            new.device_full = child.device_full[:k]
            child.device_full = child.device_full[k:]
            new.n_dev_children = 1
        if child.host_full is not None:
            new.host_full = child.host_full[:k]
            child.host_full = child.host_full[k:]
        if self.swa_pages:
            self._w.split(new, child, k, p)
        return new

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
        if type(key) is np.ndarray and key.dtype is TOK_DT and key.ndim == 1:  # fast path
            ps = self.page_size
            klen = len(key)
            r = klen % ps
            kb = key.tobytes() if not r else key[: klen - r].tobytes()
        else:
            kb, _ = key_bytes(key, self.page_size, aligned=False)
        pb = self._pb
        end = len(kb)
        path: list[TreeNode] = []
        pos = 0
        sp = b"" if salt is None else salt_prefix(salt_bytes(salt))
        child = self._root.children.get(sp + kb[:pb]) if end else None
        while child is not None:
            ck = child.key
            if kb.startswith(ck, pos):
                path.append(child)
                pos += len(ck)
                if pos == end:
                    break
                child = child.children.get(kb[pos : pos + pb])
                continue
            m = common_pages(self.page_size, ck, kb, pos)
            path.append(self._split(child, m))
            pos += m * pb
            break
        full_pages = pos // pb
        usable = full_pages
        swa = self.swa_pages
        if swa and path:
            # Fast path: the trailing runs of available SWA pages reach back far enough.
            run = 0
            i = len(path) - 1
            while True:
                n = path[i]
                t = n.swa_tail
                if run + t >= swa:
                    break
                if t < n.num_pages:
                    usable = self._w.usable_boundary(path, full_pages)
                    break
                run += t
                i -= 1
                if i < 0:
                    break
            if usable < full_pages:
                path = self._cut_path(path, usable)
        self._tick += touch
        tick = self._tick
        dev_parts, host_parts = [], []
        for n in path:
            if touch:
                n.last_access = tick
                n.hit_count += 1
            if n.device_full is not None:
                dev_parts.append(n.device_full)
            else:
                host_parts.append(n.host_full)
        ps = self.page_size
        if len(dev_parts) == 1:
            dev_ids = dev_parts[0].copy()
        else:
            dev_ids = concat(dev_parts) if dev_parts else EMPTY
        host_ids = cat(host_parts) if host_parts else EMPTY
        if swa and usable:
            n = path[-1]
            k = n.num_pages
            if usable >= swa and n.host_swa is None:
                # Fast paths of SwaWindows.window: the window lies in the last one or
                # two nodes and nothing is on host.
                w = swa
                swa_host = self._w.neg_swa
                if k >= w:
                    swa_dev = n.device_swa[k - w :].copy()
                else:
                    p = path[-2] if len(path) > 1 else None
                    if p is not None and p.host_swa is None and p.num_pages + k >= w:
                        swa_dev = concat((p.device_swa[p.num_pages + k - w :], n.device_swa))
                    else:
                        swa_dev, swa_host = self._w.window(path, w)
            else:
                w = swa if swa < usable else usable
                swa_dev, swa_host = self._w.window(path, w)
        else:
            w = 0
            swa_dev = swa_host = EMPTY
        return MatchResult(  # positional: noticeably cheaper than keywords
            path[-1] if path else self._root,  # node
            usable * ps,  # matched_len
            dev_ids.size * ps,  # device_len
            host_ids.size * ps,  # host_len
            full_pages * ps,  # full_match_len
            dev_ids,  # device_full_ids
            host_ids,  # host_full_ids
            w,  # swa_window_pages
            swa_dev,  # swa_device_ids
            swa_host,  # swa_host_ids
        )

    def _cut_path(self, path: list[TreeNode], b: int) -> list[TreeNode]:
        if b == 0:
            return []
        for j, n in enumerate(path):
            e = n.start + n.num_pages
            if e >= b:
                if e > b:
                    return [*path[:j], self._split(n, b - n.start)]
                return path[: j + 1]
        return path

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
        ps = self.page_size
        if (
            type(key) is np.ndarray and key.dtype is TOK_DT and key.ndim == 1 and not len(key) % ps
        ):  # fast path
            kb = key.tobytes()
            P = len(key) // ps
        else:
            kb, P = key_bytes(key, self.page_size, aligned=True)
        full = full_device_ids
        if not (type(full) is np.ndarray and full.dtype is I32_DT and full.ndim == 1):
            full = ids(full, "full_device_ids")
        nf = full.size
        if nf > P:
            raise ValueError(f"full_device_ids has {nf} ids but the key has only {P} pages")
        if nf and full[full.argmin()] < 0:
            raise ValueError(
                "full_device_ids must be >= 0 (give ids only for the caller's own pages)"
            )
        own = P - nf
        swa = self.swa_pages
        if swa and swa_device_ids is not None:
            sw = swa_device_ids
            if not (type(sw) is np.ndarray and sw.dtype is I32_DT and sw.ndim == 1):
                sw = ids(sw, "swa_device_ids")
            if sw.size > P:
                raise ValueError(f"swa_device_ids has {sw.size} ids but the key has only {P} pages")
            sw_start = P - sw.size
        else:
            sw = None
            sw_start = P
        pb = self._pb
        node = self._root
        path: list[TreeNode] = []
        pos = 0  # pages
        sb = None if salt is None else salt_bytes(salt)
        first = salt_prefix(sb) + kb[:pb]  # the first page's key among the root's children
        self._tick += 1
        tick = self._tick
        # Phase 1: walk (splits and access times only), validate before any value changes.
        while pos < P:
            off = pos * pb
            child = node.children.get(kb[off : off + pb] if pos else first)
            if child is None:
                break
            if kb.startswith(child.key, off):
                m = child.num_pages
            else:
                m = common_pages(self.page_size, child.key, kb, off)
                child = self._split(child, m)
            if child.device_full is None and pos < own:
                raise ValueError(
                    f"pages [{pos}, {min(pos + m, own)}) of the key are cached on host only; "
                    "load them back (set_device_value) or pass device ids for them"
                )
            child.last_access = tick
            path.append(child)
            node = child
            pos += m
        prefix = pos
        if pos < own:
            raise ValueError(
                f"the key's pages [{pos}, {own}) are not cached and no device ids were "
                f"given for them ({nf} ids for {P} pages)"
            )
        # Phase 2: values.
        dup_end = own  # caller ids [own, dup_end) duplicate existing device pages
        dup_swa: list[np.ndarray] = []
        adopted = 0
        lim = own if own < sw_start else sw_start  # nodes ending by then need nothing
        w = self._w
        r = self._r
        for child in path:
            s0 = child.start
            e = s0 + child.num_pages
            if e <= lim:
                continue
            if child.device_full is not None:
                if e > own:
                    dup_end = e
                if sw is not None and e > sw_start:
                    w.merge(child, s0, sw, sw_start, dup_swa)
            else:
                s = None
                if sw is not None and e > sw_start:
                    lo = max(s0, sw_start)
                    s = w.array(child.num_pages, sw[lo - sw_start : e - sw_start])
                r.set_device(child, full[s0 - own : e - own].copy(), s)
                adopted += child.num_pages
        if pos < P:
            # New leaf: Residency.set_device inlined (a fresh node is unlocked, host-less,
            # childless, and its parent is on device by now).
            k = P - pos
            off = pos * pb
            new = TreeNode(self._next_id, kb[off:], k, pos, node, sb)
            self._next_id += 1
            r.num_nodes += 1
            node.children[kb[off : off + pb] if pos else first] = new
            new.last_access = tick
            new.device_full = full.copy() if pos == own else full[pos - own :].copy()
            r.dev_pages += k
            r.evictable_dev += k
            if swa:
                part = None
                if sw is not None:
                    part = sw if sw_start >= pos else sw[pos - sw_start :]
                w.new_leaf(new, node, part)
            node.n_dev_children += 1
            if node.n_dev_children == 1:
                r.dev_leaves.discard(node)
            r.dev_leaves.add(new)
            path.append(new)
        return InsertResult(  # positional: noticeably cheaper than keywords
            path[-1] if path else self._root,  # node
            prefix * ps,  # prefix_len
            adopted * ps,  # adopted_len
            (P - prefix) * ps,  # new_len
            full[: dup_end - own].copy() if dup_end > own else EMPTY,  # dup_full_ids
            cat(dup_swa) if dup_swa else EMPTY,  # free_swa_ids
        )

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

    def evict_host(self, num_pages: int) -> EvictResult:
        """Free at least ``num_pages`` host full pages (if possible): LRU over unlocked
        host-only leaves, which leave the tree (with their host SWA pages).

        Args:
          num_pages: host full pages to free (whole nodes: may free more).

        Returns:
          An :class:`EvictResult` with the freed host ids for the caller to free.
        """
        return self._r.evict_host(num_pages)

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
        path = self._path(node) if node is not self._root else []
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

    def _path(self, node: TreeNode) -> list[TreeNode]:
        path = []
        n = node
        while n.parent is not None:
            path.append(n)
            n = n.parent
        if n is not self._root:
            raise ValueError(f"node {node.id} is no longer in the tree")
        path.reverse()
        return path

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
            h.update(np.array([n.num_pages, n.lock_ref, n.last_access], np.int64).tobytes())
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
        return _path_hashes(self._path(node), self.page_size)

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
        parts = [n.key for n in self._path(node)] if node.parent is not None else []
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
