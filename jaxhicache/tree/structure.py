"""The tree's node structure: where a key's pages sit, and the two walks that change it.

:class:`Structure` owns the root, the node ids and the access clock of one tree and
implements its structural algorithms: :meth:`~Structure.match` (the longest usable
prefix of a key, splitting the node where it ends and cutting it back to the last
page boundary whose SWA window is available), :meth:`~Structure.insert` (a
validating walk, then values for the pages not yet on device and a new leaf for
the rest), :meth:`~Structure.split` and :meth:`~Structure.path`. Values, counters and
leaf sets change only through :class:`~jaxhicache.tree.residency.Residency` and
:class:`~jaxhicache.tree.window.SwaWindows` (or, in the hot paths, code that keeps
their counters exactly as they would); every dropped id is returned, nothing is
freed here. :class:`~jaxhicache.tree.radix.RadixTree` is the public face and
documents the arguments and results.
"""

from __future__ import annotations

from typing import final

import numpy as np

from jaxhicache.tree.arrays import (
    EMPTY,
    I32_DT,
    TOK_BYTES,
    TOK_DT,
    cat,
    common_pages,
    concat,
    ids,
    key_bytes,
)
from jaxhicache.tree.hashes import salt_bytes
from jaxhicache.tree.node import InsertResult, MatchResult, TreeNode, child_key, salt_prefix
from jaxhicache.tree.residency import Residency
from jaxhicache.tree.window import SwaWindows

__all__ = ["Structure"]


@final
class Structure:
    """The node structure of one tree (see module docstring).

    Args:
      root: the tree's root node (no pages; device and host values empty).
      page_size: tokens per page.
      w: the tree's SWA summaries (``w.swa`` trailing window pages, 0: none).
      r: the tree's residency bookkeeping (``r.num_nodes`` counts the nodes made here).
    """

    __slots__ = ("next_id", "page_size", "pb", "r", "root", "swa_pages", "tick", "w")

    def __init__(self, root: TreeNode, page_size: int, w: SwaWindows, r: Residency):
        self.root = root
        self.page_size = page_size
        self.swa_pages = w.swa
        self.pb = page_size * TOK_BYTES  # bytes of one page's key
        self.w = w
        self.r = r
        self.next_id = 1  # the id of the next node made (the root is 0)
        self.tick = 0  # the access clock: ``last_access`` stamps

    def split(self, child: TreeNode, k: int) -> TreeNode:
        """Split ``child`` after ``k`` pages; returns the new upper node (the original
        object keeps the lower part, so references to deep nodes stay valid)."""
        pb = self.pb
        ck = child.key
        p = child.parent
        new = TreeNode(self.next_id, ck[: k * pb], k, child.start, p, child.salt)
        self.next_id += 1
        self.r.num_nodes += 1
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
            self.w.split(new, child, k, p)
        return new

    # ------------------------------------------------------------------ match
    def match(self, key, salt, touch: bool) -> MatchResult:
        """:meth:`RadixTree.match_prefix <jaxhicache.tree.radix.RadixTree.match_prefix>`
        (arguments positional: a hot path)."""
        if type(key) is np.ndarray and key.dtype is TOK_DT and key.ndim == 1:  # fast path
            ps = self.page_size
            klen = len(key)
            r = klen % ps
            kb = key.tobytes() if not r else key[: klen - r].tobytes()
        else:
            kb, _ = key_bytes(key, self.page_size, aligned=False)
        pb = self.pb
        end = len(kb)
        path: list[TreeNode] = []
        pos = 0
        sp = b"" if salt is None else salt_prefix(salt_bytes(salt))
        child = self.root.children.get(sp + kb[:pb]) if end else None
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
            path.append(self.split(child, m))
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
                    usable = self.w.usable_boundary(path, full_pages)
                    break
                run += t
                i -= 1
                if i < 0:
                    break
            if usable < full_pages:
                path = self.cut_path(path, usable)
        st = self.r.states
        if st is not None and path:  # the match ends where a snapshot is (a node end)
            end = st.usable_end(path, usable)
            if end < usable:
                path = self.cut_path(path, end)
                usable = end
        self.tick += touch
        tick = self.tick
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
                swa_host = self.w.neg_swa
                if k >= w:
                    swa_dev = n.device_swa[k - w :].copy()
                else:
                    p = path[-2] if len(path) > 1 else None
                    if p is not None and p.host_swa is None and p.num_pages + k >= w:
                        swa_dev = concat((p.device_swa[p.num_pages + k - w :], n.device_swa))
                    else:
                        swa_dev, swa_host = self.w.window(path, w)
            else:
                w = swa if swa < usable else usable
                swa_dev, swa_host = self.w.window(path, w)
        else:
            w = 0
            swa_dev = swa_host = EMPTY
        last = path[-1] if path else self.root
        if st is not None and touch and path:
            last.state_access = tick  # the snapshot used, not the path
        return MatchResult(  # positional: noticeably cheaper than keywords
            last,  # node
            usable * ps,  # matched_len
            dev_ids.size * ps,  # device_len
            host_ids.size * ps,  # host_len
            full_pages * ps,  # full_match_len
            dev_ids,  # device_full_ids
            host_ids,  # host_full_ids
            w,  # swa_window_pages
            swa_dev,  # swa_device_ids
            swa_host,  # swa_host_ids
            last.state_dev,  # state_device_slot
            last.state_host,  # state_host_slot
        )

    def cut_path(self, path: list[TreeNode], b: int) -> list[TreeNode]:
        """``path`` cut back to end at page ``b`` (splitting the node ``b`` falls in)."""
        if b == 0:
            return []
        for j, n in enumerate(path):
            e = n.start + n.num_pages
            if e >= b:
                if e > b:
                    return [*path[:j], self.split(n, b - n.start)]
                return path[: j + 1]
        return path

    # ------------------------------------------------------------------ insert
    def insert(self, key, full_device_ids, swa_device_ids, salt) -> InsertResult:
        """:meth:`RadixTree.insert <jaxhicache.tree.radix.RadixTree.insert>`: phase 1
        walks the key (splits and access times only) and validates it, phase 2 gives
        values (``ValueError`` before any value changes)."""
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
        pb = self.pb
        node = self.root
        path: list[TreeNode] = []
        pos = 0  # pages
        sb = None if salt is None else salt_bytes(salt)
        first = salt_prefix(sb) + kb[:pb]  # the first page's key among the root's children
        self.tick += 1
        tick = self.tick
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
                child = self.split(child, m)
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
        w = self.w
        r = self.r
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
            new = TreeNode(self.next_id, kb[off:], k, pos, node, sb)
            self.next_id += 1
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
            path[-1] if path else self.root,  # node
            prefix * ps,  # prefix_len
            adopted * ps,  # adopted_len
            (P - prefix) * ps,  # new_len
            full[: dup_end - own].copy() if dup_end > own else EMPTY,  # dup_full_ids
            cat(dup_swa) if dup_swa else EMPTY,  # free_swa_ids
        )

    def node_at(self, key, salt) -> TreeNode:
        """The node ending exactly at the end of the page-aligned ``key`` (split there if
        needed; no access stamps): where a snapshot taken after ``key`` belongs.
        ``ValueError`` if the tree does not hold every page of ``key``."""
        kb, P = key_bytes(key, self.page_size, aligned=True)
        pb = self.pb
        sb = None if salt is None else salt_bytes(salt)
        node, pos = self.root, 0
        while pos < P:
            off = pos * pb
            child = node.children.get(kb[off : off + pb] if pos else salt_prefix(sb) + kb[:pb])
            if child is None:
                break
            if not kb.startswith(child.key, off):  # the key ends or diverges inside child
                if common_pages(self.page_size, child.key, kb, off) < P - pos:
                    break
                child = self.split(child, P - pos)
            node, pos = child, pos + child.num_pages
        if pos < P or node is self.root:
            raise ValueError(f"the tree holds only {pos} of the key's {P} pages")
        return node

    def path(self, node: TreeNode) -> list[TreeNode]:
        """The nodes from the root's child to ``node``, root first (``ValueError``:
        ``node`` is no longer in the tree)."""
        path = []
        n = node
        while n.parent is not None:
            path.append(n)
            n = n.parent
        if n is not self.root:
            raise ValueError(f"node {node.id} is no longer in the tree")
        path.reverse()
        return path
