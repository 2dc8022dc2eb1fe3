"""Paged radix tree over token ids with FULL and SWA components on device and host.

Pure Python/numpy bookkeeping (the control plane): the tree never allocates or
frees pages itself. Every method that drops a value returns the ids so the
caller (``HiCache``) frees them with its :class:`~jaxhicache.pools.allocator.PageAllocator`.

Model
-----
* A key is a sequence of token ids; the tree stores whole pages of
  ``page_size`` tokens. A node is a run of ``num_pages`` pages with one value per
  page and component:

  ======================  =====================================================
  ``device_full``         int32 device full-page id per page, or ``None``
  ``host_full``           int32 host full-page id per page, or ``None``
  ``device_swa``          int32 device SWA-page id per page, ``-1`` = tombstone
                          (``None`` exactly when ``device_full`` is ``None``)
  ``host_swa``            same on host (``None`` exactly when ``host_full`` is)
  ======================  =====================================================

* Residency invariants: every node holds a device or a host value; device
  resident nodes form a prefix-closed set (a device node's parent is on device),
  and so do backed-up nodes (DESIGN §7). Locks count along the path to the root.
* Hit policy (DESIGN §4): full-page pools need every page of a prefix; SWA and
  the C4 compressor states only the trailing ``swa_pages`` pages. A prefix is
  usable up to the longest page boundary whose trailing ``swa_pages`` pages all
  have an SWA value (on device, or on host to load back). Older tombstones never
  veto a hit.
* SWA tombstone rule (applied after every insert, and by ``tombstone_swa``):
  a device SWA page is freed when it is older than the trailing ``swa_pages``
  pages of the sequence just inserted and is not within the trailing
  ``swa_pages`` pages of a *protected boundary* below it. Protected boundaries
  are the ends of leaves (cached sequences nobody extended), the ends of nodes
  a lock ends at (requests in flight read that window), and, with
  ``protect_branch_points`` (default), ends of nodes with two or more children
  (where cached sequences diverge, i.e. where later requests stop matching).
  Locked windows are released lazily: the next insert through the path (or an
  explicit ``tombstone_swa``) frees them. Host SWA pages are never tombstoned;
  host eviction frees them.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BackupPlan",
    "EvictResult",
    "InsertResult",
    "MatchResult",
    "RadixTree",
    "TreeNode",
    "WritePolicy",
    "should_backup_on_hit",
    "should_backup_on_insert",
]

_I32 = np.int32
_I32_DT = np.dtype(np.int32)
_EMPTY = np.zeros(0, dtype=_I32)
_EMPTY.setflags(write=False)
_TOK = np.int64
_TOK_DT = np.dtype(np.int64)
_TOK_BYTES = 8
# np.concatenate without the __array_function__ dispatch layer (all inputs here are
# plain int32 ndarrays); falls back to the public function if numpy lacks it.
_concat = getattr(np.concatenate, "_implementation", np.concatenate)


# --------------------------------------------------------------------------- policies
class WritePolicy(enum.Enum):
    """When device pages are backed up to host (DESIGN §7)."""

    WRITE_THROUGH = "write_through"  # back up on insert
    WRITE_THROUGH_SELECTIVE = "write_through_selective"  # back up once a node was hit twice
    WRITE_BACK = "write_back"  # back up when evicted from device


SELECTIVE_HIT_THRESHOLD = 2


def should_backup_on_insert(policy: WritePolicy, node: TreeNode) -> bool:
    """True when ``policy`` wants ``node`` (and its unbacked ancestors) backed up after insert."""
    return policy is WritePolicy.WRITE_THROUGH and not node.is_root and node.host_full is None


def should_backup_on_hit(policy: WritePolicy, node: TreeNode) -> bool:
    """True when a match on ``node`` should trigger a backup (selective: from the second hit)."""
    return (
        policy is WritePolicy.WRITE_THROUGH_SELECTIVE
        and not node.is_root
        and node.host_full is None
        and node.hit_count >= SELECTIVE_HIT_THRESHOLD
    )


# --------------------------------------------------------------------------- node
class TreeNode:
    """A run of whole pages. Fields are read-only for callers; mutate through the tree."""

    __slots__ = (
        "children",
        "device_full",
        "device_swa",
        "hit_count",
        "host_full",
        "host_swa",
        "host_swa_live",
        "id",
        "key",
        "last_access",
        "lock_ref",
        "n_dev_children",
        "num_pages",
        "own_locks",
        "parent",
        "short",
        "start",
        "swa_hi",
        "swa_live",
        "swa_lo",
        "swa_tail",
    )

    def __init__(self, node_id: int, key: bytes, num_pages: int, start: int, parent):
        self.id = node_id
        self.key = key  # int64 token bytes of this node's pages
        self.num_pages = num_pages
        self.start = start  # page index of the first page along the root path
        self.parent = parent
        self.children: dict[bytes, TreeNode] = {}
        self.device_full: np.ndarray | None = None
        self.device_swa: np.ndarray | None = None
        self.host_full: np.ndarray | None = None
        self.host_swa: np.ndarray | None = None
        self.lock_ref = 0  # locks on this node or below
        self.own_locks = 0  # locks ending exactly at this node
        self.last_access = 0
        self.hit_count = 0
        self.n_dev_children = 0
        self.swa_live = 0  # device SWA pages >= 0
        self.host_swa_live = 0
        self.swa_tail = 0  # trailing run of pages with an SWA value (device or host)
        # Bounds on the live device SWA pages: none below swa_lo or at/after swa_hi.
        # They are exact (all pages in between live) when swa_hi - swa_lo == swa_live.
        self.swa_lo = num_pages
        self.swa_hi = 0
        self.short: set[TreeNode] | None = None  # children shorter than swa_pages

    @property
    def is_root(self) -> bool:
        return self.parent is None and self.start == 0 and self.num_pages == 0

    @property
    def end(self) -> int:
        """Page index one past this node's last page (its depth in pages)."""
        return self.start + self.num_pages

    @property
    def on_device(self) -> bool:
        return self.device_full is not None

    @property
    def backed_up(self) -> bool:
        return self.host_full is not None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def tokens(self) -> np.ndarray:
        """This node's token ids (int64)."""
        return np.frombuffer(self.key, dtype=_TOK)

    def __lt__(self, other: TreeNode) -> bool:  # deterministic heap tie-break
        return self.id < other.id

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, pages=[{self.start},{self.end}), "
            f"device={self.on_device}, host={self.backed_up}, lock_ref={self.lock_ref})"
        )


# --------------------------------------------------------------------------- results
@dataclass(slots=True)
class MatchResult:
    """Outcome of :meth:`RadixTree.match_prefix`. Lengths are in tokens.

    The usable prefix ``[0, matched_len)`` is ``[0, device_len)`` with full pages
    on device (``device_full_ids``) followed by ``[device_len, matched_len)`` on
    host only (``host_full_ids``, to load back). ``swa_device_ids`` /
    ``swa_host_ids`` cover the trailing window (``swa_window_pages`` pages ending
    at ``matched_len``): the device SWA id per page, ``-1`` where it must be
    loaded from the host id given in ``swa_host_ids``. ``full_match_len`` is
    the page-wise match ignoring SWA (what a full-attention tree would return).
    Lock ``node`` to keep the prefix while it is used.
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

    @property
    def needs_load(self) -> bool:
        """True when something (full pages or window SWA pages) must come from host."""
        return self.host_len > 0 or bool(self.swa_host_ids.size and (self.swa_host_ids >= 0).any())


@dataclass(slots=True)
class InsertResult:
    """Outcome of :meth:`RadixTree.insert`. The caller frees the returned ids.

    ``dup_full_ids``: the caller's full ids for pages that were already on device
    (the tree kept its own). ``dup_swa_ids``: caller SWA ids not taken.
    ``tombstoned_swa_ids``: device SWA ids the tombstone rule released.
    """

    node: TreeNode
    prefix_len: int  # tokens already cached (device or host) before the insert
    adopted_len: int  # host-only tokens that took the caller's device ids
    new_len: int  # tokens in new nodes
    dup_full_ids: np.ndarray
    dup_swa_ids: np.ndarray
    tombstoned_swa_ids: np.ndarray

    @property
    def free_swa_ids(self) -> np.ndarray:
        """All device SWA ids the caller must free."""
        if not self.tombstoned_swa_ids.size:
            return self.dup_swa_ids
        if not self.dup_swa_ids.size:
            return self.tombstoned_swa_ids
        return _concat([self.dup_swa_ids, self.tombstoned_swa_ids])


@dataclass(slots=True)
class EvictResult:
    """Ids freed by an eviction (device or host tier, as asked) and what happened."""

    full_ids: np.ndarray
    swa_ids: np.ndarray
    evicted_pages: int  # full pages that left the tier
    demoted_pages: int = 0  # device eviction: pages kept on host
    deleted_pages: int = 0  # pages that left the tree
    needs_backup: list[TreeNode] = field(default_factory=list)  # write_back leaves to back up


@dataclass(slots=True)
class BackupPlan:
    """Pages of the path ending at ``node`` that are not backed up yet (root order)."""

    node: TreeNode
    nodes: list[TreeNode]
    num_pages: int
    device_full_ids: np.ndarray
    device_swa_ids: np.ndarray  # -1 = tombstone (nothing to copy)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return _EMPTY
    if len(parts) == 1:
        return parts[0].copy()
    return _concat(parts)


def _ids(x, what: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype is _I32_DT and x.ndim == 1:
        return x
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of page ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer page ids, got dtype {arr.dtype}")
    if arr.dtype != _I32:
        arr = arr.astype(_I32)
    return arr


# --------------------------------------------------------------------------- tree
class RadixTree:
    """Paged radix tree with device/host residency per node (see module docstring).

    Args:
      page_size: tokens per page (>= 1).
      swa_pages: trailing pages that cover the sliding window (0 = no SWA
        component: a plain full-attention tree).
      write_policy: default for :meth:`evict_device` (``WRITE_BACK`` reports
        unbacked leaves instead of deleting them); otherwise informational.
      protect_branch_points: keep the SWA window before branch points (see module docstring).
    """

    def __init__(
        self,
        page_size: int,
        swa_pages: int = 0,
        *,
        write_policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
        protect_branch_points: bool = True,
    ):
        if int(page_size) != page_size or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if int(swa_pages) != swa_pages or swa_pages < 0:
            raise ValueError(f"swa_pages must be a non-negative integer, got {swa_pages!r}")
        self.page_size = int(page_size)
        self.swa_pages = int(swa_pages)
        self.write_policy = WritePolicy(write_policy)
        self.protect_branch_points = bool(protect_branch_points)
        self._pb = self.page_size * _TOK_BYTES
        self._next_id = 1
        self._tick = 0
        self._root = TreeNode(0, b"", 0, 0, None)
        self._root.device_full = _EMPTY
        self._root.host_full = _EMPTY
        self._num_nodes = 0
        self._dev_pages = 0
        self._host_pages = 0
        self._dev_swa = 0
        self._host_swa = 0
        self._evict_dev = 0
        self._evict_host = 0
        self._dev_leaves: set[TreeNode] = set()
        self._host_leaves: set[TreeNode] = set()
        self._neg_buf = _EMPTY
        self._neg_swa = self._neg(self.swa_pages)  # read-only: shared by every match

    # ------------------------------------------------------------------ counters (O(1))
    @property
    def root(self) -> TreeNode:
        return self._root

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    def total_device_pages(self) -> int:
        """Full pages with a device value."""
        return self._dev_pages

    def total_host_pages(self) -> int:
        """Full pages with a host value."""
        return self._host_pages

    def total_device_swa_pages(self) -> int:
        return self._dev_swa

    def total_host_swa_pages(self) -> int:
        return self._host_swa

    def evictable_device_pages(self) -> int:
        """Device full pages in unlocked nodes."""
        return self._evict_dev

    def evictable_host_pages(self) -> int:
        """Host full pages in unlocked host-only nodes."""
        return self._evict_host

    def protected_device_pages(self) -> int:
        return self._dev_pages - self._evict_dev

    # ------------------------------------------------------------------ keys
    def _key_bytes(self, key, aligned: bool) -> tuple[bytes, int]:
        if type(key) is np.ndarray and key.dtype is _TOK_DT and key.ndim == 1:  # fast path
            n = len(key)
            pages = n // self.page_size
            if pages * self.page_size == n:
                return key.tobytes(), pages
            if not aligned:
                return key[: pages * self.page_size].tobytes(), pages
        arr = key if isinstance(key, np.ndarray) else np.asarray(key)
        if arr.ndim != 1:
            raise ValueError(f"key must be 1-D token ids, got shape {arr.shape}")
        n = arr.shape[0]
        if n and arr.dtype.kind not in "iu":
            raise ValueError(f"key must hold integer token ids, got dtype {arr.dtype}")
        ps = self.page_size
        pages = n // ps
        if pages * ps != n:
            if aligned:
                raise ValueError(
                    f"key length {n} is not a multiple of page_size {ps} "
                    f"(insert needs whole pages; {n % ps} trailing tokens)"
                )
            arr = arr[: pages * ps]
        if arr.dtype != _TOK:
            arr = arr.astype(_TOK)
        return arr.tobytes(), pages

    def _common_pages(self, ck: bytes, kb: bytes, off: int) -> int:
        n = min(len(ck), len(kb) - off) // _TOK_BYTES
        a = np.frombuffer(ck, dtype=_TOK, count=n)
        b = np.frombuffer(kb, dtype=_TOK, count=n, offset=off)
        neq = a != b
        i = int(neq.argmax())
        if not neq[i]:
            i = n
        return i // self.page_size

    def _new_node(self, key: bytes, num_pages: int, start: int, parent: TreeNode) -> TreeNode:
        node = TreeNode(self._next_id, key, num_pages, start, parent)
        self._next_id += 1
        self._num_nodes += 1
        return node

    # ------------------------------------------------------------------ residency helpers
    def _swa_array(self, k: int, part: np.ndarray | None) -> tuple:
        """A k-page device SWA array whose last ``len(part)`` entries come from ``part``
        (the rest tombstones); returns (array, live count, live lo, live hi)."""
        if part is None or not part.size:
            return np.full(k, -1, dtype=_I32), 0, k, 0
        q = part.size
        arr = _concat((self._neg(k - q), part)) if q < k else part.copy()
        if part[part.argmin()] >= 0:
            return arr, q, k - q, k
        live = np.flatnonzero(part >= 0)
        if not live.size:
            return arr, 0, k, 0
        return arr, int(live.size), k - q + int(live[0]), k - q + int(live[-1]) + 1

    def _set_device(self, n: TreeNode, full: np.ndarray, swa: tuple | None) -> None:
        """Give a node without a device value its device value; keeps all counters."""
        k = n.num_pages
        n.device_full = full
        self._dev_pages += k
        if n.lock_ref == 0:
            self._evict_dev += k
            if n.host_full is not None:
                self._evict_host -= k
        if self.swa_pages:
            arr, live, lo, hi = swa if swa is not None else self._swa_array(k, None)
            n.device_swa = arr
            n.swa_live = live
            n.swa_lo = lo
            n.swa_hi = hi
            self._dev_swa += live
            if n.host_full is None and (live == 0 or (hi == k and live == k - lo)):
                n.swa_tail = live  # the live pages are exactly the trailing ones
            else:
                self._recompute_tail(n)
        p = n.parent
        p.n_dev_children += 1
        if p.n_dev_children == 1:
            self._dev_leaves.discard(p)
        if n.n_dev_children == 0:
            self._dev_leaves.add(n)
        self._host_leaves.discard(n)

    def _clear_device(self, n: TreeNode, full_out: list, swa_out: list) -> None:
        """Drop a node's device value; appends the freed ids to the lists."""
        k = n.num_pages
        full_out.append(n.device_full)
        n.device_full = None
        self._dev_pages -= k
        if n.lock_ref == 0:
            self._evict_dev -= k
            if n.host_full is not None:
                self._evict_host += k
        if self.swa_pages:
            swa = n.device_swa
            if n.swa_live:
                if n.swa_hi - n.swa_lo == n.swa_live:
                    swa_out.append(swa[n.swa_lo : n.swa_hi])
                else:
                    swa_out.append(swa[swa >= 0])
            self._dev_swa -= n.swa_live
            n.device_swa = None
            n.swa_live = 0
            n.swa_lo = k
            n.swa_hi = 0
            self._recompute_tail(n)
        self._dev_leaves.discard(n)
        p = n.parent
        p.n_dev_children -= 1
        if p.n_dev_children == 0 and p.parent is not None and p.device_full is not None:
            self._dev_leaves.add(p)
        if n.host_full is not None and not n.children:
            self._host_leaves.add(n)

    def _set_host(self, n: TreeNode, full: np.ndarray, swa: np.ndarray | None) -> None:
        k = n.num_pages
        n.host_full = full
        self._host_pages += k
        if n.device_full is None and n.lock_ref == 0:
            self._evict_host += k
        if self.swa_pages:
            if swa is None:
                swa = np.full(k, -1, dtype=_I32)
            n.host_swa = swa
            n.host_swa_live = int(np.count_nonzero(swa >= 0))
            self._host_swa += n.host_swa_live
            self._recompute_tail(n)

    def _detach(self, n: TreeNode) -> None:
        """Remove a childless node without values from its parent."""
        p = n.parent
        del p.children[n.key[: self._pb]]
        if p.short is not None:
            p.short.discard(n)
        n.parent = None
        self._num_nodes -= 1
        if (
            p.parent is not None
            and not p.children
            and p.device_full is None
            and p.host_full is not None
        ):
            self._host_leaves.add(p)

    def _recompute_tail(self, n: TreeNode) -> None:
        d, h = n.device_swa, n.host_swa
        k = n.num_pages
        if n.swa_live == k or n.host_swa_live == k:
            n.swa_tail = k
            return
        if n.swa_live + n.host_swa_live == 0:
            n.swa_tail = 0
            return
        if d is not None:
            a = d >= 0
            if h is not None:
                a |= h >= 0
        else:
            a = h >= 0
        r = a[::-1]
        i = int(r.argmin())
        n.swa_tail = k if r[i] else i

    def _avail(self, n: TreeNode) -> np.ndarray:
        d, h = n.device_swa, n.host_swa
        if d is not None:
            a = d >= 0
            if h is not None:
                a |= h >= 0
            return a
        if h is not None:
            return h >= 0
        return np.zeros(n.num_pages, dtype=bool)

    # ------------------------------------------------------------------ split
    def _split(self, child: TreeNode, k: int) -> TreeNode:
        """Split ``child`` after ``k`` pages; returns the new upper node (the original
        object keeps the lower part, so references to deep nodes stay valid)."""
        pb = self._pb
        ck = child.key
        p = child.parent
        new = self._new_node(ck[: k * pb], k, child.start, p)
        child.key = ck[k * pb :]
        child.num_pages -= k
        child.start += k
        child.parent = new
        new.children[child.key[:pb]] = child
        p.children[new.key[:pb]] = new
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
        swa = self.swa_pages
        if swa:
            if child.device_swa is not None:
                top = child.device_swa[:k]
                new.device_swa = top
                child.device_swa = child.device_swa[k:]
                lo, hi, live = child.swa_lo, child.swa_hi, child.swa_live
                if lo >= k:
                    c = 0
                elif hi <= k:
                    c = live
                elif hi - lo == live:  # dense: count by arithmetic
                    c = k - lo
                else:
                    c = int(np.count_nonzero(top >= 0))
                new.swa_live = c
                child.swa_live -= c
            new.swa_lo = min(child.swa_lo, k)
            new.swa_hi = min(child.swa_hi, k)
            child.swa_lo = max(0, child.swa_lo - k)
            child.swa_hi = max(0, child.swa_hi - k)
            if not new.swa_live:
                new.swa_lo, new.swa_hi = k, 0
            if not child.swa_live:
                child.swa_lo, child.swa_hi = child.num_pages, 0
            if child.host_swa is not None:
                top = child.host_swa[:k]
                new.host_swa = top
                child.host_swa = child.host_swa[k:]
                c = int(np.count_nonzero(top >= 0))
                new.host_swa_live = c
                child.host_swa_live -= c
            self._recompute_tail(new)
            self._recompute_tail(child)
            if p.short is not None:
                p.short.discard(child)
            if k < swa:
                if p.short is None:
                    p.short = set()
                p.short.add(new)
            if child.num_pages < swa:
                new.short = {child}
        return new

    # ------------------------------------------------------------------ match
    def match_prefix(self, key) -> MatchResult:
        """Longest usable page-aligned prefix of ``key`` (any length; whole pages only).

        Splits a node where the match ends inside it, bumps ``last_access`` and
        ``hit_count`` along the usable path.
        """
        if type(key) is np.ndarray and key.dtype is _TOK_DT and key.ndim == 1:  # fast path
            ps = self.page_size
            n = len(key)
            r = n % ps
            kb = key.tobytes() if not r else key[: n - r].tobytes()
        else:
            kb, _ = self._key_bytes(key, aligned=False)
        pb = self._pb
        end = len(kb)
        node = self._root
        children = node.children
        path: list[TreeNode] = []
        pos = 0
        while pos < end:
            child = children.get(kb[pos : pos + pb])
            if child is None:
                break
            ck = child.key
            if kb.startswith(ck, pos):
                path.append(child)
                pos += len(ck)
                children = child.children
                continue
            m = self._common_pages(ck, kb, pos)
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
                    usable = self._usable_boundary(path, full_pages)
                    break
                run += t
                i -= 1
                if i < 0:
                    break
            if usable < full_pages:
                path = self._cut_path(path, usable)
        self._tick += 1
        tick = self._tick
        dev_parts = []
        host_parts = []
        for n in path:
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
            dev_ids = _concat(dev_parts) if dev_parts else _EMPTY
        host_ids = _cat(host_parts) if host_parts else _EMPTY
        if swa and usable:
            n = path[-1]
            k = n.num_pages
            if usable >= swa and n.host_swa is None:
                # Fast paths of _window: the window lies in the last one or two
                # nodes and nothing is on host.
                w = swa
                swa_host = self._neg_swa
                if k >= w:
                    swa_dev = n.device_swa[k - w :].copy()
                else:
                    p = path[-2] if len(path) > 1 else None
                    if p is not None and p.host_swa is None and p.num_pages + k >= w:
                        swa_dev = _concat((p.device_swa[p.num_pages + k - w :], n.device_swa))
                    else:
                        swa_dev, swa_host = self._window(path, w)
            else:
                w = swa if swa < usable else usable
                swa_dev, swa_host = self._window(path, w)
        else:
            w = 0
            swa_dev = swa_host = _EMPTY
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

    def _usable_boundary(self, path: list[TreeNode], full_pages: int) -> int:
        """Largest page boundary b <= full_pages whose trailing window has SWA values."""
        avail = _concat([self._avail(n) for n in path])
        bad = np.flatnonzero(~avail)
        if bad.size == 0 or full_pages - 1 - int(bad[-1]) >= self.swa_pages:
            return full_pages
        # b = bad[k] is usable iff the run before it is long enough (or k == 0).
        gaps = np.diff(bad) - 1
        ok = np.flatnonzero(gaps >= self.swa_pages)
        k = int(ok[-1]) + 1 if ok.size else 0
        return int(bad[k])

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

    def _neg(self, k: int) -> np.ndarray:
        """Read-only view of ``k`` entries of -1."""
        buf = self._neg_buf
        if buf.size < k:
            buf = np.full(max(k, 2 * buf.size), -1, dtype=_I32)
            buf.setflags(write=False)
            self._neg_buf = buf
        return buf[:k]

    def _window(self, path: list[TreeNode], w: int) -> tuple[np.ndarray, np.ndarray]:
        n = path[-1]
        k = n.num_pages
        neg = self._neg_swa if w == self.swa_pages else self._neg(w)
        if n.host_swa is None:
            if k >= w:  # common case: one node, nothing on host
                return n.device_swa[k - w :].copy(), neg
            if len(path) > 1:  # next common case: two nodes, nothing on host
                p = path[-2]
                pk = p.num_pages
                if pk + k >= w and p.host_swa is None:
                    return _concat((p.device_swa[pk + k - w :], n.device_swa)), neg
        dev_parts = []
        nodes = []
        need = w
        any_host = False
        for n in reversed(path):
            take = min(need, n.num_pages)
            lo = n.num_pages - take
            dev_parts.append(n.device_swa[lo:] if n.device_swa is not None else self._neg(take))
            nodes.append((n, lo))
            any_host |= n.host_swa is not None
            need -= take
            if not need:
                break
        dev = _concat(dev_parts[::-1]) if len(dev_parts) > 1 else dev_parts[0].copy()
        if not any_host:
            return dev, neg
        host = _concat(
            [
                n.host_swa[lo:] if n.host_swa is not None else self._neg(n.num_pages - lo)
                for n, lo in nodes[::-1]
            ]
        )
        host[dev >= 0] = -1  # only pages that must come from host
        return dev, host

    def cached_len(self, key) -> int:
        """Tokens of ``key`` present in the tree page-wise (no SWA rule, no side effects)."""
        kb, _ = self._key_bytes(key, aligned=False)
        pb = self._pb
        node = self._root
        pos = 0
        while pos < len(kb):
            child = node.children.get(kb[pos : pos + pb])
            if child is None:
                break
            if kb.startswith(child.key, pos):
                pos += len(child.key)
                node = child
                continue
            pos += self._common_pages(child.key, kb, pos) * pb
            break
        return pos // _TOK_BYTES

    # ------------------------------------------------------------------ insert
    def insert(self, key, full_device_ids, swa_device_ids=None) -> InsertResult:
        """Insert a page-aligned ``key``.

        ``full_device_ids`` holds the caller's own device full-page ids for the
        *trailing* ``n`` pages of the key (``n <= pages``); the leading pages
        must already be cached on device (typically the caller's locked match).
        ``swa_device_ids`` (optional, right-aligned too, any length up to the
        key's pages, ``-1`` = none) are the caller's device SWA ids.

        Pages already on device keep their values; the caller's ids for them
        come back in ``dup_full_ids`` / ``dup_swa_ids`` (SWA tombstones are
        filled with the caller's id instead). Host-only pages adopt the caller's
        device ids. New pages get the caller's ids. Then the SWA tombstone rule
        runs over the path.
        """
        ps = self.page_size
        if (
            type(key) is np.ndarray and key.dtype is _TOK_DT and key.ndim == 1 and not len(key) % ps
        ):  # fast path
            kb = key.tobytes()
            P = len(key) // ps
        else:
            kb, P = self._key_bytes(key, aligned=True)
        full = full_device_ids
        if not (type(full) is np.ndarray and full.dtype is _I32_DT and full.ndim == 1):
            full = _ids(full, "full_device_ids")
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
            if not (type(sw) is np.ndarray and sw.dtype is _I32_DT and sw.ndim == 1):
                sw = _ids(sw, "swa_device_ids")
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
        self._tick += 1
        tick = self._tick
        # Phase 1: walk (splits and access times only), validate before any value changes.
        while pos < P:
            off = pos * pb
            child = node.children.get(kb[off : off + pb])
            if child is None:
                break
            if kb.startswith(child.key, off):
                m = child.num_pages
            else:
                m = self._common_pages(child.key, kb, off)
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
        for child in path:
            s0 = child.start
            e = s0 + child.num_pages
            if e <= lim:
                continue
            if child.device_full is not None:
                if e > own:
                    dup_end = e
                if sw is not None and e > sw_start:
                    self._merge_swa(child, s0, sw, sw_start, dup_swa)
            else:
                s = None
                if sw is not None and e > sw_start:
                    lo = max(s0, sw_start)
                    s = self._swa_array(child.num_pages, sw[lo - sw_start : e - sw_start])
                self._set_device(child, full[s0 - own : e - own].copy(), s)
                adopted += child.num_pages
        if pos < P:
            # New leaf: _new_node + _set_device inlined (a fresh node is unlocked,
            # host-less, childless, and its parent is on device by now).
            k = P - pos
            off = pos * pb
            new = TreeNode(self._next_id, kb[off:], k, pos, node)
            self._next_id += 1
            self._num_nodes += 1
            node.children[kb[off : off + pb]] = new
            new.last_access = tick
            new.device_full = full.copy() if pos == own else full[pos - own :].copy()
            self._dev_pages += k
            self._evict_dev += k
            if swa:
                if k < swa:
                    if node.short is None:
                        node.short = {new}
                    else:
                        node.short.add(new)
                if sw is not None:
                    part = sw if sw_start >= pos else sw[pos - sw_start :]
                    arr, live, lo, hi = self._swa_array(k, part)
                else:
                    arr, live, lo, hi = self._swa_array(k, None)
                new.device_swa = arr
                new.swa_live = live
                new.swa_lo = lo
                new.swa_hi = hi
                self._dev_swa += live
                if live == 0 or (hi == k and live == k - lo):
                    new.swa_tail = live  # the live pages are exactly the trailing ones
                else:
                    self._recompute_tail(new)
            node.n_dev_children += 1
            if node.n_dev_children == 1:
                self._dev_leaves.discard(node)
            self._dev_leaves.add(new)
            path.append(new)
        tomb = self._tombstone(path, P - swa) if swa else _EMPTY
        ps = self.page_size
        return InsertResult(  # positional: noticeably cheaper than keywords
            path[-1] if path else self._root,  # node
            prefix * ps,  # prefix_len
            adopted * ps,  # adopted_len
            (P - prefix) * ps,  # new_len
            full[: dup_end - own].copy() if dup_end > own else _EMPTY,  # dup_full_ids
            _cat(dup_swa) if dup_swa else _EMPTY,  # dup_swa_ids
            tomb,  # tombstoned_swa_ids
        )

    def _merge_swa(self, n: TreeNode, pos: int, sw: np.ndarray, sw_start: int, dup_out) -> None:
        """Caller SWA ids over an existing device node: fill tombstones, report the rest."""
        lo = max(pos, sw_start)
        give = sw[lo - sw_start : pos + n.num_pages - sw_start]
        tree = n.device_swa[lo - pos :]
        has = give >= 0
        fill = has & (tree < 0)
        dup = give[has & ~fill & (give != tree)]  # the tree's own ids are not duplicates
        if dup.size:
            dup_out.append(dup)
        idx = np.flatnonzero(fill)
        c = idx.size
        if c:
            tree[idx] = give[idx]
            n.swa_live += c
            self._dev_swa += c
            base = lo - pos
            if base + int(idx[0]) < n.swa_lo:
                n.swa_lo = base + int(idx[0])
            if base + int(idx[-1]) + 1 > n.swa_hi:
                n.swa_hi = base + int(idx[-1]) + 1
            self._recompute_tail(n)

    # ------------------------------------------------------------------ SWA tombstones
    def _protected(self, n: TreeNode) -> bool:
        if n.own_locks:
            return True
        c = len(n.children)
        return c == 0 or (c >= 2 and self.protect_branch_points)

    def _min_prot_dist(self, n: TreeNode, budget: int) -> int:
        """Pages from ``n``'s end down to the nearest protected boundary (capped at budget)."""
        if self._protected(n):
            return 0
        best = budget
        if n.short:
            for c in n.short:
                k = c.num_pages
                if k < best:
                    d = k + self._min_prot_dist(c, best - k)
                    if d < best:
                        best = d
        return best

    def _tombstone(self, path: list[TreeNode], cand_end: int) -> np.ndarray:
        """Tombstone unprotected device SWA pages with page index < cand_end on ``path``."""
        swa = self.swa_pages
        if cand_end <= 0:
            return _EMPTY
        pbp = self.protect_branch_points
        freed = []
        for n in path:
            if not n.swa_live:
                continue
            s = n.start
            if s >= cand_end:
                break
            k = n.num_pages
            hi = cand_end - s
            if hi > k:
                hi = k
            lo = n.swa_lo
            if lo >= hi:
                continue
            ch = n.children
            if n.own_locks or not ch or (len(ch) > 1 and pbp):
                d = 0
            elif n.short:
                # _min_prot_dist(n, swa), walking chains of only children iteratively.
                d = 0
                c = n
                while True:
                    if len(c.children) != 1:
                        d += self._min_prot_dist(c, swa - d)
                        break
                    (c,) = c.short  # the only child, shorter than swa_pages
                    d += c.num_pages
                    if d >= swa:
                        d = swa
                        break
                    cc = c.children
                    if c.own_locks or not cc or (len(cc) > 1 and pbp):
                        break
                    if not c.short:
                        d = swa
                        break
            else:
                d = swa
            if d < swa:
                t = k - (swa - d)
                if t < hi:
                    hi = t
                    if lo >= hi:
                        continue
            if n.swa_hi - lo == n.swa_live:  # dense: every page in [lo, swa_hi) is live
                if n.swa_hi < hi:
                    hi = n.swa_hi
                seg = n.device_swa[lo:hi]
                ids = seg.copy()
            else:
                seg = n.device_swa[lo:hi]
                ids = seg[seg >= 0]
            c = ids.size
            if c:
                seg.fill(-1)
                n.swa_live -= c
                self._dev_swa -= c
                freed.append(ids)
                if n.host_swa is None:
                    if n.swa_tail > k - hi:
                        n.swa_tail = k - hi
                else:
                    self._recompute_tail(n)
            if n.swa_live:
                n.swa_lo = hi
            else:
                n.swa_lo, n.swa_hi = k, 0
        if not freed:
            return _EMPTY
        return freed[0] if len(freed) == 1 else _concat(freed)

    def tombstone_swa(self, node: TreeNode) -> np.ndarray:
        """Apply the tombstone rule to the path ending at ``node``: free every device SWA
        page on it that is not in the trailing window of a protected boundary (leaf end,
        lock end, branch point). Returns the freed ids. Use it after ``dec_lock`` to
        release a window the lock kept (an insert through the path does it too)."""
        if not self.swa_pages or node.parent is None:
            return _EMPTY
        return self._tombstone(self._path(node), node.end)

    # ------------------------------------------------------------------ locks
    def inc_lock(self, node: TreeNode) -> None:
        """Lock ``node`` and its ancestors (never evicted while locked)."""
        if node.parent is None:
            if node is self._root:
                return
            raise ValueError(f"inc_lock on a node that is no longer in the tree: {node!r}")
        node.own_locks += 1
        n = node
        while n.parent is not None:
            if n.lock_ref == 0:
                k = n.num_pages
                if n.device_full is not None:
                    self._evict_dev -= k
                elif n.host_full is not None:
                    self._evict_host -= k
            n.lock_ref += 1
            n = n.parent

    def dec_lock(self, node: TreeNode) -> None:
        """Undo one ``inc_lock(node)``. Below zero raises ``ValueError``."""
        if node.parent is None:
            if node is self._root:
                return
            raise ValueError(f"dec_lock on a node that is no longer in the tree: {node!r}")
        if node.own_locks <= 0:
            raise ValueError(
                f"dec_lock below zero on node {node.id} (own locks {node.own_locks}, "
                f"lock_ref {node.lock_ref})"
            )
        node.own_locks -= 1
        n = node
        while n.parent is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                k = n.num_pages
                if n.device_full is not None:
                    self._evict_dev += k
                elif n.host_full is not None:
                    self._evict_host += k
            n = n.parent

    # ------------------------------------------------------------------ eviction
    def evict_device(self, num_pages: int, *, write_back: bool | None = None) -> EvictResult:
        """Free at least ``num_pages`` device full pages (if possible), LRU over unlocked
        device leaves. Backed-up leaves are demoted (host kept); others are deleted,
        or with write-back (default: ``write_policy is WRITE_BACK``) reported in
        ``needs_backup`` and left in place."""
        wb = self.write_policy is WritePolicy.WRITE_BACK if write_back is None else write_back
        heap = [(n.last_access, n) for n in self._dev_leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        full_out: list[np.ndarray] = []
        swa_out: list[np.ndarray] = []
        needs: list[TreeNode] = []
        evicted = demoted = deleted = 0
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
                self._clear_device(n, full_out, swa_out)
                self._detach(n)
                deleted += k
            else:
                self._clear_device(n, full_out, swa_out)
                demoted += k
            evicted += k
            if p.lock_ref == 0 and p in self._dev_leaves:
                heapq.heappush(heap, (p.last_access, p))
        return EvictResult(
            full_ids=_cat(full_out),
            swa_ids=_cat(swa_out),
            evicted_pages=evicted,
            demoted_pages=demoted,
            deleted_pages=deleted,
            needs_backup=needs,
        )

    def evict_host(self, num_pages: int) -> EvictResult:
        """Free at least ``num_pages`` host full pages (if possible): LRU over unlocked
        host-only leaves, which leave the tree."""
        heap = [(n.last_access, n) for n in self._host_leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        full_out: list[np.ndarray] = []
        swa_out: list[np.ndarray] = []
        evicted = 0
        while evicted < num_pages and heap:
            _, n = heapq.heappop(heap)
            k = n.num_pages
            p = n.parent
            full_out.append(n.host_full)
            n.host_full = None
            self._host_pages -= k
            self._evict_host -= k  # unlocked host-only
            if self.swa_pages:
                if n.host_swa_live:
                    swa_out.append(n.host_swa[n.host_swa >= 0])
                self._host_swa -= n.host_swa_live
                n.host_swa = None
                n.host_swa_live = 0
                n.swa_tail = 0
            self._host_leaves.discard(n)
            self._detach(n)
            evicted += k
            if p in self._host_leaves and p.lock_ref == 0:
                heapq.heappush(heap, (p.last_access, p))
        return EvictResult(
            full_ids=_cat(full_out),
            swa_ids=_cat(swa_out),
            evicted_pages=evicted,
            deleted_pages=evicted,
        )

    # ------------------------------------------------------------------ backup / load back
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
        swa = [n.device_swa for n in nodes] if self.swa_pages else []
        return BackupPlan(
            node=node,
            nodes=nodes,
            num_pages=sum(n.num_pages for n in nodes),
            device_full_ids=_cat([n.device_full for n in nodes]),
            device_swa_ids=_cat(swa),
        )

    def _check_attached(self, node: TreeNode, what: str) -> None:
        if node.parent is None and node is not self._root:
            raise ValueError(f"{what}: node {node.id} is no longer in the tree")

    def mark_backed_up(
        self, node: TreeNode, host_full_ids, host_swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Record host copies for the pages of ``node``'s path that are not backed up.

        ``host_full_ids`` (root order) cover the trailing pages of the path and must
        be at least ``len(nodes_to_backup(node))`` pages; ``host_swa_ids`` (same
        length, ``-1`` = no SWA page copied) go with them. Leading surplus ids (pages
        an overlapping backup recorded meanwhile) are not used and come back as
        ``(unused_full_ids, unused_swa_ids)`` for the caller to free.
        """
        self._check_attached(node, "mark_backed_up")
        nodes = self.nodes_to_backup(node)
        k = sum(n.num_pages for n in nodes)
        full = _ids(host_full_ids, "host_full_ids")
        if full.size < k:
            raise ValueError(
                f"mark_backed_up(node {node.id}): {k} pages of its path are not backed up, "
                f"got only {full.size} host ids"
            )
        if full.size and full[full.argmin()] < 0:
            raise ValueError("host_full_ids must be >= 0")
        sw = None
        if self.swa_pages and host_swa_ids is not None:
            sw = _ids(host_swa_ids, "host_swa_ids")
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
            self._set_host(n, full[off:e].copy(), sw[off:e].copy() if sw is not None else None)
            off = e
        unused_swa = _EMPTY
        if sw is not None and extra:
            head = sw[:extra]
            unused_swa = head[head >= 0]
        return full[:extra].copy(), unused_swa

    def host_only_len(self, node: TreeNode) -> int:
        """Tokens at the end of ``node``'s path that are on host only."""
        k = 0
        n = node
        while n.parent is not None and n.device_full is None:
            k += n.num_pages
            n = n.parent
        return k * self.page_size

    def set_device_value(
        self, node: TreeNode, full_ids, swa_ids=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Load-back bookkeeping: device ids for the host-only pages ending ``node``'s path.

        ``full_ids`` (root order) cover the trailing pages of the path and must be at
        least ``host_only_len(node) / page_size`` ids. ``swa_ids`` (optional,
        right-aligned over the path, ``-1`` = none) fill device SWA tombstones, e.g.
        the trailing window loaded from host. Ids that are not needed (leading
        surplus full ids, SWA ids for pages that have a device SWA page already, as
        after an overlapping load or insert) come back as ``(unused_full_ids,
        unused_swa_ids)`` for the caller to free.
        """
        self._check_attached(node, "set_device_value")
        nodes = []
        n = node
        while n.parent is not None and n.device_full is None:
            nodes.append(n)
            n = n.parent
        nodes.reverse()
        k = sum(x.num_pages for x in nodes)
        full = _ids(full_ids, "full_ids")
        if full.size < k:
            raise ValueError(
                f"set_device_value(node {node.id}): {k} host-only pages end its path, "
                f"got only {full.size} device ids"
            )
        if full.size and full[full.argmin()] < 0:
            raise ValueError("full_ids must be >= 0")
        sw = None
        if self.swa_pages and swa_ids is not None:
            sw = _ids(swa_ids, "swa_ids")
            if sw.size > node.end:
                raise ValueError(f"swa_ids has {sw.size} ids but the path has {node.end} pages")
        extra = full.size - k
        off = extra
        for x in nodes:
            e = off + x.num_pages
            self._set_device(x, full[off:e].copy(), None)
            off = e
        unused_swa: list[np.ndarray] = []
        if sw is not None and sw.size:
            first = node.end - sw.size
            x = node
            while x.parent is not None and x.end > first:
                self._merge_swa(x, x.start, sw, first, unused_swa)
                x = x.parent
        return full[:extra].copy(), _cat(unused_swa)

    # ------------------------------------------------------------------ inspection
    def iter_nodes(self) -> Iterator[TreeNode]:
        """All nodes except the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_tokens(self, node: TreeNode) -> np.ndarray:
        """Token ids of the path from the root to the end of ``node``."""
        parts = [n.key for n in self._path(node)] if node.parent is not None else []
        return np.frombuffer(b"".join(parts), dtype=_TOK)

    def stats(self) -> dict:
        return {
            "nodes": self._num_nodes,
            "device_pages": self._dev_pages,
            "host_pages": self._host_pages,
            "device_swa_pages": self._dev_swa,
            "host_swa_pages": self._host_swa,
            "evictable_device_pages": self._evict_dev,
            "evictable_host_pages": self._evict_host,
        }

    def check_invariants(self) -> None:
        """Full O(tree) consistency check; raises ``AssertionError`` with a message."""
        root = self._root
        pb = self._pb
        swa = self.swa_pages
        dev, host, dswa, hswa = [], [], [], []
        cnt = dict.fromkeys(("dev", "host", "dswa", "hswa", "edev", "ehost", "nodes"), 0)
        dev_leaves, host_leaves = set(), set()

        def fail(msg: str) -> None:
            raise AssertionError(msg)

        stack = [root]
        while stack:
            p = stack.pop()
            child_locks = 0
            ndev = 0
            for kk, c in p.children.items():
                stack.append(c)
                child_locks += c.lock_ref
                ndev += c.device_full is not None
                tag = f"node {c.id}"
                if c.parent is not p:
                    fail(f"{tag}: parent pointer is not its parent {p.id}")
                if kk != c.key[:pb] or len(kk) != pb:
                    fail(f"{tag}: children key is not its first page")
                if c.num_pages < 1 or len(c.key) != c.num_pages * pb:
                    fail(f"{tag}: key of {len(c.key)} bytes is not {c.num_pages} whole pages")
                if c.start != p.start + p.num_pages:
                    fail(f"{tag}: start {c.start} != parent end {p.start + p.num_pages}")
                if c.device_full is None and c.host_full is None:
                    fail(f"{tag}: holds neither a device nor a host value")
                if c.device_full is not None and p.device_full is None:
                    fail(
                        f"{tag}: on device but its parent {p.id} is not (device not prefix-closed)"
                    )
                if c.host_full is not None and p.host_full is None:
                    fail(f"{tag}: backed up but its parent {p.id} is not (backup not a prefix)")
                if c.lock_ref < 0 or c.own_locks < 0:
                    fail(f"{tag}: negative lock count")
                if c.lock_ref > p.lock_ref and p is not root:
                    fail(f"{tag}: lock_ref {c.lock_ref} > parent's {p.lock_ref}")
                k = c.num_pages
                for arr, name, out in (
                    (c.device_full, "device_full", dev),
                    (c.host_full, "host_full", host),
                ):
                    if arr is not None:
                        if arr.shape != (k,) or arr.dtype != _I32:
                            fail(
                                f"{tag}: {name} shape {arr.shape} dtype {arr.dtype}, want ({k},) int32"
                            )
                        if (arr < 0).any():
                            fail(f"{tag}: {name} holds negative ids")
                        out.append(arr)
                if c.device_full is not None:
                    cnt["dev"] += k
                    if c.lock_ref == 0:
                        cnt["edev"] += k
                    if not any(g.device_full is not None for g in c.children.values()):
                        dev_leaves.add(c)
                if c.host_full is not None:
                    cnt["host"] += k
                    if c.device_full is None:
                        if c.lock_ref == 0:
                            cnt["ehost"] += k
                        if not c.children:
                            host_leaves.add(c)
                cnt["nodes"] += 1
                if swa:
                    for full_arr, swa_arr, name, out, live in (
                        (c.device_full, c.device_swa, "device_swa", dswa, c.swa_live),
                        (c.host_full, c.host_swa, "host_swa", hswa, c.host_swa_live),
                    ):
                        if (full_arr is None) != (swa_arr is None):
                            fail(f"{tag}: {name} present iff its full value is")
                        if swa_arr is None:
                            if live:
                                fail(f"{tag}: {name} live count {live} without values")
                            continue
                        if swa_arr.shape != (k,) or swa_arr.dtype != _I32:
                            fail(f"{tag}: {name} shape {swa_arr.shape}, want ({k},) int32")
                        if (swa_arr < -1).any():
                            fail(f"{tag}: {name} holds ids < -1")
                        got = swa_arr[swa_arr >= 0]
                        if got.size != live:
                            fail(f"{tag}: {name} live count {live} != {got.size}")
                        out.append(got)
                    if c.device_swa is not None:
                        cnt["dswa"] += c.swa_live
                        if (c.device_swa[: c.swa_lo] >= 0).any() or (
                            c.device_swa[max(0, c.swa_hi) :] >= 0
                        ).any():
                            fail(f"{tag}: live device SWA outside [{c.swa_lo}, {c.swa_hi})")
                    if c.host_swa is not None:
                        cnt["hswa"] += c.host_swa_live
                    a = self._avail(c)
                    run = 0
                    while run < k and a[k - 1 - run]:
                        run += 1
                    if run != c.swa_tail:
                        fail(f"{tag}: swa_tail {c.swa_tail} != {run}")
                    want_short = {g for g in c.children.values() if g.num_pages < swa}
                    if (c.short or set()) != want_short:
                        fail(f"{tag}: short-children set is stale")
            if p is not root and p.lock_ref != p.own_locks + child_locks:
                fail(
                    f"node {p.id}: lock_ref {p.lock_ref} != own {p.own_locks} + "
                    f"children {child_locks}"
                )
            if p.n_dev_children != ndev:
                fail(f"node {p.id}: n_dev_children {p.n_dev_children} != {ndev}")
            if p is root and swa:
                want_short = {g for g in p.children.values() if g.num_pages < swa}
                if (p.short or set()) != want_short:
                    fail("root: short-children set is stale")
        for parts, what in (
            (dev, "device full"),
            (host, "host full"),
            (dswa, "device SWA"),
            (hswa, "host SWA"),
        ):
            if parts:
                allids = _concat(parts)
                u, c = np.unique(allids, return_counts=True)
                if (c > 1).any():
                    fail(f"{what} page ids owned twice: {u[c > 1][:8].tolist()}")
        checks = (
            ("device pages", self._dev_pages, cnt["dev"]),
            ("host pages", self._host_pages, cnt["host"]),
            ("device SWA pages", self._dev_swa, cnt["dswa"]),
            ("host SWA pages", self._host_swa, cnt["hswa"]),
            ("evictable device pages", self._evict_dev, cnt["edev"]),
            ("evictable host pages", self._evict_host, cnt["ehost"]),
            ("nodes", self._num_nodes, cnt["nodes"]),
        )
        for what, have, want in checks:
            if have != want:
                fail(f"counter {what} = {have}, recomputed {want}")
        if dev_leaves != self._dev_leaves:
            fail("device-leaf set is stale")
        if host_leaves != self._host_leaves:
            fail("host-leaf set is stale")

    # ------------------------------------------------------------------ helpers for callers
    def device_ids_of(self, node: TreeNode) -> np.ndarray:
        """Device full ids of the whole path ending at ``node`` (must be on device)."""
        parts = []
        for n in self._path(node) if node.parent is not None else []:
            if n.device_full is None:
                raise ValueError(f"node {n.id} on the path is not on device")
            parts.append(n.device_full)
        return _cat(parts)
