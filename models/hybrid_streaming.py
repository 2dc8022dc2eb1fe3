"""Single-device streaming forward of the tiny hybrid model with explicit state.

State of one sequence at position ``P`` (:class:`HybridState`):

* per gated DeltaNet layer (row ``i`` is global layer ``cfg.linear_layers[i]``):
  ``conv [conv_dim, K-1]`` (the pre-conv inputs of tokens ``P-K+1 .. P-1``,
  oldest first, zeros before position 0) and ``recurrent [v_heads, k_dim,
  v_dim]`` (``S`` after token ``P-1``);
* per full-attention layer (row ``i`` is ``cfg.attention_layers[i]``): K and V
  of every token ``< P`` (``[capacity, num_kv_heads, head_dim]`` buffers, rows
  ``>= P`` unused).

The first part is a :class:`Snapshot`: a recurrent-state cache stores it per grid
position, the second is what a page cache stores per token.  A snapshot is valid
only at its exact position: :func:`resume_state` refuses a K/V prefix of another
length and :func:`stream_forward` refuses a chunk that does not start at the
state's position.

:func:`stream_forward` runs one chunk (the recurrence is a ``lax.scan`` over
its tokens: exact and deterministic); :func:`run_chunked` runs a sequence in
grid-aligned chunks and keeps a snapshot at every multiple of
``state_interval`` (a multiple of the chunk, so every snapshot is a chunk end).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import layers as L
from models.hybrid import (
    MATMUL_PRECISION,
    attention_cached,
    attention_inputs,
    attention_output,
    delta_rule_scan,
    linear_chunk,
    mlp_block,
)
from models.hybrid_config import LayerKind, TinyHybridConfig

__all__ = [
    "ChunkedRun",
    "HybridState",
    "Snapshot",
    "chunk_plan",
    "delta_rule_scan",
    "init_state",
    "resume_state",
    "run_chunked",
    "stream_forward",
]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The recurrent part of a sequence's state at ``pos`` (every linear layer).

    ``conv``: ``[n_linear, conv_dim, K-1]`` (model dtype); ``recurrent``:
    ``[n_linear, v_heads, k_dim, v_dim]`` (fp32).  Bytes:
    ``cfg.snapshot_bytes()``.  Together with the attention layers' K/V of
    tokens ``[0, pos)`` it resumes the sequence at ``pos`` exactly.
    """

    pos: int
    conv: jax.Array
    recurrent: jax.Array


@dataclasses.dataclass(frozen=True)
class HybridState:
    """Full state of one sequence after ``pos`` tokens (see the module docstring)."""

    pos: int
    conv: jax.Array  # [n_linear, conv_dim, K-1]
    recurrent: jax.Array  # [n_linear, v_heads, k_dim, v_dim]
    k: jax.Array  # [n_attn, capacity, num_kv_heads, head_dim]
    v: jax.Array  # [n_attn, capacity, num_kv_heads, head_dim]

    @property
    def capacity(self) -> int:
        return int(self.k.shape[1])

    def snapshot(self) -> Snapshot:
        """The linear layers' state at ``pos`` (JAX arrays are immutable: no aliasing)."""
        return Snapshot(self.pos, self.conv, self.recurrent)

    def kv_prefix(self) -> tuple[jax.Array, jax.Array]:
        """K and V of tokens ``[0, pos)``: ``[n_attn, pos, num_kv_heads, head_dim]`` each."""
        return self.k[:, : self.pos], self.v[:, : self.pos]


def _zeros(shape):
    return jnp.zeros(shape, jnp.float32)


def init_state(cfg: TinyHybridConfig, capacity: int) -> HybridState:
    """The state at position 0 (all zeros) with room for ``capacity`` tokens of K/V."""
    _check_int("capacity", capacity, 1)
    n_lin, n_att = len(cfg.linear_layers), len(cfg.attention_layers)
    kv = (n_att, capacity, *cfg.kv_token_shape)
    return HybridState(
        0,
        _zeros((n_lin, *cfg.conv_state_shape)),
        _zeros((n_lin, *cfg.recurrent_state_shape)),
        _zeros(kv),
        _zeros(kv),
    )


def _check_int(name, value, lo):
    if type(value) is bool or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"{name}={value!r} must be an int >= {lo}")


def _check_shape(name, array, shape):
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}")


def resume_state(
    cfg: TinyHybridConfig, snapshot: Snapshot, k_prefix, v_prefix, capacity: int
) -> HybridState:
    """The state at ``snapshot.pos`` from a snapshot and the attention K/V of ``[0, pos)``.

    ``k_prefix`` / ``v_prefix``: ``[n_attn, pos, num_kv_heads, head_dim]``.  A
    K/V prefix of any other length than ``snapshot.pos`` raises ``ValueError``
    (a snapshot is valid only at its own position).
    """
    _check_int("snapshot.pos", snapshot.pos, 0)
    n_lin, n_att = len(cfg.linear_layers), len(cfg.attention_layers)
    _check_shape("snapshot.conv", snapshot.conv, (n_lin, *cfg.conv_state_shape))
    _check_shape("snapshot.recurrent", snapshot.recurrent, (n_lin, *cfg.recurrent_state_shape))
    p = snapshot.pos
    for name, kv in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if kv.ndim != 4 or kv.shape[1] != p:
            raise ValueError(
                f"{name} covers {kv.shape[1] if kv.ndim == 4 else '?'} tokens (shape "
                f"{tuple(kv.shape)}) but the snapshot is at pos={p}: a snapshot is valid "
                f"only with the K/V of exactly [0, {p})"
            )
        _check_shape(name, kv, (n_att, p, *cfg.kv_token_shape))
    if capacity < p:
        raise ValueError(f"capacity={capacity} is smaller than the prefix pos={p}")
    pad = ((0, 0), (0, capacity - p), (0, 0), (0, 0))
    k = jnp.pad(jnp.asarray(k_prefix, jnp.float32), pad)
    v = jnp.pad(jnp.asarray(v_prefix, jnp.float32), pad)
    return HybridState(p, jnp.asarray(snapshot.conv), jnp.asarray(snapshot.recurrent), k, v)


def _chunk_impl(cfg: TinyHybridConfig, params, conv, rec, k_buf, v_buf, tokens, start, n_valid):
    t = tokens.shape[0]
    pos = start + jnp.arange(t)
    valid = jnp.arange(t) < n_valid
    h = L.embed(params, tokens)
    convs, recs, ks, vs = [], [], [], []
    for kind, p in zip(cfg.layer_kinds, params["layers"], strict=True):
        x = L.rms_norm(h, p["attn_norm"], cfg.eps)
        if kind is LayerKind.LINEAR:
            i = len(convs)
            out, new_conv, new_rec = linear_chunk(cfg, p, x, conv[i], rec[i], n_valid)
            convs.append(new_conv)
            recs.append(new_rec)
            h = h + out
        else:
            i = len(ks)
            q, k, v, gate = attention_inputs(cfg, p, x, pos)
            keep = valid[:, None, None]
            kb = jax.lax.dynamic_update_slice_in_dim(k_buf[i], jnp.where(keep, k, 0.0), start, 0)
            vb = jax.lax.dynamic_update_slice_in_dim(v_buf[i], jnp.where(keep, v, 0.0), start, 0)
            ks.append(kb)
            vs.append(vb)
            h = h + attention_output(cfg, p, attention_cached(cfg, q, kb, vb, pos), gate)
        h = mlp_block(cfg, p, h)

    def stack(rows, like):
        return jnp.stack(rows) if rows else like

    logits = L.lm_head(params, h, cfg)
    return logits, stack(convs, conv), stack(recs, rec), stack(ks, k_buf), stack(vs, v_buf)


@functools.cache
def _chunk_jit():
    from models.stage import compiler_options

    return jax.jit(_chunk_impl, static_argnums=0, compiler_options=compiler_options())


def stream_forward(
    cfg: TinyHybridConfig,
    params: dict,
    state: HybridState,
    tokens,
    start_pos: int,
    pad_to: int | None = None,
) -> tuple[jax.Array, HybridState]:
    """Run ``tokens`` at positions ``[start_pos, start_pos + len(tokens))`` from ``state``.

    ``start_pos`` must equal ``state.pos`` (``ValueError`` otherwise: a state is
    valid only at its own position).  ``pad_to`` pads the chunk to a fixed
    length (one compilation per length); padded rows change no state.  The
    input state is not modified.  Returns ``(logits [len(tokens), V], new state)``.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1 or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be a non-empty 1-D array, got shape {tokens.shape}")
    if start_pos != state.pos:
        raise ValueError(
            f"start_pos={start_pos!r} but the state is at pos={state.pos}: a state resumes "
            "only at its own position"
        )
    n = tokens.shape[0]
    t = max(n, pad_to or n)
    if start_pos + t > state.capacity:
        raise ValueError(
            f"chunk [{start_pos}, {start_pos + t}) (padded to {t}) exceeds the K/V capacity "
            f"{state.capacity}"
        )
    padded = np.zeros((t,), np.int32)
    padded[:n] = tokens
    with jax.default_matmul_precision(MATMUL_PRECISION):
        logits, conv, rec, k, v = _chunk_jit()(
            cfg,
            params,
            state.conv,
            state.recurrent,
            state.k,
            state.v,
            jnp.asarray(padded),
            jnp.int32(start_pos),
            jnp.int32(n),
        )
    return logits[:n], HybridState(start_pos + n, conv, rec, k, v)


class ChunkedRun(NamedTuple):
    logits: jax.Array  # [len(tokens), V]
    snapshots: dict[int, Snapshot]  # position -> snapshot, every multiple of state_interval
    state: HybridState  # the final state


def chunk_plan(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """Grid-aligned chunks covering ``[start, end)``: every boundary is a multiple of
    ``chunk`` (the first chunk is shorter when ``start`` is not), except ``end``."""
    plan, s = [], start
    while s < end:
        e = min((s // chunk + 1) * chunk, end)
        plan.append((s, e))
        s = e
    return plan


def run_chunked(
    cfg: TinyHybridConfig,
    params: dict,
    tokens,
    chunk: int,
    state_interval: int,
    state: HybridState | None = None,
    capacity: int | None = None,
) -> ChunkedRun:
    """Run ``tokens`` from ``state`` (default: position 0) in chunks on the ``chunk`` grid.

    A snapshot is kept at every position ``P`` in ``(start, end]`` with
    ``P % state_interval == 0``; ``state_interval`` must be a positive multiple
    of ``chunk`` (snapshots exist only at chunk ends).  Every chunk is padded to
    ``chunk`` tokens (one compilation).  ``capacity`` (K/V rows, for a fresh
    state only) defaults to what the padded chunks need.
    """
    _check_int("chunk", chunk, 1)
    _check_int("state_interval", state_interval, 1)
    if state_interval % chunk:
        raise ValueError(
            f"state_interval={state_interval} must be a multiple of chunk={chunk}: snapshots "
            "are taken at chunk ends only"
        )
    tokens = np.asarray(tokens, np.int32)
    start = 0 if state is None else state.pos
    plan = chunk_plan(start, start + len(tokens), chunk)
    need = max((s + chunk for s, _ in plan), default=start)
    if state is None:
        state = init_state(cfg, need if capacity is None else capacity)
    elif capacity is not None:
        raise ValueError(f"capacity={capacity} applies to a fresh state only")
    out, snapshots = [], {}
    for s, e in plan:
        logits, state = stream_forward(cfg, params, state, tokens[s - start : e - start], s, chunk)
        out.append(logits)
        if e % state_interval == 0:
            snapshots[e] = state.snapshot()
    logits = jnp.concatenate(out) if out else jnp.zeros((0, cfg.vocab), jnp.float32)
    return ChunkedRun(logits, snapshots, state)
