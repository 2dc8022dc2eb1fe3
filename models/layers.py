"""Math primitives of the tiny DSV4 model, shared by the dense reference and the
paged/streaming forward.

Only cache-independent pieces live here: norms, interleaved trailing-slice RoPE,
projections, the per-channel softmax pooling of a compressor window, the
lightning-indexer score and the single sink softmax over a union of key sets.
How windows are assembled (the part a cache can get wrong) is written twice,
independently: densely in :mod:`models.reference` and from pooled state in
:mod:`models.chunk`.

Parameters are plain pytrees (see :mod:`models.dsv4`): a layer is a dict with the
attention / MLP weights, plus ``"comp"`` (its compressor) for ratio-4 and HCA
layers and ``"idx"`` (the lightning indexer with its own compressor) for ratio-4
layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def rms_norm(x, weight, eps):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x if weight is None else x * weight


def rope(x, pos, theta: float, rope_dim: int, inverse: bool = False):
    """Interleaved (GPT-J) RoPE on the trailing ``rope_dim`` channels of ``x``.

    ``pos`` broadcasts against ``x.shape[:-1]``; pair ``i`` is rotated by
    ``pos * theta**(-2i/rope_dim)`` (negated when ``inverse``).
    """
    half = rope_dim // 2
    freqs = jnp.asarray(theta, jnp.float32) ** (
        -jnp.arange(half, dtype=jnp.float32) * 2.0 / rope_dim
    )
    ang = jnp.asarray(pos, jnp.float32)[..., None] * freqs
    if inverse:
        ang = -ang
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    rot = rot.reshape(*rot.shape[:-1], half, 2)
    x0, x1 = rot[..., 0], rot[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return jnp.concatenate([nope, out.reshape(*out.shape[:-2], rope_dim)], axis=-1)


# ------------------------------------------------------------------ projections
def q_proj(p, x, pos, cfg, theta):
    """Query heads [T, H, D] (per-head unweighted RMSNorm, RoPE) and the latent c [T, q_lora]."""
    c = rms_norm(x @ p["wqa"], p["q_norm"], cfg.eps)
    q = (c @ p["wqb"]).reshape(x.shape[0], cfg.num_heads, cfg.head_dim)
    q = rope(rms_norm(q, None, cfg.eps), pos[:, None], theta, cfg.rope_dim)
    return q, c


def kv_proj(p, x, pos, cfg, theta):
    """The single shared K=V head [T, D]: weighted kv_norm, then RoPE."""
    return rope(rms_norm(x @ p["wkv"], p["kv_norm"], cfg.eps), pos, theta, cfg.rope_dim)


def comp_raw(cp, x):
    """Raw compressor rows per token: ``[kv | score]`` before the APE.

    For C4 this is ``[kv_A | kv_B | score_A | score_B]`` (``4 * D_c``), the
    layout of a C4 ring slot; for HCA ``[kv | score]`` (``2 * D``).
    """
    return jnp.concatenate([x @ cp["wkv"], x @ cp["wgate"]], axis=-1)


def pool_window(vals, scores, norm_w, pos, cfg, theta):
    """Pool windows: per-channel softmax over the slot axis (-2), RMSNorm, RoPE at ``pos``.

    ``vals``/``scores``: [..., slots, D_c]; ``pos``: [...]. Returns [..., D_c].
    """
    w = jax.nn.softmax(scores, axis=-2)
    pooled = jnp.sum(w * vals, axis=-2)
    return rope(rms_norm(pooled, norm_w, cfg.eps), pos, theta, cfg.rope_dim)


def c4_slots(prev_rows, own_rows, ape, first_window):
    """Assemble the 8 slots of C4 entries from raw rows.

    ``prev_rows``: [E, 4, 4Dc] raw rows of tokens ``4j-4..4j-1`` (A halves used);
    ``own_rows``: [E, 4, 4Dc] raw rows of tokens ``4j..4j+3`` (B halves used);
    ``ape``: [4, 2Dc]; ``first_window``: [E] bool, True for ``j == 0`` (A slots
    absent: kv 0, score -inf).  Returns ``(vals, scores)`` [E, 8, Dc].
    """
    dc = ape.shape[-1] // 2
    vals = jnp.concatenate([prev_rows[..., :dc], own_rows[..., dc : 2 * dc]], axis=-2)
    sc_a = prev_rows[..., 2 * dc : 3 * dc] + ape[:, :dc]
    sc_b = own_rows[..., 3 * dc :] + ape[:, dc:]
    first = first_window[:, None, None]
    vals = jnp.concatenate([jnp.where(first, 0.0, vals[..., :4, :]), vals[..., 4:, :]], axis=-2)
    sc_a = jnp.where(first, NEG_INF, sc_a)
    return vals, jnp.concatenate([sc_a, sc_b], axis=-2)


def hca_slots(rows, ape):
    """HCA window slots from raw rows [E, r, 2D]: ``(vals, scores)`` [E, r, D]."""
    d = ape.shape[-1]
    return rows[..., :d], rows[..., d:] + ape


# --------------------------------------------------------------------- indexer
def indexer_query(ip, x, c, pos, cfg, theta):
    """Indexer queries [T, H_I, D_I] (RoPE, no norm) and head weights [T, H_I]."""
    qi = (c @ ip["wqb"]).reshape(x.shape[0], cfg.index_heads, cfg.index_head_dim)
    qi = rope(qi, pos[:, None], theta, cfg.rope_dim)
    w = (x @ ip["wproj"]) * (cfg.index_head_dim**-0.5 * cfg.index_heads**-0.5)
    return qi, w


def indexer_topk(qi, w, keys, eligible, k):
    """ReLU-weighted index score, masked to ``eligible`` [T, N], top-k by ``jax.lax.top_k``.

    Returns ``(idx [T, K], valid [T, K])``; picks landing on ineligible entries
    are invalid (the reference's ``-1``).  ``keys`` is padded to at least K rows.
    """
    n = keys.shape[0]
    if n < k:
        keys = jnp.pad(keys, ((0, k - n), (0, 0)))
        eligible = jnp.pad(eligible, ((0, 0), (0, k - n)))
    dots = jnp.einsum("thd,nd->thn", qi, keys)
    score = jnp.einsum("th,thn->tn", w, jax.nn.relu(dots))
    score = jnp.where(eligible, score, NEG_INF)
    vals, idx = jax.lax.top_k(score, k)
    return idx, vals > NEG_INF


# ------------------------------------------------------------------- attention
def sink_attention(q, key_sets, sink, cfg):
    """One softmax over the union of key sets plus a per-head sink logit (value 0).

    ``key_sets``: list of ``(keys, mask)``; ``keys`` is [S, D] (shared by all
    queries) or [T, S, D] (per query), ``mask`` is [T, S].  V = K.
    Returns o [T, H, D].
    """
    scale = cfg.head_dim**-0.5
    logits, values = [], []
    for keys, mask in key_sets:
        eq = "thd,sd->ths" if keys.ndim == 2 else "thd,tsd->ths"
        lg = jnp.einsum(eq, q, keys) * scale
        logits.append(jnp.where(mask[:, None, :], lg, NEG_INF))
        values.append(keys)
    t, h = q.shape[:2]
    sink_col = jnp.broadcast_to(sink[None, :, None], (t, h, 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits, sink_col], axis=-1), axis=-1)
    out, off = 0.0, 0
    for keys, lg in zip(values, logits, strict=True):
        pr = probs[..., off : off + lg.shape[-1]]
        off += lg.shape[-1]
        eq = "ths,sd->thd" if keys.ndim == 2 else "ths,tsd->thd"
        out = out + jnp.einsum(eq, pr, keys)
    return out


def attn_out(p, o, pos, cfg, theta):
    """Inverse RoPE at the query position, grouped low-rank output projection."""
    o = rope(o, pos[:, None], theta, cfg.rope_dim, inverse=True)
    t = o.shape[0]
    o = o.reshape(t, cfg.o_groups, -1)
    u = jnp.einsum("tgi,gri->tgr", o, p["woa"])
    return u.reshape(t, -1) @ p["wob"]


def mlp(p, x):
    return (jax.nn.silu(x @ p["w1"]) * (x @ p["w3"])) @ p["w2"]


def embed(params, tokens):
    return params["embed"][tokens]


def lm_head(params, h, cfg):
    return rms_norm(h, params["final_norm"], cfg.eps) @ params["lm_head"]
