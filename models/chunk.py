"""One layer of the tiny DSV4 model over a chunk of tokens, reading and writing paged state.

A chunk holds the tokens at positions ``[start, start + T)`` of one request;
only the first ``n_valid`` are real (``end = start + n_valid``), the rest are
padding whose rows are never written and never read by a real token.  All
state lives in per-layer *views* of the device pools (one page row per page id)
and is addressed through the request's page table:

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
* HCA partial window: request-scoped scratch ``[r, 2 D]`` (slot ``s % r``);
  empty at every page boundary, so never part of the prefix cache.

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


class PageTables(NamedTuple):
    """A request's page table: int32 ``[n_pages]`` each, ``-1`` = absent / tombstone."""

    full: jax.Array  # full-page ids (C4_KV, C4_INDEXER, C128_KV)
    swa: jax.Array  # SWA page ids (SWA_KV, C4_STATE, C4_INDEXER_STATE)


# ------------------------------------------------------------------ page access
def _lookup(page_ids, page_idx):
    n = page_ids.shape[0]
    in_table = (page_idx >= 0) & (page_idx < n)
    pid = page_ids[jnp.clip(page_idx, 0, n - 1)]
    return pid, in_table & (pid >= 0)


def read_rows(pool, page_ids, page_idx, slot, need):
    """Rows ``pool[page_ids[page_idx], slot]``; 0 where not needed, NaN where needed but absent."""
    pid, ok = _lookup(page_ids, page_idx)
    rows = pool[jnp.where(ok, pid, 0), slot]
    bshape = need.shape + (1,) * (rows.ndim - need.ndim)
    rows = jnp.where(need.reshape(bshape), rows, 0.0)
    return jnp.where((need & ~ok).reshape(bshape), NAN, rows)


def write_rows(pool, page_ids, page_idx, slot, rows, mask):
    """Scatter ``rows`` to ``pool[page_ids[page_idx], slot]`` where ``mask``; no duplicates."""
    pid, ok = _lookup(page_ids, page_idx)
    target = jnp.where(mask & ok, pid, pool.shape[0])  # out of bounds: dropped
    return pool.at[target, slot].set(rows, mode="drop")


def read_entries(pool, page_ids, n_need, min_rows):
    """All compressed entries of a request, flattened to ``[max(n_pages * per, min_rows), Dc]``.

    Entries ``j < n_need`` are needed (NaN if their page is absent), the rest are 0.
    """
    n, per, dc = page_ids.shape[0], pool.shape[1], pool.shape[2]
    j = jnp.arange(n * per).reshape(n, per)
    ok = (page_ids >= 0)[:, None, None]
    need = (j < n_need)[..., None]
    rows = pool[jnp.where(page_ids >= 0, page_ids, 0)]
    rows = jnp.where(need & ~ok, NAN, jnp.where(need, rows, 0.0)).reshape(n * per, dc)
    if n * per < min_rows:
        rows = jnp.pad(rows, ((0, min_rows - n * per), (0, 0)))
    return rows


# ----------------------------------------------------------------- compressors
def c4_compress(cfg, cp, x, start, end, state, entries, tables, theta):
    """Overlapping (ratio-4) compressor over the chunk.

    Reads the ring rows of tokens ``[4*(start//4) - 4, start)``, emits every entry
    ``j`` with ``4j + 3`` in ``[start, end)``, writes them to ``entries`` and the
    chunk's raw rows to the ring ``state``.  Returns ``(state, entries)``.
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
    state = write_rows(state, tables.swa, pos // page, pos % C4_RING, raw, keep)
    per = page // C4_RATIO
    entries = write_rows(entries, tables.full, j // per, j % per, ent, valid)
    return state, entries


def hca_compress(cfg, cp, x, start, end, scratch, entries, tables, theta):
    """Disjoint (HCA) compressor over the chunk; partial window in the request scratch."""
    t, r = x.shape[0], cfg.hca_ratio
    raw = L.comp_raw(cp, x)  # [T, 2D]
    pos = start + jnp.arange(t)
    ppos = start - r + jnp.arange(r)
    need = (ppos >= r * (start // r))[:, None]
    past = jnp.where(need, scratch[ppos % r], 0.0)
    buf = jnp.concatenate([past, raw], axis=0)  # buf[b] is token start - r + b
    n_ent = t // r + 1
    j = start // r + jnp.arange(n_ent)
    valid = r * j + r - 1 < end
    src = (r * j)[:, None] + jnp.arange(r) - (start - r)
    vals, scores = L.hca_slots(buf[jnp.clip(src, 0, buf.shape[0] - 1)], cp["ape"])
    ent = L.pool_window(vals, scores, cp["norm"], r * j, cfg, theta)
    keep = (pos < end) & (pos >= end - r)
    scratch = scratch.at[jnp.where(keep, pos % r, r)].set(raw, mode="drop")
    per = cfg.page_size // r
    entries = write_rows(entries, tables.full, j // per, j % per, ent, valid)
    return scratch, entries


# ----------------------------------------------------------------------- layer
def layer_forward(cfg, kind, p, cp, ip, h, start, end, views, scratch, tables):
    """One decoder layer over a chunk.

    ``kind``: static :class:`AttentionKind`; ``p``: attention/MLP weights;
    ``cp``: compressor weights (CSA/HCA); ``ip``: indexer weights (CSA);
    ``h``: [T, d] residual stream; ``views``: ``{PoolKind: [pages, *row]}`` of this
    layer; ``scratch``: HCA partial-window rows [r, 2D] (HCA only).
    Returns ``(h, views, scratch)``.
    """
    t, page = h.shape[0], cfg.page_size
    ratio = {AttentionKind.SWA: 0, AttentionKind.CSA: C4_RATIO, AttentionKind.HCA: cfg.hca_ratio}[
        kind
    ]
    theta = cfg.compress_rope_theta if ratio else cfg.rope_theta
    views = dict(views)
    pos = start + jnp.arange(t)
    x = L.rms_norm(h, p["attn_norm"], cfg.eps)
    q, c = L.q_proj(p, x, pos, cfg, theta)
    k = L.kv_proj(p, x, pos, cfg, theta)
    k = jnp.where((pos < end)[:, None], k, 0.0)

    # sliding window: W-1 past keys from the pool, then the chunk's own keys
    wp = cfg.window - 1
    ppos = start - wp + jnp.arange(wp)
    swa = views[PoolKind.SWA_KV]
    past = read_rows(swa, tables.swa, ppos // page, ppos % page, ppos >= 0)
    keys = jnp.concatenate([past, k], axis=0)
    kpos = start - wp + jnp.arange(wp + t)
    band = (kpos[None] <= pos[:, None]) & (kpos[None] > pos[:, None] - cfg.window)
    key_sets = [(keys, band & (kpos[None] >= 0))]
    views[PoolKind.SWA_KV] = write_rows(swa, tables.swa, pos // page, pos % page, k, pos < end)

    if kind == AttentionKind.CSA:
        st, kv = c4_compress(
            cfg, cp, x, start, end, views[PoolKind.C4_STATE], views[PoolKind.C4_KV], tables, theta
        )
        ist, ik = c4_compress(
            cfg,
            ip["comp"],
            x,
            start,
            end,
            views[PoolKind.C4_INDEXER_STATE],
            views[PoolKind.C4_INDEXER],
            tables,
            theta,
        )
        views.update(
            {
                PoolKind.C4_STATE: st,
                PoolKind.C4_KV: kv,
                PoolKind.C4_INDEXER_STATE: ist,
                PoolKind.C4_INDEXER: ik,
            }
        )
        n_need = end // C4_RATIO
        kv_all = read_entries(kv, tables.full, n_need, cfg.index_topk)
        ik_all = read_entries(ik, tables.full, n_need, cfg.index_topk)
        jj = jnp.arange(kv_all.shape[0])
        eligible = jj[None] < ((pos + 1) // C4_RATIO)[:, None]
        qi, w = L.indexer_query(ip, x, c, pos, cfg, theta)
        sel, sel_ok = L.indexer_topk(qi, w, ik_all, eligible, cfg.index_topk)
        key_sets.append((kv_all[sel], sel_ok))
    elif kind == AttentionKind.HCA:
        r = cfg.hca_ratio
        scratch, kv = hca_compress(
            cfg, cp, x, start, end, scratch, views[PoolKind.C128_KV], tables, theta
        )
        views[PoolKind.C128_KV] = kv
        kv_all = read_entries(kv, tables.full, end // r, 1)
        jj = jnp.arange(kv_all.shape[0])
        key_sets.append((kv_all, jj[None] < ((pos + 1) // r)[:, None]))

    o = L.sink_attention(q, key_sets, p["sink"], cfg)
    h = h + L.attn_out(p, o, pos, cfg, theta)
    h = h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.eps))
    return h, views, scratch
