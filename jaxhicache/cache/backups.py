"""In-flight D2H backups: issue, land, record.

A backup copies the not-yet-backed-up pages of a node's path to host pages
allocated here. The node stays locked from issue until :meth:`Backups.poll`
records the landed copy in the tree, and the host pages are counted as
in flight until then (:meth:`Backups.in_flight`). Completions change the tree
only at poll points, so the tree evolves the same way in every process that
runs the same request stream. Under multi-controller JAX a backup may have
landed (or failed) on one process's stages and not yet on another's: at each
poll point the processes agree on every pending backup's status with one MIN
all-reduce (pending < failed < landed), so all record the same ones. A failed
backup (its copy raised) is dropped everywhere: host pages freed, node unlocked,
``backups_failed`` counted; the device copy is intact.

Host pages are allocated with their generations; a row whose host page was
freed or reallocated before the copy lands is skipped by the transfer engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import final

import numpy as np

from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.pools.device import DevicePools
from jaxhicache.spec import PageSpace, Tier
from jaxhicache.transfer import BackupHandle, PageMove, TransferEngine
from jaxhicache.tree import RadixTree, TreeNode

__all__ = ["Backups"]

_NO_IDS = np.zeros(0, np.int32)

# Per-backup status, ordered so that the MIN over processes is the agreed outcome.
_PENDING, _FAILED, _LANDED = 0, 1, 2


@dataclasses.dataclass
class _Part:
    node: TreeNode
    host_full: np.ndarray
    host_swa: np.ndarray  # aligned with host_full, -1 = no SWA page copied
    state_nodes: list[TreeNode] = dataclasses.field(default_factory=list)
    host_states: np.ndarray = dataclasses.field(default_factory=lambda: _NO_IDS)


@dataclasses.dataclass
class _Backup:
    parts: list[_Part]  # one copy (one dispatch) for the paths of several nodes
    handle: BackupHandle


@final
class Backups:
    """The cache's in-flight backups over one engine, tree and ledger."""

    def __init__(
        self,
        engine: TransferEngine,
        tree: RadixTree,
        ledger: PageLedger,
        stats: CacheStats,
        make_room_on_host: Callable[[PageSpace, int], None],
        on_backed_up: Callable[[TreeNode, int, list[TreeNode]], None] | None = None,
        agreement: Agreement | None = None,
        alloc_host_states: Callable[[int], np.ndarray] | None = None,
    ):
        self._alloc_states = alloc_host_states  # recurrent hybrids: host snapshot slots
        self._engine = engine
        self._tree = tree
        self._ledger = ledger
        self._stats = stats
        self._make_room = make_room_on_host
        self._on_backed_up = on_backed_up
        self._pending: list[_Backup] = []
        self.agreement = agreement if agreement is not None else Agreement(local_only=True)

    def __len__(self) -> int:
        return len(self._pending)

    def _parts(self):
        return (p for b in self._pending for p in b.parts)

    def in_flight(self) -> dict[PageSpace, int]:
        """Host pages per space held by backups that have not been recorded yet."""
        return {
            PageSpace.FULL: sum(p.host_full.size for p in self._parts()),
            PageSpace.SWA: sum(int((p.host_swa >= 0).sum()) for p in self._parts()),
            PageSpace.STATE: sum(p.host_states.size for p in self._parts()),
        }

    def issue(self, pools: DevicePools, nodes: TreeNode | Sequence[TreeNode]) -> None:
        """Starts copying the unbacked pages of each node's path out of ``pools``: one
        D2H dispatch for all of them (a batch's inserts back up together).

        A node already in flight, or an ancestor of another node given (its pages are
        on that node's path), is skipped. When the host tier has no room even after
        eviction (every host page locked or in flight), a node's backup is skipped and
        counted (``backups_skipped``): the device copy is intact, a later backup of the
        node may succeed.
        """
        nodes = [nodes] if isinstance(nodes, TreeNode) else list(nodes)
        busy = {id(p.node) for p in self._parts()}
        covered = set()  # ancestors of the nodes given: their pages ride on a descendant's
        for n in nodes:
            a = n.parent
            while a is not None and id(a) not in covered:
                covered.add(id(a))
                a = a.parent
        parts, moves = [], []
        for node in dict.fromkeys(nodes):  # unique, in order
            if id(node) in busy or id(node) in covered:
                continue
            plan = self._tree.backup_plan(node)
            st_nodes, st_dev = self._state_plan(node)
            if plan.num_pages == 0 and not st_nodes:
                continue
            got = self._alloc_for(plan)
            if got is None:
                continue
            host_full, host_swa, swa_src, host_swa_live = got
            host_states = self._alloc_states_for(len(st_nodes), host_full, host_swa_live)
            if host_states is None:
                continue
            parts.append(_Part(node, host_full, host_swa, st_nodes, host_states))
            moves.append(
                (plan.device_full_ids, host_full, swa_src, host_swa_live, st_dev, host_states)
            )
            busy.add(id(node))
        if not parts:
            return
        move = PageMove.of(*(np.concatenate([m[i] for m in moves]) for i in range(6)))
        gens = {
            space: self._ledger[Tier.HOST, space].generation(ids)
            for space, ids in ((PageSpace.FULL, move.full_host), (PageSpace.SWA, move.swa_host))
        }
        for p in parts:
            self._tree.inc_lock(p.node)
        handle = self._engine.backup(pools, move, host_generations=gens)
        self._pending.append(_Backup(parts, handle))
        self._stats.backups_issued += len(parts)

    def _state_plan(self, node: TreeNode) -> tuple[list[TreeNode], np.ndarray]:
        """The device snapshots on ``node``'s path without a host copy (none without states)."""
        states = self._tree.states
        if states is None or self._alloc_states is None:
            return [], _NO_IDS
        path = []
        n = node
        while n.parent is not None:
            path.append(n)
            n = n.parent
        return states.backup_plan(reversed(path))

    def _alloc_states_for(self, n: int, host_full, host_swa_live) -> np.ndarray | None:
        """Host snapshot slots (``None``, the pages just taken given back: no room)."""
        if not n:
            return _NO_IDS
        assert self._alloc_states is not None
        try:
            return self._alloc_states(n)
        except OutOfPages:
            self._ledger.free(Tier.HOST, PageSpace.FULL, host_full)
            self._ledger.free(Tier.HOST, PageSpace.SWA, host_swa_live)
            self._stats.backups_skipped += 1
            return None

    def _alloc_for(self, plan):
        """Host pages for ``plan`` (full, SWA aligned with full, and the live SWA pairs),
        or ``None`` when the host has no room (counted)."""
        swa_src = plan.device_swa_ids if self._tree.swa_pages else np.zeros(0, np.int32)
        has_swa = swa_src >= 0
        try:
            host_full = self._alloc_host(PageSpace.FULL, plan.num_pages)
        except OutOfPages:  # every host page is locked or in flight: no backup this time
            self._stats.backups_skipped += 1
            return None
        try:
            host_swa_live = self._alloc_host(PageSpace.SWA, int(has_swa.sum()))
        except OutOfPages:
            self._ledger.free(Tier.HOST, PageSpace.FULL, host_full)
            self._stats.backups_skipped += 1
            return None
        host_swa = np.full(plan.num_pages, -1, np.int32)
        if swa_src.size:
            host_swa[has_swa] = host_swa_live
        return host_full, host_swa, swa_src[has_swa], host_swa_live

    def poll(self, wait: bool = False) -> int:
        """Records landed backups in the tree (all of them with ``wait``); returns how many.

        Every process must call it at the same point: the statuses are agreed on
        (one all-reduce when anything is pending, none otherwise).
        """
        if not self._pending:
            return 0
        local = [_status(b.handle, wait) for b in self._pending]
        agreed = self.agreement.min(local)
        done, still = 0, []
        for b, st in zip(self._pending, agreed.tolist(), strict=True):
            if st == _PENDING:
                still.append(b)
                continue
            for p in b.parts:
                self._tree.dec_lock(p.node)
                done += 1
                if st == _FAILED:  # on some process: nobody records it
                    self._ledger.free(Tier.HOST, PageSpace.FULL, p.host_full)
                    self._ledger.free(Tier.HOST, PageSpace.SWA, p.host_swa[p.host_swa >= 0])
                    self._ledger.free(Tier.HOST, PageSpace.STATE, p.host_states)
                    self._stats.backups_failed += 1
                    continue
                unused_full, unused_swa = self._tree.mark_backed_up(p.node, p.host_full, p.host_swa)
                self._ledger.free(Tier.HOST, PageSpace.FULL, unused_full)
                self._ledger.free(Tier.HOST, PageSpace.SWA, unused_swa)
                snaps: list[TreeNode] = []  # the snapshots whose host copy was recorded
                if p.state_nodes:
                    assert self._tree.states is not None
                    unused = self._tree.states.mark_backed_up(p.state_nodes, p.host_states)
                    self._ledger.free(Tier.HOST, PageSpace.STATE, unused)
                    snaps = [
                        n
                        for n, s in zip(p.state_nodes, p.host_states.tolist(), strict=True)
                        if n.state_host == s
                    ]
                recorded = p.host_full.size - unused_full.size
                self._stats.backed_up_pages += recorded
                if self._on_backed_up is not None and (recorded or snaps):
                    self._on_backed_up(p.node, recorded, snaps)  # e.g. write them on to L3
        self._pending = still
        return done

    def _alloc_host(self, space: PageSpace, n: int) -> np.ndarray:
        if n > self._ledger.num_free(Tier.HOST, space):
            self.poll(wait=True)  # landed backups make their host leaves evictable
            self._make_room(space, n)
        return self._ledger.alloc(Tier.HOST, space, n)


def _status(handle: BackupHandle, wait: bool) -> int:
    """This process's view of one backup: pending, failed (its copy raised) or landed."""
    if not (wait or handle.done()):
        return _PENDING
    try:
        handle.wait()
    except Exception:  # any failure of the copy: the agreed outcome drops it everywhere
        return _FAILED
    return _LANDED
