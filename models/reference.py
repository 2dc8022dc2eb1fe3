"""Dense oracle forward of the tiny DSV4 model: no pages, no cache, no streaming.

Every compressed entry of the whole sequence is computed at once from the
per-token projections (windows by reshape, the C4 overlap by shifting the
window array by one), and each query sees exactly the keys of the causality
table of ``DSV4_MODEL.md`` §5:

    SWA raw     s in [t-W+1, t]
    C4 entry j  j < (t+1)//4, chosen by the indexer top-K (all if <= K)
    HCA entry j j < (t+1)//r, dense
    sink        always

:func:`reference_with_margins` also reports how far each query's top-K selection is from a
tie (``DSV4_MODEL.md`` §8.4) so tests can tell a real mismatch from an fp32
near-tie flip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import layers as L
from models.config import C4_RATIO, TinyDSV4Config


def _c4_entries(cfg, cp, x, theta):
    """All C4 entries of the sequence: [T//4, Dc]."""
    n = x.shape[0] // C4_RATIO
    raw = L.comp_raw(cp, x)[: n * C4_RATIO].reshape(n, C4_RATIO, -1)  # window j: tokens 4j..4j+3
    prev = jnp.concatenate([jnp.zeros_like(raw[:1]), raw[:-1]], axis=0)  # window j-1
    j = jnp.arange(n)
    vals, scores = L.c4_slots(prev, raw, cp["ape"], j == 0)
    return L.pool_window(vals, scores, cp["norm"], C4_RATIO * j, cfg, theta)


def _hca_entries(cfg, cp, x, theta):
    r = cfg.hca_ratio
    n = x.shape[0] // r
    raw = L.comp_raw(cp, x)[: n * r].reshape(n, r, -1)
    vals, scores = L.hca_slots(raw, cp["ape"])
    return L.pool_window(vals, scores, cp["norm"], r * jnp.arange(n), cfg, theta)


def _indexer_scores(cfg, ip, x, c, pos, theta):
    """(scores [T, N4] masked to eligible, eligible) of one C4 layer."""
    keys = _c4_entries(cfg, ip["comp"], x, theta)
    qi, w = L.indexer_query(ip, x, c, pos, cfg, theta)
    eligible = jnp.arange(keys.shape[0])[None] < ((pos + 1) // C4_RATIO)[:, None]
    return qi, w, keys, eligible


def _layer(cfg, layer, p, h, pos, aux):
    ratio = cfg.compress_ratios[layer]
    theta = cfg.layer_theta(layer)
    x = L.rms_norm(h, p["attn_norm"], cfg.eps)
    q, c = L.q_proj(p, x, pos, cfg, theta)
    k = L.kv_proj(p, x, pos, cfg, theta)
    window = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - cfg.window)
    key_sets = [(k, window)]
    if ratio == C4_RATIO:
        kv = _c4_entries(cfg, p["comp"], x, theta)
        qi, w, ikeys, eligible = _indexer_scores(cfg, p["idx"], x, c, pos, theta)
        sel, ok = L.indexer_topk(qi, w, ikeys, eligible, cfg.index_topk)
        kv = jnp.pad(kv, ((0, max(0, cfg.index_topk - kv.shape[0])), (0, 0)))
        key_sets.append((kv[sel], ok))
        if aux is not None:
            aux.append(topk_margin(cfg, qi, w, ikeys, eligible))
    elif ratio:
        kv = _hca_entries(cfg, p["comp"], x, theta)
        key_sets.append((kv, jnp.arange(kv.shape[0])[None] < ((pos + 1) // ratio)[:, None]))
    o = L.sink_attention(q, key_sets, p["sink"], cfg)
    h = h + L.attn_out(p, o, pos, cfg, theta)
    return h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.eps))


def topk_margin(cfg, qi, w, keys, eligible):
    """Per query: distance of the top-K selection from a flip ([T]; +inf when n_4 <= K).

    The score gap between the K-th and (K+1)-th eligible entry.  An exact tie
    at 0 between entries with all heads masked by the ReLU is resolved by index
    identically everywhere; its margin is the smallest |q.k| of those entries.
    """
    k = cfg.index_topk
    dots = jnp.einsum("thd,nd->thn", qi, keys)
    score = jnp.einsum("th,thn->tn", w, jax.nn.relu(dots))
    score = jnp.where(eligible, score, -jnp.inf)
    if score.shape[1] <= k:
        return jnp.full(score.shape[:1], jnp.inf)
    top = jax.lax.top_k(score, k + 1)[0]
    gap = top[:, k - 1] - top[:, k]
    zero_tie = (gap == 0) & (top[:, k] == 0)
    kink = jnp.where(eligible & (score == 0), jnp.min(jnp.abs(dots), axis=1), jnp.inf).min(axis=1)
    gap = jnp.where(zero_tie, kink, gap)
    return jnp.where(jnp.isfinite(top[:, k]), gap, jnp.inf)


def _forward(cfg, params, tokens, aux):
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.arange(tokens.shape[0])
    h = L.embed(params, tokens)
    for layer, p in enumerate(params["layers"]):
        h = _layer(cfg, layer, p, h, pos, aux)
    return L.lm_head(params, h, cfg)


def reference_forward(cfg: TinyDSV4Config, params: dict, tokens) -> jax.Array:
    """Logits ``[T, vocab]`` of ``tokens`` (positions ``0..T-1``), densely."""
    return _forward(cfg, params, tokens, None)


def _with_margins(cfg, params, tokens):
    aux: list = []
    logits = _forward(cfg, params, tokens, aux)
    margins = jnp.stack(aux) if aux else jnp.full((0, tokens.shape[0]), jnp.inf)
    return logits, margins


@functools.cache
def _jitted():
    from models.stage import compiler_options

    return jax.jit(_with_margins, static_argnums=0, compiler_options=compiler_options())


def reference_with_margins(cfg: TinyDSV4Config, params: dict, tokens):
    """Jitted reference: ``(logits [T, V], margins [n_c4_layers, T])``.

    ``margins``: per C4 layer and query, the distance of the indexer's top-K
    selection from a flip (see :func:`topk_margin`; ``inf`` where ``n_4(t) <= K``).
    """
    from models.stage import MATMUL_PRECISION

    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _jitted()(cfg, params, jnp.asarray(tokens, jnp.int32))
