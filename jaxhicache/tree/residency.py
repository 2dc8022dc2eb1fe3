"""Where each node's values live: device / host residency, eviction, backup bookkeeping.

:class:`Residency` owns the per-tier counters and leaf sets of one tree and every
operation that gives or drops a node's device or host value: load back
(``set_device_value``), backups (``backup_plan`` / ``mark_backed_up``), LRU
eviction of either tier, and the locks that keep nodes from it (``inc_lock`` /
``dec_lock``: ``lock_ref`` along the path and the evictable counters). It returns every dropped id; nothing is freed here.

Invariants kept (and recounted by :func:`jaxhicache.tree.invariants.check_tree`):
``dev_pages`` / ``host_pages`` count full pages per tier; ``evictable_dev`` counts
device pages of unlocked nodes, ``evictable_host`` host pages of unlocked host-only
nodes; ``dev_leaves`` holds the device nodes without a device child,
``host_leaves`` the childless host-only nodes; a device node's parent is on
device and a backed-up node's parent is backed up; SWA summaries go through
:class:`~jaxhicache.tree.window.SwaWindows`.
"""

from __future__ import annotations

import heapq
from typing import final

import numpy as np

from jaxhicache.tree.arrays import EMPTY, cat, ids
from jaxhicache.tree.node import BackupPlan, EvictResult, TreeNode, child_key
from jaxhicache.tree.states import Snapshots
from jaxhicache.tree.window import SwaWindows

__all__ = ["Residency"]


@final
class Residency:
    """Per-tier values of one tree's nodes (see module docstring)."""

    __slots__ = (
        "dev_leaves",
        "dev_pages",
        "evictable_dev",
        "evictable_host",
        "host_leaves",
        "host_pages",
        "num_nodes",
        "pb",
        "root",
        "states",
        "swa",
        "w",
    )

    def __init__(
        self, root: TreeNode, page_bytes: int, w: SwaWindows, states: Snapshots | None = None
    ):
        self.root = root
        self.states = states  # the snapshot component (None: no recurrent states)
        self.pb = page_bytes
        self.w = w
        self.swa = w.swa
        self.num_nodes = 0
        self.dev_pages = 0  # full pages with a device value
        self.host_pages = 0
        self.evictable_dev = 0  # device pages in unlocked nodes
        self.evictable_host = 0  # host pages in unlocked host-only nodes
        self.dev_leaves: set[TreeNode] = set()  # device nodes without a device child
        self.host_leaves: set[TreeNode] = set()  # childless host-only nodes

    def counters(self) -> dict[str, int]:
        """The O(1) counters by name (``check_tree`` compares them with a recount)."""
        return {
            "device pages": self.dev_pages,
            "host pages": self.host_pages,
            "evictable device pages": self.evictable_dev,
            "evictable host pages": self.evictable_host,
            "nodes": self.num_nodes,
        }

    # ------------------------------------------------------------------ values
    def set_device(self, n: TreeNode, full: np.ndarray, swa: tuple | None) -> None:
        """Give a node without a device value its device value; keeps all counters."""
        k = n.num_pages
        n.device_full = full
        self.dev_pages += k
        if n.lock_ref == 0:
            self.evictable_dev += k
            if n.host_full is not None:
                self.evictable_host -= k
        if self.swa:
            self.w.set_device(n, swa)
        p = n.parent
        p.n_dev_children += 1
        if p.n_dev_children == 1:
            self.dev_leaves.discard(p)
        if n.n_dev_children == 0:
            self.dev_leaves.add(n)
        self.host_leaves.discard(n)

    def clear_device(self, n: TreeNode, full_out: list, swa_out: list) -> None:
        """Drop a node's device value; appends the freed ids to the lists."""
        k = n.num_pages
        full_out.append(n.device_full)
        n.device_full = None
        self.dev_pages -= k
        if n.lock_ref == 0:
            self.evictable_dev -= k
            if n.host_full is not None:
                self.evictable_host += k
        if self.swa:
            self.w.clear_device(n, swa_out)
        self.dev_leaves.discard(n)
        p = n.parent
        p.n_dev_children -= 1
        if p.n_dev_children == 0 and p.parent is not None and p.device_full is not None:
            self.dev_leaves.add(p)
        if n.host_full is not None and not n.children:
            self.host_leaves.add(n)

    def set_host(self, n: TreeNode, full: np.ndarray, swa: np.ndarray | None) -> None:
        k = n.num_pages
        n.host_full = full
        self.host_pages += k
        if n.device_full is None and n.lock_ref == 0:
            self.evictable_host += k
        if self.swa:
            self.w.set_host(n, swa)

    def detach(self, n: TreeNode) -> None:
        """Remove a childless node without values from its parent."""
        p = n.parent
        del p.children[child_key(n, self.pb)]
        n.parent = None
        self.num_nodes -= 1
        if (
            p.parent is not None
            and not p.children
            and p.device_full is None
            and p.host_full is not None
        ):
            self.host_leaves.add(p)
        if self.swa:
            self.w.detach(n, p)

    # ------------------------------------------------------------------ eviction
    def evict_device(self, num_pages: int, wb: bool) -> EvictResult:
        """Free at least ``num_pages`` device full pages (if possible), LRU over unlocked
        device leaves. Backed-up leaves are demoted (host kept); others are deleted,
        or with write-back (``wb``) reported in ``needs_backup`` and left in place.
        SWA pages go with their node."""
        heap = [(n.last_access, n) for n in self.dev_leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        full_out: list[np.ndarray] = []
        swa_out: list[np.ndarray] = []
        state_out: list[int] = []
        needs: list[TreeNode] = []
        evicted = demoted = deleted = 0
        st = self.states
        while evicted < num_pages and heap:
            _, n = heapq.heappop(heap)
            k = n.num_pages
            p = n.parent
            if n.host_full is None:
                if wb:
                    needs.append(n)
                    continue
                if n.children:  # cannot happen: unbacked nodes have no host-only children
                    raise AssertionError(f"unbacked device leaf {n.id} has children")
                if st is not None:  # a snapshot goes with its node's KV
                    st.clear_device(n, state_out)
                self.clear_device(n, full_out, swa_out)
                self.detach(n)
                deleted += k
            else:
                if st is not None:  # the host snapshot stays: still matchable from host
                    st.clear_device(n, state_out)
                self.clear_device(n, full_out, swa_out)
                demoted += k
            evicted += k
            if p.lock_ref == 0 and p in self.dev_leaves:
                heapq.heappush(heap, (p.last_access, p))
        return EvictResult(
            full_ids=cat(full_out),
            swa_ids=cat(swa_out),
            evicted_pages=evicted,
            demoted_pages=demoted,
            deleted_pages=deleted,
            needs_backup=needs,
            state_ids=np.asarray(state_out, np.int32),
        )

    def evict_host(self, num_pages: int, skip=None) -> EvictResult:
        """Free at least ``num_pages`` host full pages (if possible): LRU over unlocked
        host-only leaves, which leave the tree (``skip(host_full ids)``: leaves to pass
        over, and so their ancestors)."""
        heap = [
            (n.last_access, n)
            for n in self.host_leaves
            if n.lock_ref == 0 and (skip is None or not skip(n.host_full))
        ]
        heapq.heapify(heap)
        full_out: list[np.ndarray] = []
        swa_out: list[np.ndarray] = []
        state_out: list[int] = []
        evicted = 0
        while evicted < num_pages and heap:
            _, n = heapq.heappop(heap)
            k = n.num_pages
            p = n.parent
            if self.states is not None:
                self.states.clear_host(n, state_out)
            full_out.append(n.host_full)
            n.host_full = None
            self.host_pages -= k
            self.evictable_host -= k  # unlocked host-only
            if self.swa:
                self.w.clear_host(n, swa_out)
            self.host_leaves.discard(n)
            self.detach(n)
            evicted += k
            if (
                p in self.host_leaves
                and p.lock_ref == 0
                and (skip is None or not skip(p.host_full))
            ):
                heapq.heappush(heap, (p.last_access, p))
        return EvictResult(
            full_ids=cat(full_out),
            swa_ids=cat(swa_out),
            evicted_pages=evicted,
            deleted_pages=evicted,
            state_ids=np.asarray(state_out, np.int32),
        )

    # ------------------------------------------------------------------ locks
    def inc_lock(self, node: TreeNode) -> None:
        """Lock ``node`` and its ancestors (``lock_ref`` along the path, the evictable
        counters of nodes that become locked); reprotects the node's SWA window."""
        if node.parent is None:
            if node is self.root:
                return
            raise ValueError(f"inc_lock on a node that is no longer in the tree: {node!r}")
        node.own_locks += 1
        if node.own_locks == 1 and self.swa:
            self.w.reprotect(node)
        n = node
        while n.parent is not None:
            if n.lock_ref == 0:
                k = n.num_pages
                if n.device_full is not None:
                    self.evictable_dev -= k
                elif n.host_full is not None:
                    self.evictable_host -= k
            n.lock_ref += 1
            n = n.parent

    def dec_lock(self, node: TreeNode) -> None:
        """Undo one :meth:`inc_lock` of ``node``. Below zero raises ``ValueError``."""
        if node.parent is None:
            if node is self.root:
                return
            raise ValueError(f"dec_lock on a node that is no longer in the tree: {node!r}")
        if node.own_locks <= 0:
            raise ValueError(
                f"dec_lock below zero on node {node.id} (own locks {node.own_locks}, "
                f"lock_ref {node.lock_ref})"
            )
        node.own_locks -= 1
        if node.own_locks == 0 and self.swa:
            self.w.reprotect(node)
        n = node
        while n.parent is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                k = n.num_pages
                if n.device_full is not None:
                    self.evictable_dev += k
                elif n.host_full is not None:
                    self.evictable_host += k
            n = n.parent

    # ------------------------------------------------------------------ backup / load back
    def check_attached(self, node: TreeNode, what: str) -> None:
        if node.parent is None and node is not self.root:
            raise ValueError(f"{what}: node {node.id} is no longer in the tree")

    def nodes_to_backup(self, node: TreeNode) -> list[TreeNode]:
        """Nodes of the path ending at ``node`` without a host value, root first
        (a suffix of the path, since backed-up nodes form a prefix)."""
        out = []
        n = node
        while n.parent is not None and n.host_full is None:
            out.append(n)
            n = n.parent
        out.reverse()
        return out

    def backup_plan(self, node: TreeNode) -> BackupPlan:
        """What to copy to host so ``node``'s whole path is backed up."""
        nodes = self.nodes_to_backup(node)
        for n in nodes:
            if n.device_full is None:
                raise ValueError(f"node {n.id} has neither a device nor a host value")
        swa = [n.device_swa for n in nodes] if self.swa else []
        return BackupPlan(
            node=node,
            nodes=nodes,
            num_pages=sum(n.num_pages for n in nodes),
            device_full_ids=cat([n.device_full for n in nodes]),
            device_swa_ids=cat(swa),
        )

    def mark_backed_up(
        self, node: TreeNode, host_full_ids, host_swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Record host copies for the pages of ``node``'s path that are not backed up.

        ``host_full_ids`` (root order) cover the trailing pages of the path and must
        be at least ``len(nodes_to_backup(node))`` pages; ``host_swa_ids`` (same
        length, ``-1`` = no SWA page copied) go with them and are all kept (out-of-
        window ones reclaimable). Leading surplus ids (pages an overlapping backup
        recorded meanwhile) are not used and come back as ``(unused_full_ids,
        unused_swa_ids)`` for the caller to free.
        """
        self.check_attached(node, "mark_backed_up")
        nodes = self.nodes_to_backup(node)
        k = sum(n.num_pages for n in nodes)
        full = _at_least(
            host_full_ids,
            "host_full_ids",
            k,
            f"mark_backed_up(node {node.id}): {k} pages of its path are not backed up",
            "host",
        )
        sw = None
        if self.swa and host_swa_ids is not None:
            sw = ids(host_swa_ids, "host_swa_ids")
            if sw.size != full.size:
                raise ValueError(
                    f"host_swa_ids needs one entry per host_full_id ({full.size}, -1 = none), "
                    f"got {sw.size}"
                )
        for n in nodes:
            if n.device_full is None:
                raise ValueError(f"node {n.id} is not on device; nothing to back up")
        extra = full.size - k
        off = extra
        for n in nodes:
            e = off + n.num_pages
            self.set_host(n, full[off:e].copy(), sw[off:e].copy() if sw is not None else None)
            off = e
        unused_swa = EMPTY
        if sw is not None and extra:
            head = sw[:extra]
            unused_swa = head[head >= 0]
        return full[:extra].copy(), unused_swa

    def set_device_value(
        self, node: TreeNode, full_ids, swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Load-back bookkeeping: device ids for the host-only pages ending ``node``'s path.

        ``full_ids`` (root order) cover the trailing host-only pages of the path
        (at least ``match.host_len / page_size`` ids for a match ending at ``node``).
        ``swa_ids`` (optional, right-aligned over the path, ``-1`` = none) fill device
        SWA tombstones, e.g. the trailing window loaded from host. Ids that are not
        needed (leading surplus full ids, SWA ids for pages that have a device SWA
        page already, as after an overlapping load or insert) come back as
        ``(unused_full_ids, unused_swa_ids)`` for the caller to free.
        """
        self.check_attached(node, "set_device_value")
        nodes = []
        n = node
        while n.parent is not None and n.device_full is None:
            nodes.append(n)
            n = n.parent
        nodes.reverse()
        k = sum(x.num_pages for x in nodes)
        full = _at_least(
            full_ids,
            "full_ids",
            k,
            f"set_device_value(node {node.id}): {k} host-only pages end its path",
            "device",
        )
        sw = None
        if self.swa and swa_ids is not None:
            sw = ids(swa_ids, "swa_ids")
            if sw.size > node.end:
                raise ValueError(f"swa_ids has {sw.size} ids but the path has {node.end} pages")
        extra = full.size - k
        off = extra
        for x in nodes:
            e = off + x.num_pages
            self.set_device(x, full[off:e].copy(), None)
            off = e
        unused_swa: list[np.ndarray] = []
        if sw is not None and sw.size:
            first = node.end - sw.size
            x = node
            while x.parent is not None and x.end > first:
                self.w.merge(x, x.start, sw, first, unused_swa)
                x = x.parent
        return full[:extra].copy(), cat(unused_swa)


def _at_least(x, name: str, k: int, what: str, tier: str) -> np.ndarray:
    """``x`` as int32 page ids: at least ``k`` of them, none negative (``ValueError``)."""
    full = ids(x, name)
    if full.size < k:
        raise ValueError(f"{what}, got only {full.size} {tier} ids")
    if full.size and full[full.argmin()] < 0:
        raise ValueError(f"{name} must be >= 0")
    return full
