"""The tiny hybrid recurrent-state model (Qwen3-Next style): parameters, the
per-token math shared by both forwards, and the dense reference forward.

Layers (:class:`~models.hybrid_config.TinyHybridConfig`): gated DeltaNet
linear attention, with full GQA attention every ``full_attention_interval``-th
layer; each layer is pre-norm residual with a dense SwiGLU MLP.

Gated DeltaNet layer, per token ``t`` and value head ``h`` (q/k head
``h // (v_heads // k_heads)``)::

    [q|k|v] = silu(causal depthwise conv_K(x @ w_qkv))   # conv over the C = conv_dim channels
    q = l2norm(q) / sqrt(k_dim),  k = l2norm(k)
    g = -exp(A_log) * softplus(x @ w_a + dt_bias),  beta = sigmoid(x @ w_b)
    S = S * exp(g);  delta = beta * (v - S^T k);  S = S + k delta^T;  o = S^T q
    out = (rmsnorm(o) * silu(x @ w_z)) @ w_out             # S: [k_dim, v_dim] per v head

Full attention layer: per-head RMSNorm on q and k, RoPE (trailing ``rope_dim``
channels, at the absolute position), causal GQA softmax attention over the whole
prefix, a sigmoid output gate ``x @ w_gate`` (Qwen3-Next's gated attention),
then ``wo``.  Its K (post-norm, post-RoPE) and V per token are what a page
cache holds.

The dense reference written here is independent of the streaming forward
(:mod:`models.hybrid_streaming`) where it matters for the cache:

* the conv is one ``lax.conv_general_dilated`` over the whole zero-padded
  sequence (streaming: shifted sums over the conv state and the chunk);
* the delta rule is its closed parallel form over the whole sequence (a
  unit lower-triangular solve for every ``delta`` at once, then decay-masked
  ``q.k`` products; streaming: a ``lax.scan`` of the recurrence);
* attention is a full ``[T, T]`` causal matrix per K/V group (streaming: the
  chunk's queries against a K/V buffer of every earlier position).

The per-chunk pieces both the streaming and the paged forward run
(:func:`conv_stream`, :func:`delta_rule_scan`, :func:`linear_chunk`,
:func:`attention_cached`) live here too.

Parameters are a plain pytree::

    {"embed": [V, d], "final_norm": [d], "lm_head": [d, V], "layers": [...]}
    linear layer: attn_norm, w_qkv [d, C], conv_w [C, K], w_z [d, Hv*Dv],
                  w_a, w_b [d, Hv], A_log, dt_bias [Hv], o_norm [Dv], w_out [Hv*Dv, d]
    full layer:   attn_norm, wq, w_gate [d, H*D], wk, wv [d, Hkv*D], q_norm, k_norm [D],
                  wo [H*D, d]
    both:         mlp_norm, w1, w3 [d, F], w2 [F, d]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import layers as L
from models.hybrid_config import LayerKind, TinyHybridConfig

MATMUL_PRECISION = "highest"
"""fp32 matmuls everywhere (no TF32 on GPUs), as in the DSV4 model."""

L2_EPS = 1e-6


# -------------------------------------------------------------------- params
def _normal(rng, shape, std):
    return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)


def _norm_weight(rng, n):
    return jnp.asarray(1.0 + 0.1 * rng.standard_normal(n), jnp.float32)


def _linear_layer(cfg: TinyHybridConfig, rng) -> dict:
    d, c = cfg.hidden, cfg.conv_dim
    return {
        "w_qkv": _normal(rng, (d, c), d**-0.5),
        "conv_w": _normal(rng, (c, cfg.conv_kernel), cfg.conv_kernel**-0.5),
        "w_z": _normal(rng, (d, cfg.value_dim), d**-0.5),
        "w_a": _normal(rng, (d, cfg.v_heads), d**-0.5),
        "w_b": _normal(rng, (d, cfg.v_heads), d**-0.5),
        # decay rates exp(A_log) in [0.1, 1) and softplus(a + dt_bias) ~ 0.05..0.3:
        # per-token decays of ~0.5%..25%, so the state remembers tens of tokens
        "A_log": jnp.asarray(np.log(rng.uniform(0.1, 1.0, cfg.v_heads)), jnp.float32),
        "dt_bias": jnp.asarray(rng.uniform(-3.0, -1.0, cfg.v_heads), jnp.float32),
        "o_norm": _norm_weight(rng, cfg.v_dim),
        "w_out": _normal(rng, (cfg.value_dim, d), cfg.value_dim**-0.5),
    }


def _attention_layer(cfg: TinyHybridConfig, rng) -> dict:
    d, hd, kvd = cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "wq": _normal(rng, (d, hd), d**-0.5),
        "w_gate": _normal(rng, (d, hd), d**-0.5),
        "wk": _normal(rng, (d, kvd), d**-0.5),
        "wv": _normal(rng, (d, kvd), d**-0.5),
        # q/k norm weights > 1: sharper (less uniform) attention
        "q_norm": 2.0 * _norm_weight(rng, cfg.head_dim),
        "k_norm": 2.0 * _norm_weight(rng, cfg.head_dim),
        "wo": _normal(rng, (hd, d), hd**-0.5),
    }


def init_params(cfg: TinyHybridConfig, seed: int = 0) -> dict:
    """Random fp32 parameters (host ``numpy`` draws: deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden, cfg.mlp_hidden
    layers = []
    for kind in cfg.layer_kinds:
        p = {"attn_norm": _norm_weight(rng, d)}
        p.update(
            _linear_layer(cfg, rng) if kind is LayerKind.LINEAR else _attention_layer(cfg, rng)
        )
        p.update(
            mlp_norm=_norm_weight(rng, d),
            w1=_normal(rng, (d, f), d**-0.5),
            w3=_normal(rng, (d, f), d**-0.5),
            w2=_normal(rng, (f, d), f**-0.5),
        )
        layers.append(p)
    return {
        "embed": _normal(rng, (cfg.vocab, d), 1.0),
        "layers": layers,
        "final_norm": _norm_weight(rng, d),
        "lm_head": _normal(rng, (d, cfg.vocab), d**-0.5),
    }


# ------------------------------------------------- shared per-token math
def l2norm(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def linear_inputs(p, x):
    """Per-token projections of a linear layer: ``(mixed [T, C], z, a, b)``.

    ``mixed`` is the pre-conv input (what the conv state keeps), ``z`` the
    output gate ``[T, Hv*Dv]``, ``a`` / ``b`` ``[T, Hv]``.
    """
    return x @ p["w_qkv"], x @ p["w_z"], x @ p["w_a"], x @ p["w_b"]


def linear_heads(cfg: TinyHybridConfig, act):
    """Split the post-conv activations ``[T, C]`` into per-v-head ``q, k [T, Hv, Dk]``
    (L2-normalised, q scaled by ``1/sqrt(Dk)``, q/k heads repeated to the v heads)
    and ``v [T, Hv, Dv]``."""
    t, kd = act.shape[0], cfg.key_dim
    q = l2norm(act[:, :kd].reshape(t, cfg.k_heads, cfg.k_dim)) * cfg.k_dim**-0.5
    k = l2norm(act[:, kd : 2 * kd].reshape(t, cfg.k_heads, cfg.k_dim))
    v = act[:, 2 * kd :].reshape(t, cfg.v_heads, cfg.v_dim)
    rep = cfg.v_heads // cfg.k_heads
    return jnp.repeat(q, rep, axis=1), jnp.repeat(k, rep, axis=1), v


def linear_gates(p, a, b):
    """Log-decay ``g = -exp(A_log) * softplus(a + dt_bias)`` and ``beta = sigmoid(b)``: [T, Hv]."""
    g = -jnp.exp(p["A_log"]) * jax.nn.softplus(a + p["dt_bias"])
    return g, jax.nn.sigmoid(b)


def linear_output(cfg: TinyHybridConfig, p, o, z):
    """``(rmsnorm(o) * silu(z)) @ w_out`` with ``o [T, Hv, Dv]``, ``z [T, Hv*Dv]``."""
    t = o.shape[0]
    gated = L.rms_norm(o, p["o_norm"], cfg.eps) * jax.nn.silu(z.reshape(o.shape))
    return gated.reshape(t, cfg.value_dim) @ p["w_out"]


def attention_inputs(cfg: TinyHybridConfig, p, x, pos):
    """``(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], gate [T, H, D])``: q/k normed and roped.

    ``k`` and ``v`` are exactly what a page cache stores per token.
    """
    t, d = x.shape[0], cfg.head_dim
    q = (x @ p["wq"]).reshape(t, cfg.num_heads, d)
    k = (x @ p["wk"]).reshape(t, cfg.num_kv_heads, d)
    q = L.rope(L.rms_norm(q, p["q_norm"], cfg.eps), pos[:, None], cfg.rope_theta, cfg.rope_dim)
    k = L.rope(L.rms_norm(k, p["k_norm"], cfg.eps), pos[:, None], cfg.rope_theta, cfg.rope_dim)
    v = (x @ p["wv"]).reshape(t, cfg.num_kv_heads, d)
    gate = (x @ p["w_gate"]).reshape(t, cfg.num_heads, d)
    return q, k, v, gate


def attention_output(cfg: TinyHybridConfig, p, o, gate):
    """``(o * sigmoid(gate)) @ wo`` with ``o``, ``gate`` ``[T, H, D]``."""
    t = o.shape[0]
    return (o * jax.nn.sigmoid(gate)).reshape(t, -1) @ p["wo"]


def mlp_block(cfg: TinyHybridConfig, p, h):
    return h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.eps))


# ---------------------------------------------- shared per-chunk math (streaming, paged)
def conv_stream(p, conv_state, mixed, n_valid):
    """Causal depthwise conv of a chunk continuing ``conv_state [C, K-1]``, then SiLU.

    Returns ``(act [T, C], new conv state [C, K-1])``: the last ``K-1`` pre-conv
    inputs up to the chunk's last valid token (``n_valid``; padding rows after it).
    """
    taps = p["conv_w"].shape[1]
    t = mixed.shape[0]
    ext = jnp.concatenate([conv_state.T, mixed], axis=0)  # [K-1+T, C]: positions start-K+1 ..
    out = sum(ext[i : i + t] * p["conv_w"][:, i] for i in range(taps))
    new_state = jax.lax.dynamic_slice_in_dim(ext, n_valid, taps - 1, axis=0).T
    return jax.nn.silu(out), new_state


def delta_rule_scan(state, q, k, v, g, beta, valid):
    """The gated delta rule token by token from ``state [Hv, Dk, Dv]``.

    Rows with ``valid`` False (chunk padding) leave the state unchanged.
    Returns ``(o [T, Hv, Dv], state)``.
    """

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t, ok = xs
        decayed = s * jnp.exp(g_t)[:, None, None]
        kv_mem = jnp.einsum("hkv,hk->hv", decayed, k_t)
        delta = (v_t - kv_mem) * b_t[:, None]
        new = decayed + k_t[:, :, None] * delta[:, None, :]
        o_t = jnp.einsum("hkv,hk->hv", new, q_t)
        return jnp.where(ok, new, s), o_t

    state, o = jax.lax.scan(step, state, (q, k, v, g, beta, valid))
    return o, state


def linear_chunk(cfg: TinyHybridConfig, p, x, conv, rec, n_valid):
    """One gated DeltaNet layer over a chunk ``x [T, d]`` (normed input) continuing the
    state ``conv [C, K-1]``, ``rec [Hv, Dk, Dv]``; rows ``>= n_valid`` are padding.

    Returns ``(layer output [T, d], new conv state, new recurrent state)``.
    """
    mixed, z, a, b = linear_inputs(p, x)
    act, new_conv = conv_stream(p, conv, mixed, n_valid)
    q, k, v = linear_heads(cfg, act)
    valid = jnp.arange(x.shape[0]) < n_valid
    o, new_rec = delta_rule_scan(rec, q, k, v, *linear_gates(p, a, b), valid)
    return linear_output(cfg, p, o, z), new_conv, new_rec


def attention_cached(cfg: TinyHybridConfig, q, k_buf, v_buf, pos):
    """The chunk's queries ``[T, H, D]`` against a K/V buffer ``[S, Hkv, D]`` whose row ``j``
    is position ``j``: key ``j`` is visible to ``pos_t`` iff ``j <= pos_t``."""
    rep = cfg.num_heads // cfg.num_kv_heads
    keys = jnp.repeat(k_buf, rep, axis=1)  # [S, H, D]: head h reads K/V head h // rep
    vals = jnp.repeat(v_buf, rep, axis=1)
    scores = jnp.einsum("thd,shd->ths", q, keys) * cfg.head_dim**-0.5
    visible = jnp.arange(k_buf.shape[0])[None, :] <= pos[:, None]  # [T, S]
    probs = jax.nn.softmax(jnp.where(visible[:, None, :], scores, -jnp.inf), axis=-1)
    return jnp.einsum("ths,shd->thd", probs, vals)


# ------------------------------------------------------- dense reference
def _conv_dense(p, mixed):
    """Causal depthwise conv of the whole sequence (zeros before position 0), then SiLU."""
    c, k = p["conv_w"].shape
    out = jax.lax.conv_general_dilated(
        mixed.T[None],  # [1, C, T]
        p["conv_w"][:, None, :],  # [C, 1, K]: tap K-1 multiplies the current token
        window_strides=(1,),
        padding=[(k - 1, 0)],
        dimension_numbers=("NCH", "OIH", "NCH"),
        feature_group_count=c,
    )
    return jax.nn.silu(out[0].T)


def delta_rule_parallel(q, k, v, g, beta):
    """The gated delta rule from a zero state, every token at once (per v head).

    With ``G_t = sum_{s<=t} g_s``, unrolling the recurrence gives
    ``S_t = sum_{s<=t} exp(G_t - G_s) k_s delta_s^T``, hence the deltas solve the
    unit lower-triangular system
    ``delta_t + beta_t sum_{s<t} exp(G_t - G_s) (k_t.k_s) delta_s = beta_t v_t``
    and ``o_t = sum_{s<=t} exp(G_t - G_s) (q_t.k_s) delta_s``.

    ``q, k [T, Hv, Dk]``, ``v [T, Hv, Dv]``, ``g, beta [T, Hv]``.  Returns
    ``(o [T, Hv, Dv], S_T [Hv, Dk, Dv])``.
    """
    t = q.shape[0]
    cum = jnp.cumsum(g, axis=0).T  # [Hv, T]
    diff = cum[:, :, None] - cum[:, None, :]  # [Hv, t, s]: G_t - G_s
    upto = jnp.tril(jnp.ones((t, t), bool))
    before = jnp.tril(jnp.ones((t, t), bool), -1)
    decay_le = jnp.exp(jnp.where(upto, diff, -jnp.inf))
    decay_lt = jnp.exp(jnp.where(before, diff, -jnp.inf))
    kk = jnp.einsum("thd,shd->hts", k, k)
    qk = jnp.einsum("thd,shd->hts", q, k)
    bt = beta.T[:, :, None]  # [Hv, T, 1]
    system = jnp.eye(t) + bt * decay_lt * kk  # [Hv, T, T], unit lower triangular
    rhs = bt * jnp.swapaxes(v, 0, 1)  # [Hv, T, Dv]
    solve = functools.partial(jax.scipy.linalg.solve_triangular, lower=True, unit_diagonal=True)
    delta = jax.vmap(solve)(system, rhs)  # [Hv, T, Dv]
    o = jnp.einsum("hts,hsv->thv", decay_le * qk, delta)
    last = jnp.exp(cum[:, -1:] - cum)  # [Hv, T]: exp(G_T - G_s)
    state = jnp.einsum("hs,shk,hsv->hkv", last, k, delta)
    return o, state


def _attention_dense(cfg: TinyHybridConfig, q, k, v):
    """Causal GQA with the full ``[T, T]`` score matrix per K/V group."""
    t = q.shape[0]
    rep = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(t, cfg.num_kv_heads, rep, cfg.head_dim)
    scores = jnp.einsum("tgrd,sgd->grts", qg, k) * cfg.head_dim**-0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    o = jnp.einsum("grts,sgd->tgrd", probs, v)
    return o.reshape(t, cfg.num_heads, cfg.head_dim)


def _reference(cfg: TinyHybridConfig, params: dict, tokens):
    pos = jnp.arange(tokens.shape[0])
    h = L.embed(params, tokens)
    for kind, p in zip(cfg.layer_kinds, params["layers"], strict=True):
        x = L.rms_norm(h, p["attn_norm"], cfg.eps)
        if kind is LayerKind.LINEAR:
            mixed, z, a, b = linear_inputs(p, x)
            q, k, v = linear_heads(cfg, _conv_dense(p, mixed))
            o, _ = delta_rule_parallel(q, k, v, *linear_gates(p, a, b))
            h = h + linear_output(cfg, p, o, z)
        else:
            q, k, v, gate = attention_inputs(cfg, p, x, pos)
            h = h + attention_output(cfg, p, _attention_dense(cfg, q, k, v), gate)
        h = mlp_block(cfg, p, h)
    return L.lm_head(params, h, cfg)


@functools.cache
def _reference_jit():
    from models.stage import compiler_options

    return jax.jit(_reference, static_argnums=0, compiler_options=compiler_options())


def reference_forward(cfg: TinyHybridConfig, params: dict, tokens) -> jax.Array:
    """Logits ``[T, vocab]`` of ``tokens`` at positions ``0..T-1``, densely (jitted)."""
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _reference_jit()(cfg, params, jnp.asarray(tokens, jnp.int32))
