"""Full O(tree) consistency check of a radix tree (``RadixTree.check_invariants``).

Everything is recomputed from the node arrays and the tree's shape, never from
the summaries under test: structure (keys, salts, parent pointers, page depths),
the cached L3 page hashes (each node's recomputed from its tokens and its
parent's last hash, or its salt at the root), value
residency (device / backed-up sets prefix-closed, a value on every node), page
ownership (each id once per space and tier), lock counts, the O(1) counters,
the device / host leaf sets and, with SWA, every per-node summary, the class-3
tails of the reclaim rule, the per-tier SWA counters and reclaim candidates.
"""

from __future__ import annotations

import numpy as np

from jaxhicache.tree.arrays import I32, TOK_BYTES, concat
from jaxhicache.tree.node import TreeNode, child_key
from jaxhicache.tree.window import SwaWindows

__all__ = ["check_tree"]


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _check_ids(c: TreeNode, out: dict[str, list]) -> None:
    k = c.num_pages
    tag = f"node {c.id}"
    for arr, name in ((c.device_full, "device_full"), (c.host_full, "host_full")):
        if arr is None:
            continue
        if arr.shape != (k,) or arr.dtype != I32:
            _fail(f"{tag}: {name} shape {arr.shape} dtype {arr.dtype}, want ({k},) int32")
        if (arr < 0).any():
            _fail(f"{tag}: {name} holds negative ids")
        out[name].append(arr)


def _check_swa(c: TreeNode, out: dict[str, list]) -> None:
    k = c.num_pages
    tag = f"node {c.id}"
    for full_arr, swa_arr, name, live in (
        (c.device_full, c.device_swa, "device_swa", c.swa_live),
        (c.host_full, c.host_swa, "host_swa", c.host_swa_live),
    ):
        if (full_arr is None) != (swa_arr is None):
            _fail(f"{tag}: {name} present iff its full value is")
        if swa_arr is None:
            if live:
                _fail(f"{tag}: {name} live count {live} without values")
            continue
        if swa_arr.shape != (k,) or swa_arr.dtype != I32:
            _fail(f"{tag}: {name} shape {swa_arr.shape}, want ({k},) int32")
        if (swa_arr < -1).any():
            _fail(f"{tag}: {name} holds ids < -1")
        got = swa_arr[swa_arr >= 0]
        if got.size != live:
            _fail(f"{tag}: {name} live count {live} != {got.size}")
        out[name].append(got)
    if c.device_swa is not None and (
        (c.device_swa[: c.swa_lo] >= 0).any() or (c.device_swa[max(0, c.swa_hi) :] >= 0).any()
    ):
        _fail(f"{tag}: live device SWA outside [{c.swa_lo}, {c.swa_hi})")
    a = SwaWindows.avail(c)
    run = 0
    while run < k and a[k - 1 - run]:
        run += 1
    if run != c.swa_tail:
        _fail(f"{tag}: swa_tail {c.swa_tail} != {run}")


def _check_hashes(c: TreeNode, p: TreeNode, page_size: int) -> None:
    h = c.page_hashes
    if h is None:
        return
    tag = f"node {c.id}"
    if not isinstance(h, list) or len(h) != c.num_pages:
        _fail(f"{tag}: page_hashes is not a list of {c.num_pages} hashes")
    if c.start and p.page_hashes is None:
        _fail(f"{tag}: has page hashes but its parent {p.id} has none (not prefix-closed)")
    from jaxhicache.storage.keys import page_hashes  # jax-free tree import; see hashes

    if c.start:
        want = page_hashes(c.tokens(), page_size, parent=p.page_hashes[-1])
    else:
        want = page_hashes(c.tokens(), page_size, salt=c.salt)
    if h != want:
        i = next(i for i, (a, b) in enumerate(zip(h, want, strict=True)) if a != b)
        _fail(f"{tag}: page hash {i} is {h[i][:12]}…, the chain gives {want[i][:12]}…")


def _check_protection(nodes: list[TreeNode], swa: int, w: SwaWindows) -> None:
    """Class-3 tails (leaf and lock windows), their live counts and the candidates."""
    dist: dict[TreeNode, int] = {}
    dev_prot = host_prot = 0
    dev_cands, host_cands = set(), set()
    for n in reversed(nodes):  # children before parents
        k = n.num_pages
        if n.own_locks or not n.children:
            d = 0
        else:
            d = min([swa] + [c.num_pages + dist[c] for c in n.children.values()])
        dist[n] = min(d, swa)
        t = min(k, swa - dist[n])
        tag = f"node {n.id}"
        if n.prot_dist != dist[n] or n.prot != t:
            _fail(f"{tag}: prot_dist/prot {n.prot_dist}/{n.prot}, recomputed {dist[n]}/{t}")
        d_live = h_live = 0
        if t and n.device_swa is not None:
            d_live = int((n.device_swa[k - t :] >= 0).sum())
        if t and n.host_swa is not None:
            h_live = int((n.host_swa[k - t :] >= 0).sum())
        if n.swa_prot_live != d_live or n.host_prot_live != h_live:
            _fail(
                f"{tag}: protected live SWA {n.swa_prot_live}/{n.host_prot_live}, "
                f"recomputed {d_live}/{h_live}"
            )
        dev_prot += d_live
        host_prot += h_live
        if n.swa_live > d_live:
            dev_cands.add(n)
        if n.host_swa_live > h_live:
            host_cands.add(n)
    if (w.dev_prot, w.host_prot) != (dev_prot, host_prot):
        _fail(
            f"protected SWA counters {w.dev_prot}/{w.host_prot}, recomputed {dev_prot}/{host_prot}"
        )
    if w.dev_cands != dev_cands or w.host_cands != host_cands:
        _fail("SWA reclaim candidate sets are stale")


def check_tree(
    root: TreeNode,
    page_size: int,
    w: SwaWindows,
    *,
    counters: dict[str, int],
    dev_leaves: set[TreeNode],
    host_leaves: set[TreeNode],
) -> None:
    """Raise ``AssertionError`` naming the first inconsistency found."""
    pb = page_size * TOK_BYTES
    swa = w.swa
    owned: dict[str, list] = {k: [] for k in ("device_full", "host_full", "device_swa", "host_swa")}
    cnt = dict.fromkeys(counters, 0)
    want_dev_leaves, want_host_leaves = set(), set()
    nodes: list[TreeNode] = []  # parents before children
    stack = [root]
    while stack:
        p = stack.pop()
        child_locks = 0
        ndev = 0
        for kk, c in p.children.items():
            stack.append(c)
            nodes.append(c)
            child_locks += c.lock_ref
            ndev += c.device_full is not None
            tag = f"node {c.id}"
            if c.parent is not p:
                _fail(f"{tag}: parent pointer is not its parent {p.id}")
            if kk != child_key(c, pb) or len(c.key) < pb:
                _fail(f"{tag}: children key is not its (salted, at the root) first page")
            if c.salt is not None and (not isinstance(c.salt, bytes) or not c.salt):
                _fail(f"{tag}: salt {c.salt!r} is neither None nor non-empty bytes")
            if p is not root and c.salt != p.salt:
                _fail(f"{tag}: salt {c.salt!r} differs from its parent {p.id}'s {p.salt!r}")
            if c.num_pages < 1 or len(c.key) != c.num_pages * pb:
                _fail(f"{tag}: key of {len(c.key)} bytes is not {c.num_pages} whole pages")
            if c.start != p.start + p.num_pages:
                _fail(f"{tag}: start {c.start} != parent end {p.start + p.num_pages}")
            if c.device_full is None and c.host_full is None:
                _fail(f"{tag}: holds neither a device nor a host value")
            if c.device_full is not None and p.device_full is None:
                _fail(f"{tag}: on device but its parent {p.id} is not (device not prefix-closed)")
            if c.host_full is not None and p.host_full is None:
                _fail(f"{tag}: backed up but its parent {p.id} is not (backup not a prefix)")
            if c.lock_ref < 0 or c.own_locks < 0:
                _fail(f"{tag}: negative lock count")
            if c.lock_ref > p.lock_ref and p is not root:
                _fail(f"{tag}: lock_ref {c.lock_ref} > parent's {p.lock_ref}")
            _check_ids(c, owned)
            _check_hashes(c, p, page_size)
            k = c.num_pages
            if c.device_full is not None:
                cnt["device pages"] += k
                if c.lock_ref == 0:
                    cnt["evictable device pages"] += k
                if not any(g.device_full is not None for g in c.children.values()):
                    want_dev_leaves.add(c)
            if c.host_full is not None:
                cnt["host pages"] += k
                if c.device_full is None:
                    if c.lock_ref == 0:
                        cnt["evictable host pages"] += k
                    if not c.children:
                        want_host_leaves.add(c)
            cnt["nodes"] += 1
            if swa:
                _check_swa(c, owned)
        if p is not root and p.lock_ref != p.own_locks + child_locks:
            _fail(
                f"node {p.id}: lock_ref {p.lock_ref} != own {p.own_locks} + children {child_locks}"
            )
        if p.n_dev_children != ndev:
            _fail(f"node {p.id}: n_dev_children {p.n_dev_children} != {ndev}")
        if swa:
            want_short = {g for g in p.children.values() if g.num_pages < swa}
            if (p.short or set()) != want_short:
                _fail(f"node {p.id}: short-children set is stale")
    for name, parts in owned.items():
        if parts:
            ids, counts = np.unique(concat(parts), return_counts=True)
            if (counts > 1).any():
                twice = ids[counts > 1][:8].tolist()
                _fail(f"{name.replace('_', ' ')} page ids owned twice: {twice}")
    cnt["device SWA pages"] = sum(a.size for a in owned["device_swa"])
    cnt["host SWA pages"] = sum(a.size for a in owned["host_swa"])
    have = {**counters, "device SWA pages": w.dev_live, "host SWA pages": w.host_live}
    for what, want in cnt.items():
        if have[what] != want:
            _fail(f"counter {what} = {have[what]}, recomputed {want}")
    if want_dev_leaves != dev_leaves:
        _fail("device-leaf set is stale")
    if want_host_leaves != host_leaves:
        _fail("host-leaf set is stale")
    if swa:
        _check_protection(nodes, swa, w)
