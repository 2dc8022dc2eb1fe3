"""The tiny DSV4 model as Flax NNX modules, and its plain-pytree parameters.

The NNX modules own the (random) weights and their initialisation
(``DSV4_MODEL.md`` §8.1: sinks ~N(0,1), APE ~N(0,0.5), norm weights 1+N(0,0.1),
kv/compressor norms scaled by ``kv_norm_scale`` so attention is not uniform).
Every forward in this package is a pure function of the plain pytree
:func:`model_params` returns::

    {"embed": [V, d], "final_norm": [d], "lm_head": [d, V],
     "layers": [layer_0, ..., layer_{L-1}]}        # indexed by global layer id

    layer = {"attn_norm", "wqa", "q_norm", "wqb", "wkv", "kv_norm", "sink",
             "woa", "wob", "mlp_norm", "w1", "w2", "w3",
             "comp": {...}   # ratio-4 and HCA layers: the attention compressor
             "idx":  {...}}  # ratio-4 layers: the lightning indexer (with its "comp")

    comp = {"wkv": [d, coff*Dc], "wgate": [d, coff*Dc], "ape": [r, coff*Dc], "norm": [Dc]}
    idx  = {"wqb": [q_lora, H_I*D_I], "wproj": [d, H_I], "comp": comp(r=4, Dc=D_I)}

``TinyDSV4.__call__(tokens)`` runs the (jitted) dense reference forward.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import C4_RATIO, TinyDSV4Config


def _normal(rng: np.random.Generator, shape, std):
    return nnx.Param(jnp.asarray(std * rng.standard_normal(shape), jnp.float32))


def _norm_weight(rng: np.random.Generator, n, scale=1.0):
    return nnx.Param(jnp.asarray(scale * (1.0 + 0.1 * rng.standard_normal(n)), jnp.float32))


class Compressor(nnx.Module):
    """``wkv``/``wgate`` (kv and score), ``ape`` [r, coff*Dc], weighted ``norm`` [Dc]."""

    def __init__(self, cfg: TinyDSV4Config, ratio: int, dc: int, *, rng: np.random.Generator):
        coff = 2 if ratio == C4_RATIO else 1
        d = cfg.hidden
        self.wkv = _normal(rng, (d, coff * dc), d**-0.5)
        self.wgate = _normal(rng, (d, coff * dc), 1.5 * d**-0.5)
        self.ape = _normal(rng, (ratio, coff * dc), 0.5)
        self.norm = _norm_weight(rng, dc, cfg.kv_norm_scale)


class Indexer(nnx.Module):
    """Lightning indexer: query projection, head weights and its own ratio-4 compressor."""

    def __init__(self, cfg: TinyDSV4Config, *, rng: np.random.Generator):
        hi, di = cfg.index_heads, cfg.index_head_dim
        self.wqb = _normal(rng, (cfg.q_lora, hi * di), cfg.q_lora**-0.5)
        self.wproj = _normal(rng, (cfg.hidden, hi), cfg.hidden**-0.5)
        self.comp = Compressor(cfg, C4_RATIO, di, rng=rng)


class Block(nnx.Module):
    """Pre-norm decoder layer: DSV4 attention (+compressor/indexer) and a SwiGLU MLP."""

    def __init__(self, cfg: TinyDSV4Config, layer: int, *, rng: np.random.Generator):
        d, h, dh = cfg.hidden, cfg.num_heads, cfg.head_dim
        ratio = cfg.compress_ratios[layer]
        self.attn_norm = _norm_weight(rng, d)
        self.wqa = _normal(rng, (d, cfg.q_lora), d**-0.5)
        self.q_norm = _norm_weight(rng, cfg.q_lora)
        self.wqb = _normal(rng, (cfg.q_lora, h * dh), cfg.q_lora**-0.5)
        self.wkv = _normal(rng, (d, dh), d**-0.5)
        self.kv_norm = _norm_weight(rng, dh, cfg.kv_norm_scale)
        self.sink = _normal(rng, (h,), 1.0)
        gin = h * dh // cfg.o_groups
        self.woa = _normal(rng, (cfg.o_groups, cfg.o_lora, gin), gin**-0.5)
        self.wob = _normal(rng, (cfg.o_groups * cfg.o_lora, d), (cfg.o_groups * cfg.o_lora) ** -0.5)
        self.mlp_norm = _norm_weight(rng, d)
        self.w1 = _normal(rng, (d, cfg.mlp_hidden), d**-0.5)
        self.w3 = _normal(rng, (d, cfg.mlp_hidden), d**-0.5)
        self.w2 = _normal(rng, (cfg.mlp_hidden, d), cfg.mlp_hidden**-0.5)
        self.comp = Compressor(cfg, ratio, dh, rng=rng) if ratio else None
        self.idx = Indexer(cfg, rng=rng) if ratio == C4_RATIO else None


class TinyDSV4(nnx.Module):
    """Tiny DeepSeek-V4-style LM with random weights (see ``DSV4_MODEL.md`` §8).

    Weights are drawn on the host from ``numpy.random.default_rng(seed)``
    (fast, no compilation; deterministic across platforms).
    """

    def __init__(self, cfg: TinyDSV4Config, *, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.embed = _normal(rng, (cfg.vocab, cfg.hidden), 1.0)
        self.layers = nnx.List([Block(cfg, i, rng=rng) for i in range(cfg.num_layers)])
        self.final_norm = _norm_weight(rng, cfg.hidden)
        self.lm_head = _normal(rng, (cfg.hidden, cfg.vocab), cfg.hidden**-0.5)

    def params(self) -> dict:
        return model_params(self)

    def __call__(self, tokens):
        """Logits of ``tokens`` at positions ``0..T-1`` (the jitted dense reference)."""
        from models.reference import reference_with_margins

        return reference_with_margins(self.cfg, self.params(), tokens)[0]


def _pure(tree):
    if isinstance(tree, dict):
        return {k: _pure(v) for k, v in tree.items()}
    return tree


def model_params(model: TinyDSV4) -> dict:
    """The plain-pytree parameters of ``model`` (layers as a list by global id)."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = state.pop("layers")
    state["layers"] = [_pure(layers[i]) for i in range(len(layers))]
    return _pure(state)


def init_params(cfg: TinyDSV4Config, seed: int = 0) -> dict:
    """Random parameters of the tiny model (deterministic in ``seed``)."""
    return model_params(TinyDSV4(cfg, seed=seed))
