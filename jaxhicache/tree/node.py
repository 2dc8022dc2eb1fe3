"""Tree nodes and the result records of the tree's operations.

A :class:`TreeNode` is a run of ``num_pages`` whole pages at page depth
``[start, end)`` with one value per page and component:

======================  =======================================================
``device_full``         int32 device full-page id per page, or ``None``
``host_full``           int32 host full-page id per page, or ``None``
``device_swa``          int32 device SWA-page id per page, ``-1`` = tombstone
                        (``None`` exactly when ``device_full`` is ``None``)
``host_swa``            same on host (``None`` exactly when ``host_full`` is)
======================  =======================================================

A node may also hold a recurrent-state snapshot taken exactly at its end
(``state_dev`` / ``state_host``: a device and a host snapshot slot, ``-1`` = none;
kept by :class:`jaxhicache.tree.states.Snapshots`).

Two more per-node fields serve the L3 tier and tenant isolation: ``salt`` (the
request's ``cache_salt`` as bytes, ``None`` = unsalted; equal along a path, so a
node belongs to exactly one salt) and ``page_hashes`` (the hex L3 page hash of
each page, ``None`` until :meth:`RadixTree.path_hashes` first needs it; a split
slices the list, so hashes are computed once per page).

Invariants (checked by :func:`jaxhicache.tree.invariants.check_tree`): a node
holds a device or a host value; ``lock_ref`` is its own locks plus its
children's ``lock_ref``; the SWA summaries (``swa_live``, ``swa_lo``/``swa_hi``,
``swa_tail``, ``short``, ``prot_dist``, ``prot``, ``*_prot_live``) match the
arrays and the tree's shape. Callers read fields; only the tree mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import final

import numpy as np

from jaxhicache.tree.arrays import TOK

_NO_SLOTS = np.zeros(0, np.int32)

__all__ = [
    "BackupPlan",
    "EvictResult",
    "InsertResult",
    "MatchResult",
    "TreeNode",
    "child_key",
    "salt_prefix",
]


def salt_prefix(salt: bytes | None) -> bytes:
    """What a salted chain's first page key starts with in the root's children:
    ``b""`` without a salt, else a 4-byte little-endian length and the salt. Unsalted
    keys are exactly one page long and salted ones longer, and the length makes the
    prefix self-delimiting, so two (salt, first page) pairs share a key only if equal."""
    if salt is None:
        return b""
    return len(salt).to_bytes(4, "little") + salt


def child_key(n: TreeNode, page_bytes: int) -> bytes:
    """The key of ``n`` in its parent's ``children``: its first page's token bytes,
    behind :func:`salt_prefix` for a child of the root (``start == 0``)."""
    if n.start or n.salt is None:
        return n.key[:page_bytes]
    return salt_prefix(n.salt) + n.key[:page_bytes]


@final
class TreeNode:
    """A run of whole pages. Fields are read-only for callers; mutate through the tree.

    Args:
      node_id: a unique id within the tree (the root's is 0).
      key: int64 token bytes of this node's pages.
      num_pages: pages in the run.
      start: page index of the first page along the root path.
      parent: the parent node (``None`` for the root).
      salt: the path's cache salt as bytes (``None`` = unsalted).
    """

    __slots__ = (
        "children",
        "device_full",
        "device_swa",
        "hit_count",
        "host_full",
        "host_prot_live",
        "host_swa",
        "host_swa_live",
        "id",
        "key",
        "last_access",
        "lock_ref",
        "n_dev_children",
        "num_pages",
        "own_locks",
        "page_hashes",
        "parent",
        "prot",
        "prot_dist",
        "salt",
        "short",
        "start",
        "state_access",
        "state_dev",
        "state_host",
        "swa_hi",
        "swa_live",
        "swa_lo",
        "swa_prot_live",
        "swa_tail",
    )

    def __init__(self, node_id: int, key: bytes, num_pages: int, start: int, parent, salt=None):
        self.id = node_id
        self.key = key  # int64 token bytes of this node's pages
        self.num_pages = num_pages
        self.start = start  # page index of the first page along the root path
        self.parent: TreeNode | None = parent
        # Keyed by the child's first page (the root's: salt prefix + first page, see
        # child_key).
        self.children: dict[bytes, TreeNode] = {}
        self.salt: bytes | None = salt  # the path's cache salt (None = unsalted)
        self.page_hashes: list[str] | None = None  # hex L3 hash per page, filled lazily
        self.device_full: np.ndarray | None = None
        self.device_swa: np.ndarray | None = None
        self.host_full: np.ndarray | None = None
        self.host_swa: np.ndarray | None = None
        self.lock_ref = 0  # locks on this node or below
        self.own_locks = 0  # locks ending exactly at this node
        self.last_access = 0  # operation counter, never wall time
        self.hit_count = 0
        self.n_dev_children = 0
        # ---- recurrent-state snapshot at this node's end (kept by tree.states.Snapshots):
        # slot ids, -1 = none (a split's upper part is a tombstone: no snapshot)
        self.state_dev = -1
        self.state_host = -1
        self.state_access = 0  # the snapshot's own LRU stamp
        # ---- SWA summaries (kept by jaxhicache.tree.window.SwaWindows)
        self.swa_live = 0  # device SWA pages >= 0
        self.host_swa_live = 0  # host SWA pages >= 0
        self.swa_tail = 0  # trailing run of pages with an SWA value (device or host)
        # Bounds on the live device SWA pages: none below swa_lo or at/after swa_hi.
        # They are exact (all pages in between live) when swa_hi - swa_lo == swa_live.
        self.swa_lo = num_pages
        self.swa_hi = 0
        self.short: set[TreeNode] | None = None  # children shorter than swa_pages
        # Pages from this node's end down to the nearest leaf end or lock end (capped
        # at swa_pages), and how many trailing pages that puts in a protected window.
        self.prot_dist = 0
        self.prot = 0
        self.swa_prot_live = 0  # live device SWA pages among the last `prot` pages
        self.host_prot_live = 0  # live host SWA pages among the last `prot` pages

    @property
    def is_root(self) -> bool:
        """Whether this is the tree's root (no parent, no pages)."""
        return self.parent is None and self.start == 0 and self.num_pages == 0

    @property
    def end(self) -> int:
        """Page index one past this node's last page (its depth in pages)."""
        return self.start + self.num_pages

    def tokens(self) -> np.ndarray:
        """This node's token ids.

        Returns:
          int64 ``[num_pages * page_size]``, a read-only view of ``key``.
        """
        return np.frombuffer(self.key, dtype=TOK)

    def __lt__(self, other: TreeNode) -> bool:  # deterministic heap tie-break
        return self.id < other.id

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, pages=[{self.start},{self.end}), "
            f"device={self.device_full is not None}, host={self.host_full is not None}, "
            f"lock_ref={self.lock_ref})"
        )


@final
@dataclass(slots=True)
class MatchResult:
    """Outcome of :meth:`RadixTree.match_prefix`. Lengths are in tokens.

    The usable prefix ``[0, matched_len)`` is ``[0, device_len)`` with full pages
    on device followed by ``[device_len, matched_len)`` on host only (to load
    back). Lock ``node`` to keep the prefix while it is used.

    Attributes:
      node: the node ending the usable prefix (the root for no match).
      matched_len: the usable prefix.
      device_len: its part on device.
      host_len: its part on host only.
      full_match_len: the page-wise match ignoring SWA (what a full-attention
        tree would return).
      device_full_ids: device full ids of ``[0, device_len)``.
      host_full_ids: host full ids of ``[device_len, matched_len)``.
      swa_window_pages: pages of the trailing window, ending at ``matched_len``.
      swa_device_ids: the device SWA id per window page, ``-1`` where it must be
        loaded from the host id in ``swa_host_ids``.
      swa_host_ids: the host SWA id per window page (``-1``: none needed).
      state_device_slot: trees with snapshots: ``node``'s device snapshot slot (the
        state at ``matched_len``; read it, never write it), ``-1`` = none.
      state_host_slot: ``node``'s host snapshot slot (load it when there is no
        device one), ``-1`` = none.
    """

    node: TreeNode
    matched_len: int
    device_len: int
    host_len: int
    full_match_len: int
    device_full_ids: np.ndarray
    host_full_ids: np.ndarray
    swa_window_pages: int
    swa_device_ids: np.ndarray
    swa_host_ids: np.ndarray
    state_device_slot: int = -1
    state_host_slot: int = -1

    @property
    def needs_load(self) -> bool:
        """True when something (full pages or window SWA pages) must come from host."""
        return self.host_len > 0 or bool(self.swa_host_ids.size and (self.swa_host_ids >= 0).any())


@final
@dataclass(slots=True)
class InsertResult:
    """Outcome of :meth:`RadixTree.insert`. The caller frees the returned ids.

    The tree never frees SWA pages at insert: out-of-window ones stay,
    reclaimable (``reclaim_swa``).

    Attributes:
      node: the node ending the inserted key.
      prefix_len: tokens already cached (device or host) before the insert.
      adopted_len: host-only tokens that took the caller's device ids.
      new_len: tokens in new nodes.
      dup_full_ids: the caller's full ids for pages that were already on device
        (the tree kept its own).
      free_swa_ids: the caller's SWA ids the tree did not take (their pages
        already had a device SWA page).
    """

    node: TreeNode
    prefix_len: int  # tokens already cached (device or host) before the insert
    adopted_len: int  # host-only tokens that took the caller's device ids
    new_len: int  # tokens in new nodes
    dup_full_ids: np.ndarray
    free_swa_ids: np.ndarray


@final
@dataclass(slots=True)
class EvictResult:
    """Ids freed by an eviction (device or host tier, as asked) and what happened.

    Attributes:
      full_ids: the freed full-page ids of the tier, for the caller to free.
      swa_ids: the freed SWA-page ids of the tier, for the caller to free.
      evicted_pages: full pages that left the tier.
      demoted_pages: device eviction: pages kept on host.
      deleted_pages: pages that left the tree.
      needs_backup: write-back device eviction: unbacked leaves left in place, to
        back up before they can go.
      state_ids: the snapshot slots of the tier that went with their nodes, for the
        caller to free.
    """

    full_ids: np.ndarray
    swa_ids: np.ndarray
    evicted_pages: int  # full pages that left the tier
    demoted_pages: int = 0  # device eviction: pages kept on host
    deleted_pages: int = 0  # pages that left the tree
    needs_backup: list[TreeNode] = field(default_factory=list)  # write_back leaves to back up
    state_ids: np.ndarray = field(default_factory=lambda: _NO_SLOTS)


@final
@dataclass(slots=True)
class BackupPlan:
    """Pages of the path ending at ``node`` that are not backed up yet (root order).

    Attributes:
      node: the node the plan was made for.
      nodes: the unbacked nodes ending its path, root first.
      num_pages: their pages.
      device_full_ids: their device full ids, to copy.
      device_swa_ids: their device SWA ids (``-1`` = tombstone, nothing to copy).
    """

    node: TreeNode
    nodes: list[TreeNode]
    num_pages: int
    device_full_ids: np.ndarray
    device_swa_ids: np.ndarray  # -1 = tombstone (nothing to copy)
