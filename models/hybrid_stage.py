"""One pipeline stage of the tiny hybrid model over the library's pools (device side).

Used by :class:`models.hybrid_paged.PagedHybridModel` inside ``jax.shard_map`` over
``('pp', 'tp')``.  Index spaces (the project's guarded bug class: never mix them):

* per-layer weights: stacked by **stage-local id** ``[pp, max_local, ...]`` (the union of
  the linear and attention weight names, zeros where a layer has no such weight);
* ``CONV_STATE`` / ``RECURRENT_STATE`` rows: by the layer's sub-pool id of that kind
  (``local_to_subpool(kind)[l]``), then by **snapshot slot**;
* ``FULL_KV`` rows: by the ``FULL_KV`` sub-pool id, then by full page id (token ``s`` at
  page ``full[s // page]``, slot ``s % page``; row ``(2, page, kv_heads, head_dim)``).

Over ``'tp'`` the pools hold a slice of their :attr:`PoolKind.tp_axis` (KV heads, conv
channels rank-major, value heads); the computation is replicated: a layer gathers the
rows it reads over ``'tp'`` and each rank writes its own slice.  Conv channels are
rank-major in the pool (rank ``r`` holds its q, k and v channels as one block), so a
read is permuted to the model's ``[q | k | v]`` order and a write back
(:func:`conv_pool_order`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxhicache.layer_map import StageView
from jaxhicache.mesh import TP
from jaxhicache.spec import AttentionKind, PoolKind
from jaxhicache.transfer import apply_layer, fetch_layer
from models import layers as L
from models.hybrid import (
    attention_cached,
    attention_inputs,
    attention_output,
    linear_chunk,
    mlp_block,
)
from models.hybrid_config import TinyHybridConfig
from models.pipeline import stack_rows

__all__ = ["conv_pool_order", "hybrid_stage_forward", "stack_hybrid_params"]

KV, CONV, REC = PoolKind.FULL_KV, PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE
HEAD = ("embed", "final_norm", "lm_head")


def conv_pool_order(cfg: TinyHybridConfig, tp: int) -> np.ndarray:
    """Model conv channel held by each ``CONV_STATE`` row channel (rank-major over ``tp``).

    Rank ``r`` holds q channels ``[r kd/tp, (r+1) kd/tp)``, the same k channels
    (offset ``kd``) and v channels ``2 kd + [r vd/tp, (r+1) vd/tp)``, in that order.
    """
    kd, vd = cfg.key_dim, cfg.value_dim
    ks, vs = kd // tp, vd // tp
    blocks = [
        np.concatenate(
            [np.arange(r * ks, (r + 1) * ks) + off for off in (0, kd)]
            + [2 * kd + np.arange(r * vs, (r + 1) * vs)]
        )
        for r in range(tp)
    ]
    return np.concatenate(blocks).astype(np.int32)


def stack_hybrid_params(cfg: TinyHybridConfig, params: dict, maps) -> dict:
    """Per-stage weight stacks (numpy) by stage-local id ``[pp, max_local, ...]`` plus the
    head weights.  Every row carries both kinds' weight names (zeros where absent)."""
    params = jax.device_get(params)
    layers = params["layers"]
    if len(layers) != cfg.num_layers:
        raise ValueError(f"params have {len(layers)} layers, config has {cfg.num_layers}")
    template = {}
    for p in layers:
        for k, v in p.items():
            template.setdefault(k, np.zeros_like(v))
    max_local = max(m.num_local_layers for m in maps)
    stages = []
    for m in maps:
        rows = [{**template, **layers[m.global_id(loc)]} for loc in range(m.num_local_layers)]
        stages.append(stack_rows(rows, max_local))
    return {**{k: params[k] for k in HEAD}, "layers": stack_rows(stages, len(maps))}


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _gather_tp(x, axis: int, tp: int):
    """The whole row axis ``axis`` from every TP rank's slice (identity when ``tp == 1``)."""
    return x if tp == 1 else jax.lax.all_gather(x, TP, axis=axis, tiled=True)


def _rank_slice(x, axis: int, tp: int):
    """This TP rank's slice of ``axis`` (identity when ``tp == 1``)."""
    if tp == 1:
        return x
    n = x.shape[axis] // tp
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(TP) * n, n, axis=axis)


def read_state(arr, k, slots, tp: int, to_model=None):
    """Rows ``arr[k, slots]`` gathered over ``'tp'`` ``[B, *row]`` (``slot < 0``: zeros)."""
    x = _gather_tp(arr[k, jnp.maximum(slots, 0)], 1, tp)
    if to_model is not None:
        x = x[:, to_model]
    ok = (slots >= 0).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.where(ok, x, jnp.zeros_like(x))


def write_state(arr, k, slots, x, tp: int, to_pool=None):
    """``arr[k, slots] = x`` (this rank's slice; out-of-range slots are dropped)."""
    if to_pool is not None:
        x = x[:, to_pool]
    return arr.at[k, slots].set(_rank_slice(x, 1, tp).astype(arr.dtype), mode="drop")


def hybrid_stage_forward(
    cfg: TinyHybridConfig,
    tp: int,
    sp,
    view: StageView,
    pools: dict,
    h,
    start,
    n_valid,
    full,
    state_in,
    state_out,
    load=None,
):
    """One stage's layers over a batch of chunks: a ``lax.scan`` over local layers with
    ``lax.switch`` on the traced kind.

    ``h [B, T, d]``; ``start`` / ``n_valid`` / ``state_in`` / ``state_out`` int32 ``[B]``;
    ``full [B, W]``.  Rows with ``n_valid == 0`` read zero states and write nothing.
    Returns ``(h, pools)``.
    """
    view = jax.tree.map(jnp.asarray, view)
    b, t = h.shape[:2]
    page, hkv, hd = cfg.page_size, cfg.num_kv_heads, cfg.head_dim
    pos = start[:, None] + jnp.arange(t)[None]  # [B, T]
    live = jnp.arange(t)[None] < n_valid[:, None]
    rows = n_valid > 0
    s_in = jnp.where(rows, state_in, -1)
    s_out = jnp.where(rows, state_out, pools[CONV].shape[1])  # padding rows: dropped
    order = conv_pool_order(cfg, tp) if tp > 1 else None
    to_model = None if order is None else np.argsort(order).astype(np.int32)

    def linear(h, pools, li):
        p = _take(sp, li)
        kc = view.local_to_subpool[CONV][li]  # sub-pool ids, never the local id
        kr = view.local_to_subpool[REC][li]
        conv = read_state(pools[CONV], kc, s_in, tp, to_model)
        rec = read_state(pools[REC], kr, s_in, tp)
        x = L.rms_norm(h, p["attn_norm"], cfg.eps)
        step = functools.partial(linear_chunk, cfg, p)
        out, conv, rec = jax.vmap(step)(x, conv, rec, n_valid)
        pools = dict(pools)
        pools[CONV] = write_state(pools[CONV], kc, s_out, conv, tp, order)
        pools[REC] = write_state(pools[REC], kr, s_out, rec, tp)
        return mlp_block(cfg, p, h + out), pools

    def attention(h, pools, li):
        p = _take(sp, li)
        kk = view.local_to_subpool[KV][li]
        x = L.rms_norm(h, p["attn_norm"], cfg.eps)
        q, k, v, gate = jax.vmap(functools.partial(attention_inputs, cfg, p))(x, pos)
        w, n_pages = full.shape[1], pools[KV].shape[1]
        pg = pos // page
        target = jnp.take_along_axis(full, jnp.clip(pg, 0, w - 1), axis=1)
        target = jnp.where(live & (pg < w) & (target >= 0), target, n_pages)  # else dropped
        kv = _rank_slice(jnp.stack([k, v], axis=2), 3, tp)  # [B, T, 2, Hkv/tp, D]
        arr = pools[KV].at[kk, target, :, pos % page].set(kv, mode="drop")
        pages = _gather_tp(arr[kk, jnp.maximum(full, 0)], 4, tp)  # [B, W, 2, page, Hkv, D]
        kb = pages[:, :, 0].reshape(b, w * page, hkv, hd)
        vb = pages[:, :, 1].reshape(b, w * page, hkv, hd)
        o = jax.vmap(functools.partial(attention_cached, cfg))(q, kb, vb, pos)
        out = jax.vmap(functools.partial(attention_output, cfg, p))(o, gate)
        return mlp_block(cfg, p, h + out), {**pools, KV: arr}

    def body(carry, li):
        h, pools, fetched = carry
        if load is not None:  # layer li's rows land now; layer li + 1's start moving
            pools = apply_layer(pools, load, fetched, view, li)
            fetched = fetch_layer(load, view, li + 1)
        kind, ok = view.attention_kind[li], view.layer_valid[li]
        at = jnp.where(ok & (kind == AttentionKind.LINEAR), 0, 2)
        at = jnp.where(ok & (kind == AttentionKind.FULL), 1, at)
        fns = [
            functools.partial(linear, li=li),
            functools.partial(attention, li=li),
            lambda h, pools: (h, pools),  # padding layer
        ]
        h, pools = jax.lax.switch(at, fns, h, pools)
        return (h, pools, fetched), None

    fetched = {} if load is None else fetch_layer(load, view, 0)
    n = view.attention_kind.shape[0]
    (h, pools, _), _ = jax.lax.scan(body, (h, dict(pools), fetched), jnp.arange(n))
    return h, pools
