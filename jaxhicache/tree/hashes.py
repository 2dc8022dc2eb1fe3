"""Tenant salts and L3 page hashes of the tree's nodes.

* :func:`salt_bytes`: a request's ``cache_salt`` as the bytes the tree keys and the
  L3 hashes use (validated: ``str`` / non-empty ``bytes`` / ``None``).
* :func:`walk`: the side-effect-free walk of a key under a salt (no split, no LRU
  bump), shared by ``RadixTree.cached_len`` and :func:`key_hashes`.
* :func:`path_hashes` / :func:`key_hashes`: the L3 hash chain
  (:func:`jaxhicache.storage.keys.page_hashes`) of a root-first path or of a key,
  computed lazily and kept per node (``node.page_hashes``).

The hash function is imported on first use: the tree stays importable without jax
(importing the ``jaxhicache.storage`` package loads its backends).
"""

from __future__ import annotations

import numpy as np

from jaxhicache.tree.arrays import TOK, TOK_BYTES, common_pages, key_bytes
from jaxhicache.tree.node import TreeNode, salt_prefix

__all__ = ["fill_hashes", "key_hashes", "path_hashes", "salt_bytes", "walk"]


def salt_bytes(salt) -> bytes | None:
    """A request's ``cache_salt`` as the bytes the tree and the L3 keys use (``str``
    as UTF-8, so ``"a"`` and ``b"a"`` are one tenant); ``None`` stays ``None``."""
    if salt is None:
        return None
    if isinstance(salt, str):
        raw = salt.encode("utf-8")
    elif isinstance(salt, bytes):
        raw = salt
    else:
        raise ValueError(f"salt must be str, bytes or None, got {type(salt).__name__} {salt!r}")
    if not raw:
        # L3 page_hashes treats an empty salt as none: it would share pages with
        # unsalted requests there, so the tree refuses it rather than isolate it here only.
        raise ValueError(f"salt must be non-empty (None = no salt), got {salt!r}")
    return raw


def _hash_fn():
    # Imported on first use: the tree stays importable without jax (importing the
    # jaxhicache.storage package loads its backends).
    from jaxhicache.storage.keys import page_hashes

    return page_hashes


def walk(
    root: TreeNode, kb: bytes, salt: bytes | None, page_size: int
) -> tuple[list[TreeNode], TreeNode | None, int]:
    """Side-effect-free walk of the key bytes ``kb`` under ``salt`` from ``root``:
    ``(path, part, pages)`` with ``path`` the nodes wholly matched, root first,
    ``part`` the node that the match ends inside (``None`` if it ends at a node end)
    and ``pages`` the matched pages."""
    pb = page_size * TOK_BYTES
    end = len(kb)
    path: list[TreeNode] = []
    pos = 0
    child = root.children.get(salt_prefix(salt) + kb[:pb]) if end else None
    while child is not None:
        if kb.startswith(child.key, pos):
            path.append(child)
            pos += len(child.key)
            if pos == end:
                break
            child = child.children.get(kb[pos : pos + pb])
            continue
        return path, child, child.start + common_pages(page_size, child.key, kb, pos)
    return path, None, pos // pb


def fill_hashes(path: list[TreeNode], page_size: int) -> None:
    """Compute the missing ``page_hashes`` of ``path`` (a root-first path)."""
    i = len(path)
    while i and path[i - 1].page_hashes is None:  # prefix-closed: only a tail lacks them
        i -= 1
    if i == len(path):
        return
    ph = _hash_fn()
    for n in path[i:]:
        if n.start:
            n.page_hashes = ph(n.tokens(), page_size, parent=n.parent.page_hashes[-1])
        else:
            n.page_hashes = ph(n.tokens(), page_size, salt=n.salt)


def path_hashes(path: list[TreeNode], page_size: int) -> list[str]:
    """L3 page hashes of a non-empty root-first ``path``, computing and keeping the
    missing ones on its nodes."""
    fill_hashes(path, page_size)
    if len(path) == 1:
        return list(path[0].page_hashes)
    return [h for n in path for h in n.page_hashes]


def key_hashes(root: TreeNode, key, page_size: int, salt=None) -> list[str]:
    """L3 page hashes of every whole page of ``key`` under ``salt`` in the tree at
    ``root``: the pages the tree holds take their hashes from the nodes (computed
    and kept there if needed), the rest are hashed from the last one."""
    sb = salt_bytes(salt)
    kb, pages = key_bytes(key, page_size, aligned=False)
    path, part, done = walk(root, kb, sb, page_size)
    if part is not None:  # the match ends inside `part`: its head is ours too
        path.append(part)
    fill_hashes(path, page_size)
    out = [h for n in path for h in n.page_hashes]
    del out[done:]
    if done < pages:
        toks = np.frombuffer(kb, dtype=TOK)[done * page_size :]
        if done:
            out += _hash_fn()(toks, page_size, parent=out[-1])
        else:
            out += _hash_fn()(toks, page_size, salt=sb)
    return out
