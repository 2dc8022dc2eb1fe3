"""The tiny MLA + DSA model: parameters, shared math and the dense reference forward.

Per layer (pre-norm residual): attention, then a dense SwiGLU MLP.

* **MLA.** A query latent ``cq = rmsnorm(x W_qa)``, heads ``q = cq W_qb``
  (``q_nope`` then ``q_rope``, RoPE on the trailing ``rope_dim``). Per token a
  cached row ``[c, k_rope]``: ``c = rmsnorm(x W_dkv)`` (``kv_lora_rank``) and
  ``k_rope = rope(x W_kr, pos)`` (``rope_dim``).  Head ``h`` sees
  ``score[h, s] = (q_nope[h] · W_uk[h] c_s + q_rope[h] · k_rope_s) / sqrt(nope + rope)``
  and values ``v[h, s] = W_uv[h] c_s``.  The dense reference builds ``k_nope`` and
  ``v`` per head; the paged model uses the absorbed form
  (``(W_uk[h]ᵀ q_nope[h]) · c_s``, then ``W_uv[h] (Σ p c)``).
* **DSA lightning indexer** (layers of kind ``MLA_DSA``): queries
  ``q_I = rope(cq W_qI)`` ``[index_heads, index_head_dim]``, head weights
  ``w = x W_w / sqrt(H_I D_I)``, one key per token ``k_I = rope(rmsnorm(x W_kI))``.
  The key goes through a real fp8 round trip before anything uses it
  (:func:`fp8_quant`: one power-of-two scale per token, like ue8m0
  ``act_quant``).  ``I[t, s] = Σ_j w_j relu(q_I[j] · k̂_s)`` over ``s <= t``;
  ``jax.lax.top_k`` picks ``index_topk`` tokens (all when fewer are visible), and
  attention is one softmax over the selected tokens only (no sink).
* Layers of kind ``MLA`` reuse the selection of the nearest preceding owner.

Cached rows (:func:`index_row_bytes` / :func:`decode_index_row` are the byte
layout of ``DSA_INDEXER``): a page's ``page × index_head_dim`` fp8 key bytes,
token-major, then its ``page`` fp32 scales (little-endian, by bitcast).

Parameters are a plain pytree, layers by global id::

    {"embed": [V, d], "final_norm": [d], "lm_head": [d, V], "layers": [layer, ...]}
    layer = {"attn_norm", "wqa", "q_norm", "wqb", "wdkv", "kv_norm", "wkr",
             "w_uk" [H, nope, L], "w_uv" [H, v, L], "wo", "mlp_norm", "w1", "w2", "w3",
             "idx": {"wqb", "wproj", "wk", "k_norm"}}   # "idx" on owner layers only
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import layers as L
from models.mla_config import FP8_MAX, TinyMLAConfig
from models.reference import topk_margin

__all__ = [
    "absorbed_attention",
    "decode_index_row",
    "fp8_dequant",
    "fp8_quant",
    "index_keys",
    "index_row_bytes",
    "init_mla_params",
    "latent_rows",
    "mla_reference_forward",
    "mla_reference_with_margins",
    "query_heads",
    "select_tokens",
]

FP8 = jnp.float8_e4m3fn
_SCALE_FLOOR = 1e-4


# ------------------------------------------------------------------ parameters
def init_mla_params(cfg: TinyMLAConfig, seed: int = 0) -> dict:
    """Random parameters (host numpy, deterministic in ``seed``); see the module docstring."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm_w(n, scale=1.0):
        return (scale * (1.0 + 0.1 * rng.standard_normal(n))).astype(np.float32)

    d, h, lat = cfg.hidden, cfg.num_heads, cfg.kv_lora_rank
    layers = []
    for g in range(cfg.num_layers):
        p = {
            "attn_norm": norm_w(d),
            "wqa": normal((d, cfg.q_lora), d**-0.5),
            "q_norm": norm_w(cfg.q_lora),
            "wqb": normal((cfg.q_lora, h * cfg.qk_head_dim), cfg.q_lora**-0.5),
            "wdkv": normal((d, lat), d**-0.5),
            "kv_norm": norm_w(lat, cfg.kv_norm_scale),
            "wkr": normal((d, cfg.rope_dim), 2 * d**-0.5),
            "w_uk": normal((h, cfg.qk_nope_dim, lat), lat**-0.5),
            "w_uv": normal((h, cfg.v_head_dim, lat), lat**-0.5),
            "wo": normal((h * cfg.v_head_dim, d), (h * cfg.v_head_dim) ** -0.5),
            "mlp_norm": norm_w(d),
            "w1": normal((d, cfg.mlp_hidden), d**-0.5),
            "w3": normal((d, cfg.mlp_hidden), d**-0.5),
            "w2": normal((cfg.mlp_hidden, d), cfg.mlp_hidden**-0.5),
        }
        if g in cfg.owner_layers:
            hi, di = cfg.index_heads, cfg.index_head_dim
            p["idx"] = {
                "wqb": normal((cfg.q_lora, hi * di), cfg.q_lora**-0.5),
                "wproj": normal((d, hi), d**-0.5),
                "wk": normal((d, di), d**-0.5),
                "k_norm": norm_w(di),
            }
        layers.append(p)
    return {
        "embed": normal((cfg.vocab, d), 1.0),
        "final_norm": norm_w(d),
        "lm_head": normal((d, cfg.vocab), d**-0.5),
        "layers": layers,
    }


# ------------------------------------------------------------------ shared math
def query_heads(p, x, pos, cfg: TinyMLAConfig):
    """``(q [T, H, nope + rope], cq [T, q_lora])``: RoPE on each head's trailing slice."""
    cq = L.rms_norm(x @ p["wqa"], p["q_norm"], cfg.eps)
    q = (cq @ p["wqb"]).reshape(x.shape[0], cfg.num_heads, cfg.qk_head_dim)
    return L.rope(q, pos[:, None], cfg.rope_theta, cfg.rope_dim), cq


def latent_rows(p, x, pos, cfg: TinyMLAConfig):
    """The cached row of each token, ``[c, k_rope]`` ``[T, kv_lora_rank + rope_dim]``."""
    c = L.rms_norm(x @ p["wdkv"], p["kv_norm"], cfg.eps)
    row = jnp.concatenate([c, x @ p["wkr"]], axis=-1)
    return L.rope(row, pos, cfg.rope_theta, cfg.rope_dim)


def index_keys(ip, x, pos, cfg: TinyMLAConfig):
    """Indexer keys before quantization ``[T, index_head_dim]`` (RMSNorm, RoPE)."""
    k = L.rms_norm(x @ ip["wk"], ip["k_norm"], cfg.eps)
    return L.rope(k, pos, cfg.rope_theta, cfg.rope_dim)


def fp8_quant(k):
    """Per-token fp8 quantization: ``(k_fp8 [..., D] float8_e4m3fn, scale [...] f32)``.

    ``scale = 2^ceil(log2(max(amax, 1e-4) / 448))``: a power of two, so ``k / scale``
    is exact and ``|k / scale| <= 448``.
    """
    amax = jnp.max(jnp.abs(k), axis=-1)
    scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, _SCALE_FLOOR) / FP8_MAX)))
    return (k / scale[..., None]).astype(FP8), scale.astype(jnp.float32)


def fp8_dequant(k_fp8, scale):
    """``k_fp8 * scale`` in float32 (the keys every consumer of the indexer uses)."""
    return k_fp8.astype(jnp.float32) * scale[..., None]


def index_row_bytes(k_fp8, scale):
    """A token's ``DSA_INDEXER`` bytes ``[..., D + 4]``: its fp8 key, then its fp32 scale."""
    kb = jax.lax.bitcast_convert_type(k_fp8, jnp.uint8)
    sb = jax.lax.bitcast_convert_type(scale, jnp.uint8)  # [..., 4], native = little-endian
    return jnp.concatenate([kb, sb], axis=-1)


def index_byte_offsets(slot, page: int, dim: int):
    """Byte offsets in a page row of the ``D + 4`` bytes of the token at ``slot`` ``[..., D + 4]``."""
    slot = jnp.asarray(slot)[..., None]
    keys = slot * dim + jnp.arange(dim)
    scales = page * dim + 4 * slot + jnp.arange(4)
    return jnp.concatenate([keys, scales], axis=-1)


def decode_index_row(row, page: int, dim: int):
    """``DSA_INDEXER`` page rows ``[..., page * (dim + 4)]`` uint8 -> keys ``[..., page, dim]`` f32."""
    row = jnp.asarray(row)
    lead = row.shape[:-1]
    kb = row[..., : page * dim].reshape(*lead, page, dim)
    sb = row[..., page * dim :].reshape(*lead, page, 4)
    k_fp8 = jax.lax.bitcast_convert_type(kb, FP8)
    scale = jax.lax.bitcast_convert_type(sb, jnp.float32)
    return fp8_dequant(k_fp8, scale)


def select_tokens(ip, x, cq, pos, keys, eligible, cfg: TinyMLAConfig):
    """Indexer top-k: ``(idx [T, K], valid [T, K], qi, w)`` over dequantized ``keys`` [N, D_I]."""
    qi, w = L.indexer_query(ip, x, cq, pos, cfg, cfg.rope_theta)
    idx, ok = L.indexer_topk(qi, w, keys, eligible, cfg.index_topk)
    return idx, ok, qi, w


def absorbed_attention(p, q, rows, ok, cfg: TinyMLAConfig):
    """Attention over each query's selected rows ``[T, K, L + R]`` (mask ``ok`` [T, K]),
    in the absorbed form; returns the output projection's input ``[T, H * v]``."""
    lat = cfg.kv_lora_rank
    q_nope, q_rope = q[..., : cfg.qk_nope_dim], q[..., cfg.qk_nope_dim :]
    c, kr = rows[..., :lat], rows[..., lat:]
    q_abs = jnp.einsum("thn,hnl->thl", q_nope, p["w_uk"])
    s = jnp.einsum("thl,tkl->thk", q_abs, c) + jnp.einsum("thr,tkr->thk", q_rope, kr)
    s = jnp.where(ok[:, None, :], s * cfg.qk_head_dim**-0.5, L.NEG_INF)
    probs = jax.nn.softmax(s, axis=-1)
    o_lat = jnp.einsum("thk,tkl->thl", probs, c)
    return jnp.einsum("thl,hvl->thv", o_lat, p["w_uv"]).reshape(q.shape[0], -1)


def residual_tail(p, h, o, cfg: TinyMLAConfig):
    """``h + o W_o``, then the SwiGLU MLP's residual."""
    h = h + o @ p["wo"]
    return h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.eps))


# ------------------------------------------------------------ dense reference
def _layer(cfg, p, h, pos, sel, aux, keys_out=None):
    """One layer over the whole sequence, with per-head keys and values (not absorbed)."""
    lat, nope = cfg.kv_lora_rank, cfg.qk_nope_dim
    x = L.rms_norm(h, p["attn_norm"], cfg.eps)
    q, cq = query_heads(p, x, pos, cfg)
    rows = latent_rows(p, x, pos, cfg)
    c, kr = rows[:, :lat], rows[:, lat:]
    if "idx" in p:
        keys = fp8_dequant(*fp8_quant(index_keys(p["idx"], x, pos, cfg)))
        eligible = pos[None] <= pos[:, None]
        idx, ok, qi, w = select_tokens(p["idx"], x, cq, pos, keys, eligible, cfg)
        sel = (idx, ok)
        if keys_out is not None:
            keys_out.append(keys)
        if aux is not None:
            aux.append(topk_margin(cfg, qi, w, keys, eligible))
    idx, ok = sel
    t = pos.shape[0]
    mask = jnp.zeros((t, t), bool).at[jnp.arange(t)[:, None], jnp.where(ok, idx, t)]
    mask = mask.set(True, mode="drop")
    k_nope = jnp.einsum("sl,hnl->shn", c, p["w_uk"])
    v = jnp.einsum("sl,hvl->shv", c, p["w_uv"])
    s = jnp.einsum("thn,shn->ths", q[..., :nope], k_nope)
    s = (s + jnp.einsum("thr,sr->ths", q[..., nope:], kr)) * cfg.qk_head_dim**-0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None, :], s, L.NEG_INF), axis=-1)
    o = jnp.einsum("ths,shv->thv", probs, v).reshape(t, -1)
    return residual_tail(p, h, o, cfg), sel


def _forward(cfg, params, tokens, aux, keys_out=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.arange(tokens.shape[0])
    h = L.embed(params, tokens)
    sel = None
    for p in params["layers"]:
        h, sel = _layer(cfg, p, h, pos, sel, aux, keys_out)
    return L.lm_head(params, h, cfg)


def mla_reference_forward(cfg: TinyMLAConfig, params: dict, tokens) -> jax.Array:
    """Logits ``[T, vocab]`` of ``tokens`` at positions ``0..T-1``, densely (not jitted)."""
    from models.stage import MATMUL_PRECISION

    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _forward(cfg, params, tokens, None)


def _with_margins(cfg, params, tokens):
    aux: list = []
    keys: list = []
    logits = _forward(cfg, params, tokens, aux, keys)
    return logits, jnp.stack(aux), jnp.stack(keys)


@functools.cache
def _jitted():
    from models.stage import compiler_options

    return jax.jit(_with_margins, static_argnums=0, compiler_options=compiler_options())


def mla_reference_with_margins(cfg: TinyMLAConfig, params: dict, tokens):
    """Jitted reference: ``(logits [T, V], margins [n_owners, T], keys [n_owners, T, D_I])``.

    ``margins``: per indexer-owning layer and query, the score gap between the
    K-th and (K+1)-th visible token (``inf`` while at most K are visible), so a
    test can avoid inputs whose selection is a near-tie.  ``keys``: each owner's
    dequantized indexer keys (what its selection used).
    """
    from models.stage import MATMUL_PRECISION

    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _jitted()(cfg, params, jnp.asarray(tokens, jnp.int32))
