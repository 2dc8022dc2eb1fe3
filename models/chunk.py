"""One layer of the tiny DSV4 model over a chunk of tokens, reading and writing paged state.

A chunk holds the tokens at positions ``[start, start + T)`` of one request;
only the first ``n_valid`` are real (``end = start + n_valid``), the rest are
padding whose rows are never written and never read by a real token.  All
state lives in sub-pools ``[layers, pages, *row]`` (a layer's rows are picked
with a :class:`View`) and is addressed through the request's page table:

* ``SWA_KV`` ``[swa_pages, page, D]``: key of token ``s`` at SWA page
  ``swa[s // page]``, slot ``s % page``.
* ``C4_KV`` / ``C4_INDEXER`` ``[pages, page/4, D | D_I]`` and ``C128_KV``
  ``[pages, page/r, D]``: compressed entry ``j`` at full page
  ``full[j // (page/r)]``, slot ``j % (page/r)``.
* ``C4_STATE`` / ``C4_INDEXER_STATE`` ``[swa_pages, 8, 4 D_c]``: the raw
  compressor row ``[kv_A | kv_B | score_A | score_B]`` (pre-APE) of token
  ``s`` at SWA page ``swa[s // page]``, ring slot ``s % 8``.  Written for the
  last 8 tokens of the chunk and for the last 8 tokens of every page (so every
  page carries the overlap state needed to resume right after it).
* HCA partial window: request-scoped scratch, a slab ``[hca_layers, slots, r, 2D]``
  laid out like a pool whose "page" is the request's slot (row ``s % r``);
  empty at every page boundary, so never part of the prefix cache.

The layer is split in two so that many requests can run it at once
(``jax.vmap`` over rows) against ONE copy of the pools:

* :func:`layer_forward` (per row, pure): reads the pre-chunk state (read-only
  views), computes the chunk's outputs and returns the rows the chunk must write
  as :class:`Write` s.  What the chunk must see of its own new entries (C4 /
  C128 compressed entries, indexer keys) is its freshly computed values overlaid
  on the pre-write read, exactly where the write would land.
* :func:`scatter` (all rows at once): one scatter per sub-pool of every row's
  writes.  Rows of different requests never write the same page (the caller
  checks on the host), so the order of rows does not matter.

Reads are masked to what the chunk needs.  A needed row on a tombstoned page
(id ``-1``) or beyond the page table comes back as NaN, so a run that would read
it cannot produce finite logits (callers also check page tables on the host).
The first C4 window (``j == 0``) is decided by position only; state missing at
``start > 0`` is never mistaken for it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxhicache.spec import AttentionKind, PoolKind
from models import layers as L
from models.config import C4_RATIO, C4_RING

NAN = float("nan")
SCRATCH = "hca_scratch"
"""The key of the HCA scratch writes in :func:`layer_forward`'s write dict."""


class PageTables(NamedTuple):
    """A request's page table: int32 ``[n_pages]`` each (``[B, n_pages]`` batched), ``-1`` = absent."""

    full: jax.Array  # full-page ids (C4_KV, C4_INDEXER, C128_KV)
    swa: jax.Array  # SWA page ids (SWA_KV, C4_STATE, C4_INDEXER_STATE)


class View(NamedTuple):
    """Read-only view of one layer of a sub-pool: ``array[layer]`` is ``[pages, *row]``."""

    array: jax.Array  # [layers, pages, *row]
    layer: jax.Array  # scalar sub-pool id


class Write(NamedTuple):
    """Rows a chunk writes into one layer: ``array[layer, target[i], slot[i]] = rows[i]``.

    ``target`` ``-1`` writes nothing (masked, padding, or absent page).  Shapes
    ``[N]``, ``[N]``, ``[N, *row]``, with any leading batch axes.
    """

    target: jax.Array
    slot: jax.Array
    rows: jax.Array


# ------------------------------------------------------------------ page access
def _lookup(page_ids, page_idx):
    n = page_ids.shape[0]
    in_table = (page_idx >= 0) & (page_idx < n)
    pid = page_ids[jnp.clip(page_idx, 0, n - 1)]
    return pid, in_table & (pid >= 0)


def read_rows(view: View, page_ids, page_idx, slot, need):
    """Rows ``view[page_ids[page_idx], slot]``; 0 where not needed, NaN where needed but absent."""
    pid, ok = _lookup(page_ids, page_idx)
    rows = view.array[view.layer, jnp.where(ok, pid, 0), slot]
    bshape = need.shape + (1,) * (rows.ndim - need.ndim)
    rows = jnp.where(need.reshape(bshape), rows, 0.0)
    return jnp.where((need & ~ok).reshape(bshape), NAN, rows)


def plan_write(page_ids, page_idx, slot, rows, mask) -> Write:
    """The write of ``rows`` to ``[page_ids[page_idx], slot]`` where ``mask`` and the page exists."""
    pid, ok = _lookup(page_ids, page_idx)
    return Write(jnp.where(mask & ok, pid, -1), slot, rows)


def scatter(array, layer, w: Write):
    """Apply ``w`` (any leading batch axes, flattened) to ``array[layer]``: one scatter.

    Targets must be unique where ``>= 0`` (rows of one chunk never collide; rows of
    different requests write different pages, checked by the caller).
    """
    lead = w.target.ndim
    target = w.target.reshape(-1)
    slot = w.slot.reshape(-1)
    rows = w.rows.reshape(target.shape[0], *w.rows.shape[lead:])
    target = jnp.where(target >= 0, target, array.shape[1])  # out of bounds: dropped
    return array.at[layer, target, slot].set(rows, mode="drop")


def read_entries(view: View, page_ids, n_need, min_rows):
    """All compressed entries of a request, flattened to ``[max(n_pages * per, min_rows), Dc]``.

    Entries ``j < n_need`` are needed (NaN if their page is absent), the rest are 0.
    """
    n, per, dc = page_ids.shape[0], view.array.shape[2], view.array.shape[3]
    j = jnp.arange(n * per).reshape(n, per)
    ok = (page_ids >= 0)[:, None, None]
    need = (j < n_need)[..., None]
    rows = view.array[view.layer, jnp.where(page_ids >= 0, page_ids, 0)]
    rows = jnp.where(need & ~ok, NAN, jnp.where(need, rows, 0.0)).reshape(n * per, dc)
    if n * per < min_rows:
        rows = jnp.pad(rows, ((0, min_rows - n * per), (0, 0)))
    return rows


def entries_with_own(view: View, page_ids, n_need, min_rows, j, w: Write):
    """:func:`read_entries` of the pre-chunk pool with the chunk's own entries ``j`` overlaid
    where ``w`` writes them (what a read after the write would return)."""
    rows = read_entries(view, page_ids, n_need, min_rows)
    at = jnp.where(w.target >= 0, j, rows.shape[0])
    return rows.at[at].set(w.rows, mode="drop")


# ----------------------------------------------------------------- compressors
def c4_compress(cfg, cp, x, start, end, state: View, tables, theta):
    """Overlapping (ratio-4) compressor over the chunk.

    Reads the ring rows of tokens ``[4*(start//4) - 4, start)``, emits every entry
    ``j`` with ``4j + 3`` in ``[start, end)``.  Returns ``(j, state_write,
    entries_write)``: the entry ids and the writes of the chunk's raw ring rows
    and of its entries.
    """
    t, page = x.shape[0], cfg.page_size
    raw = L.comp_raw(cp, x)  # [T, 4Dc]
    pos = start + jnp.arange(t)
    ppos = start - C4_RING + jnp.arange(C4_RING)
    need = ppos >= jnp.maximum(0, C4_RATIO * (start // C4_RATIO) - C4_RATIO)
    past = read_rows(state, tables.swa, ppos // page, ppos % C4_RING, need)
    buf = jnp.concatenate([past, raw], axis=0)  # buf[b] is token start - 8 + b
    n_ent = t // C4_RATIO + 1
    j = start // C4_RATIO + jnp.arange(n_ent)
    valid = C4_RATIO * j + C4_RATIO - 1 < end
    src = (C4_RATIO * j - C4_RATIO)[:, None] + jnp.arange(2 * C4_RATIO) - (start - C4_RING)
    rows = buf[jnp.clip(src, 0, buf.shape[0] - 1)]  # [E, 8, 4Dc]
    vals, scores = L.c4_slots(rows[:, :C4_RATIO], rows[:, C4_RATIO:], cp["ape"], j == 0)
    ent = L.pool_window(vals, scores, cp["norm"], C4_RATIO * j, cfg, theta)
    in_chunk = pos < end
    keep = in_chunk & ((pos >= end - C4_RING) | (pos % page >= page - C4_RING))
    state_w = plan_write(tables.swa, pos // page, pos % C4_RING, raw, keep)
    per = page // C4_RATIO
    return j, state_w, plan_write(tables.full, j // per, j % per, ent, valid)


def hca_compress(cfg, cp, x, start, end, scratch: View, slot, tables, theta):
    """Disjoint (HCA) compressor over the chunk; partial window in the scratch slab row ``slot``.

    Returns ``(j, scratch_write, entries_write)``.
    """
    t, r = x.shape[0], cfg.hca_ratio
    raw = L.comp_raw(cp, x)  # [T, 2D]
    pos = start + jnp.arange(t)
    ppos = start - r + jnp.arange(r)
    need = (ppos >= r * (start // r))[:, None]
    past = jnp.where(need, scratch.array[scratch.layer, slot, ppos % r], 0.0)
    buf = jnp.concatenate([past, raw], axis=0)  # buf[b] is token start - r + b
    n_ent = t // r + 1
    j = start // r + jnp.arange(n_ent)
    valid = r * j + r - 1 < end
    src = (r * j)[:, None] + jnp.arange(r) - (start - r)
    vals, scores = L.hca_slots(buf[jnp.clip(src, 0, buf.shape[0] - 1)], cp["ape"])
    ent = L.pool_window(vals, scores, cp["norm"], r * j, cfg, theta)
    keep = (pos < end) & (pos >= end - r)
    scratch_w = Write(jnp.where(keep, slot, -1), pos % r, raw)
    per = cfg.page_size // r
    return j, scratch_w, plan_write(tables.full, j // per, j % per, ent, valid)


# ----------------------------------------------------------------------- layer
def layer_forward(cfg, kind, p, cp, ip, h, start, end, views, scratch, slot, tables):
    """One decoder layer over one request's chunk: the per-row, pure part.

    ``kind``: static :class:`AttentionKind`; ``p``: attention/MLP weights;
    ``cp``: compressor weights (CSA/HCA); ``ip``: indexer weights (CSA);
    ``h``: [T, d] residual stream; ``views``: ``{PoolKind: View}`` of this layer
    (read-only, pre-chunk); ``scratch``: :class:`View` of the HCA scratch slab
    (HCA only) and ``slot`` the request's slab row; ``tables``: 1-D page tables.
    Returns ``(h, writes)``: ``writes`` maps each written ``PoolKind`` (and
    :data:`SCRATCH` for HCA) to its :class:`Write`; apply them with :func:`scatter`.
    """
    t, page = h.shape[0], cfg.page_size
    ratio = {AttentionKind.SWA: 0, AttentionKind.CSA: C4_RATIO, AttentionKind.HCA: cfg.hca_ratio}[
        kind
    ]
    theta = cfg.compress_rope_theta if ratio else cfg.rope_theta
    pos = start + jnp.arange(t)
    x = L.rms_norm(h, p["attn_norm"], cfg.eps)
    q, c = L.q_proj(p, x, pos, cfg, theta)
    k = L.kv_proj(p, x, pos, cfg, theta)
    k = jnp.where((pos < end)[:, None], k, 0.0)

    # sliding window: W-1 past keys from the pool, then the chunk's own keys
    wp = cfg.window - 1
    ppos = start - wp + jnp.arange(wp)
    past = read_rows(views[PoolKind.SWA_KV], tables.swa, ppos // page, ppos % page, ppos >= 0)
    keys = jnp.concatenate([past, k], axis=0)
    kpos = start - wp + jnp.arange(wp + t)
    band = (kpos[None] <= pos[:, None]) & (kpos[None] > pos[:, None] - cfg.window)
    key_sets = [(keys, band & (kpos[None] >= 0))]
    writes = {PoolKind.SWA_KV: plan_write(tables.swa, pos // page, pos % page, k, pos < end)}

    if kind == AttentionKind.CSA:
        j, st, kv = c4_compress(cfg, cp, x, start, end, views[PoolKind.C4_STATE], tables, theta)
        ist_view = views[PoolKind.C4_INDEXER_STATE]
        _, ist, ik = c4_compress(cfg, ip["comp"], x, start, end, ist_view, tables, theta)
        writes.update(
            {
                PoolKind.C4_STATE: st,
                PoolKind.C4_KV: kv,
                PoolKind.C4_INDEXER_STATE: ist,
                PoolKind.C4_INDEXER: ik,
            }
        )
        n_need, topk = end // C4_RATIO, cfg.index_topk
        kv_all = entries_with_own(views[PoolKind.C4_KV], tables.full, n_need, topk, j, kv)
        ik_all = entries_with_own(views[PoolKind.C4_INDEXER], tables.full, n_need, topk, j, ik)
        jj = jnp.arange(kv_all.shape[0])
        eligible = jj[None] < ((pos + 1) // C4_RATIO)[:, None]
        qi, w = L.indexer_query(ip, x, c, pos, cfg, theta)
        sel, sel_ok = L.indexer_topk(qi, w, ik_all, eligible, cfg.index_topk)
        key_sets.append((kv_all[sel], sel_ok))
    elif kind == AttentionKind.HCA:
        r = cfg.hca_ratio
        j, scr, kv = hca_compress(cfg, cp, x, start, end, scratch, slot, tables, theta)
        writes.update({PoolKind.C128_KV: kv, SCRATCH: scr})
        kv_all = entries_with_own(views[PoolKind.C128_KV], tables.full, end // r, 1, j, kv)
        jj = jnp.arange(kv_all.shape[0])
        key_sets.append((kv_all, jj[None] < ((pos + 1) // r)[:, None]))

    o = L.sink_attention(q, key_sets, p["sink"], cfg)
    h = h + L.attn_out(p, o, pos, cfg, theta)
    h = h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.eps))
    return h, writes
