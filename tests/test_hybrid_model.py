"""The tiny hybrid recurrent-state model (Qwen3-Next style): streaming ≡ dense reference,
resume from grid snapshots, negative controls, config validation and state sizes.

Comparisons:

* Different computations (streaming in chunks of 1 / 7 / 16 vs the dense
  reference's parallel delta rule and full attention matrices):
  ``max |Δlogit| <= TOL = 1e-4`` (observed ~1e-5 on logits of magnitude ~4).
* A resume from a grid snapshot vs the uninterrupted run with the same chunk
  grid: ``<= RESUME_TOL = 1e-5``.
* A negative control (a wrong snapshot used at ``P``) must give
  ``max |Δlogit| > CONTROL_MIN = 1e-2`` against the uninterrupted run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.hybrid import delta_rule_parallel, init_params, reference_forward
from models.hybrid_config import LayerKind, TinyHybridConfig
from models.hybrid_streaming import (
    Snapshot,
    chunk_plan,
    delta_rule_scan,
    init_state,
    resume_state,
    run_chunked,
    stream_forward,
)

TOL = 1e-4
RESUME_TOL = 1e-5
CONTROL_MIN = 1e-2
N = 64  # sequence length
CAP = 80  # K/V capacity of every streaming state (one compilation per chunk length)
CHUNK, INTERVAL = 8, 16  # the resume tests' grid: snapshots at 16, 32, 48, 64
PROMPT = 48  # a prompt that ends exactly on a grid point


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def setup():
    cfg = TinyHybridConfig.mini()
    params = init_params(cfg, seed=0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab, N).astype(np.int32)
    ref = np.asarray(reference_forward(cfg, params, tokens))
    return cfg, params, tokens, ref


@pytest.fixture(scope="module")
def grid_run(setup):
    """The uninterrupted run on the (CHUNK, INTERVAL) grid."""
    cfg, params, tokens, _ = setup
    return run_chunked(cfg, params, tokens, CHUNK, INTERVAL, capacity=CAP)


def _resume(cfg, params, tokens, snapshot, kv_from):
    """Resume at ``snapshot.pos`` with the K/V of ``[0, pos)`` from ``kv_from`` and finish."""
    p = snapshot.pos
    state = resume_state(cfg, snapshot, kv_from.k[:, :p], kv_from.v[:, :p], CAP)
    return run_chunked(cfg, params, tokens[p:], CHUNK, INTERVAL, state=state)


# ---------------------------------------------------------------- equivalence
def test_layout_is_qwen3_next():
    cfg = TinyHybridConfig.mini()
    assert cfg.attention_layers == (3, 7)
    assert cfg.linear_layers == (0, 1, 2, 4, 5, 6)
    assert cfg.layer_kind(3) is LayerKind.FULL and cfg.layer_kind(4) is LayerKind.LINEAR
    assert TinyHybridConfig.qwen3_next_80b().attention_layers == tuple(range(3, 48, 4))


@pytest.mark.parametrize("chunk", [1, 16, 7])
def test_streaming_matches_reference(setup, chunk):
    cfg, params, tokens, ref = setup
    run = run_chunked(cfg, params, tokens, chunk, chunk, capacity=CAP)
    assert run.logits.shape == ref.shape and run.state.pos == N
    assert _diff(run.logits, ref) <= TOL
    assert np.abs(ref).max() > 1.0  # not a vanishing signal
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 10 * TOL  # no near-tie: argmax is well defined
    np.testing.assert_array_equal(np.argmax(run.logits, -1), np.argmax(ref, -1))
    # snapshots at every chunk end (state_interval == chunk), the last one at N if on the grid
    assert sorted(run.snapshots) == list(range(chunk, N + 1, chunk))


def test_unpadded_one_shot_and_greedy_decode(setup):
    """One unpadded chunk, then greedy decode token by token; the reference over the
    prompt + generated tokens (padded to N: it is causal) picks the same tokens."""
    cfg, params, tokens, ref = setup
    state = init_state(cfg, CAP)
    logits, state = stream_forward(cfg, params, state, tokens[:PROMPT], 0)
    assert _diff(logits, ref[:PROMPT]) <= TOL
    seq = list(tokens[:PROMPT])
    step_logits = []
    nxt = int(np.argmax(logits[-1]))
    for _ in range(8):
        seq.append(nxt)
        lg, state = stream_forward(cfg, params, state, [nxt], state.pos)
        step_logits.append(np.asarray(lg[0]))
        nxt = int(np.argmax(lg[0]))
    seq_ref = np.asarray(seq + [0] * (N - len(seq)), np.int32)
    ref2 = np.asarray(reference_forward(cfg, params, seq_ref))[PROMPT : len(seq)]
    assert _diff(np.stack(step_logits), ref2) <= TOL
    assert np.argmax(ref2, -1).tolist() == [*seq[PROMPT + 1 :], nxt]


def test_delta_rule_forms_agree():
    """The scan's final state and outputs equal the parallel (triangular-solve) form's."""
    rng = np.random.default_rng(3)
    t, hv, dk, dv = 24, 3, 8, 5

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = jnp.asarray(unit(rng.standard_normal((t, hv, dk))) * dk**-0.5, jnp.float32)
    k = jnp.asarray(unit(rng.standard_normal((t, hv, dk))), jnp.float32)
    v = jnp.asarray(rng.standard_normal((t, hv, dv)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.0, 0.5, (t, hv)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (t, hv)), jnp.float32)
    ok = jnp.ones((t,), bool)
    zero = jnp.zeros((hv, dk, dv), jnp.float32)
    scan = jax.jit(delta_rule_scan)
    with jax.default_matmul_precision("highest"):
        o_par, s_par = jax.jit(delta_rule_parallel)(q, k, v, g, beta)
        o_scan, s_scan = scan(zero, q, k, v, g, beta, ok)
        # the whole in two pieces through the state (padding rows change nothing)
        o1, s1 = scan(zero, q, k, v, g, beta, ok.at[10:].set(False))
        o2, s2 = scan(
            s1,
            jnp.roll(q, -10, 0),
            jnp.roll(k, -10, 0),
            jnp.roll(v, -10, 0),
            jnp.roll(g, -10, 0),
            jnp.roll(beta, -10, 0),
            ok.at[t - 10 :].set(False),
        )
    assert _diff(o_par, o_scan) <= 1e-5 and _diff(s_par, s_scan) <= 1e-5
    assert float(jnp.abs(s_scan).max()) > 0.1
    assert _diff(np.concatenate([o1[:10], o2[: t - 10]]), o_scan) <= 1e-6
    assert _diff(s2, s_scan) <= 1e-6


# ---------------------------------------------------------------------- resume
def test_snapshot_grid_and_shapes(setup, grid_run):
    cfg = setup[0]
    assert sorted(grid_run.snapshots) == [16, 32, 48, 64]
    snap = grid_run.snapshots[32]
    assert snap.pos == 32
    assert snap.conv.shape == (6, cfg.conv_dim, cfg.conv_kernel - 1) == (6, 128, 3)
    assert snap.recurrent.shape == (6, cfg.v_heads, cfg.k_dim, cfg.v_dim) == (6, 4, 16, 16)
    assert snap.conv.nbytes + snap.recurrent.nbytes == cfg.snapshot_bytes()
    k, v = grid_run.state.kv_prefix()
    assert k.shape == v.shape == (2, N, cfg.num_kv_heads, cfg.head_dim)
    assert k[0].nbytes * 2 * 2 == N * cfg.kv_bytes_per_token()
    # non-trivial mid-sequence, zero at position 0
    assert float(jnp.abs(snap.conv).max()) > 0.1 and float(jnp.abs(snap.recurrent).max()) > 0.1
    fresh = init_state(cfg, 8)
    assert not np.any(np.asarray(fresh.conv)) and not np.any(np.asarray(fresh.recurrent))


@pytest.mark.parametrize("p", [16, 32, 48])
def test_resume_from_grid_snapshot(setup, grid_run, p):
    cfg, params, tokens, ref = setup
    resumed = _resume(cfg, params, tokens, grid_run.snapshots[p], grid_run.state)
    assert resumed.state.pos == N
    assert _diff(resumed.logits, grid_run.logits[p:]) <= RESUME_TOL
    assert _diff(resumed.logits, ref[p:]) <= TOL
    # the resumed run's own later snapshots equal the uninterrupted run's
    for q, snap in resumed.snapshots.items():
        assert _diff(snap.recurrent, grid_run.snapshots[q].recurrent) <= RESUME_TOL
        assert _diff(snap.conv, grid_run.snapshots[q].conv) <= RESUME_TOL


def test_resume_at_prompt_end(setup, grid_run):
    """A prompt ending exactly on a grid point keeps that snapshot; resuming there
    (decode-style, one token at a time) continues the uninterrupted run."""
    cfg, params, tokens, _ = setup
    prompt = run_chunked(cfg, params, tokens[:PROMPT], CHUNK, INTERVAL, capacity=CAP)
    assert sorted(prompt.snapshots) == [16, 32, PROMPT]
    snap = prompt.snapshots[PROMPT]
    assert _diff(snap.recurrent, grid_run.snapshots[PROMPT].recurrent) <= RESUME_TOL
    k, v = prompt.state.kv_prefix()
    state = resume_state(cfg, snap, k, v, CAP)
    out = []
    for i in range(PROMPT, N):
        lg, state = stream_forward(cfg, params, state, tokens[i : i + 1], i)
        out.append(lg)
    assert _diff(jnp.concatenate(out), grid_run.logits[PROMPT:]) <= TOL
    cont = _resume(cfg, params, tokens, snap, prompt.state)
    assert _diff(cont.logits, grid_run.logits[PROMPT:]) <= RESUME_TOL


# ------------------------------------------------------------ negative controls
P_CTRL = 32


def _control(setup, grid_run, snapshot):
    cfg, params, tokens, _ = setup
    bad = _resume(cfg, params, tokens, snapshot, grid_run.state)
    return _diff(bad.logits, grid_run.logits[P_CTRL:])


def test_control_stale_snapshot(setup, grid_run):
    """The snapshot taken one chunk early, stored under P: caught."""
    cfg, params, tokens, _ = setup
    fine = run_chunked(cfg, params, tokens[:P_CTRL], CHUNK, CHUNK, capacity=CAP)
    stale = dataclasses.replace(fine.snapshots[P_CTRL - CHUNK], pos=P_CTRL)
    assert _diff(fine.snapshots[P_CTRL].recurrent, grid_run.snapshots[P_CTRL].recurrent) == 0
    assert _control(setup, grid_run, stale) > CONTROL_MIN


def test_control_recurrent_advanced_in_place(setup, grid_run):
    """The snapshot's recurrent state advanced by one more token (a slot written in
    place after the snapshot was handed out), conv state intact: caught."""
    cfg, params, tokens, _ = setup
    snap = grid_run.snapshots[P_CTRL]
    k, v = grid_run.state.k[:, :P_CTRL], grid_run.state.v[:, :P_CTRL]
    _, ahead = stream_forward(
        cfg, params, resume_state(cfg, snap, k, v, CAP), tokens[P_CTRL : P_CTRL + 1], P_CTRL
    )
    bad = Snapshot(P_CTRL, snap.conv, ahead.recurrent)
    assert _control(setup, grid_run, bad) > CONTROL_MIN


def test_control_conv_state_zeroed(setup, grid_run):
    snap = grid_run.snapshots[P_CTRL]
    bad = dataclasses.replace(snap, conv=jnp.zeros_like(snap.conv))
    assert _control(setup, grid_run, bad) > CONTROL_MIN


def test_control_recurrent_state_zeroed(setup, grid_run):
    """Restarting the recurrence at P (only the conv and K/V restored): caught."""
    snap = grid_run.snapshots[P_CTRL]
    bad = dataclasses.replace(snap, recurrent=jnp.zeros_like(snap.recurrent))
    assert _control(setup, grid_run, bad) > CONTROL_MIN


# ------------------------------------------------------------------ refusals
def test_state_only_valid_at_its_position(setup, grid_run):
    cfg, params, tokens, _ = setup
    snap = grid_run.snapshots[P_CTRL]
    k, v = grid_run.state.k, grid_run.state.v
    with pytest.raises(ValueError, match=r"pos=32"):
        resume_state(cfg, snap, k[:, : P_CTRL + 1], v[:, : P_CTRL + 1], CAP)
    state = resume_state(cfg, snap, k[:, :P_CTRL], v[:, :P_CTRL], CAP)
    with pytest.raises(ValueError, match=r"start_pos=40"):
        stream_forward(cfg, params, state, tokens[40:41], 40)
    with pytest.raises(ValueError, match=r"capacity"):
        stream_forward(cfg, params, state, tokens[:CHUNK], P_CTRL, pad_to=CAP)
    with pytest.raises(ValueError, match=r"snapshot.conv"):
        resume_state(cfg, dataclasses.replace(snap, conv=snap.conv[:1]), k[:, :32], v[:, :32], CAP)


def test_run_chunked_validation(setup):
    cfg, params, tokens, _ = setup
    with pytest.raises(ValueError, match=r"state_interval=12 must be a multiple of chunk=8"):
        run_chunked(cfg, params, tokens, 8, 12)
    with pytest.raises(ValueError, match=r"chunk=0"):
        run_chunked(cfg, params, tokens, 0, 8)
    assert chunk_plan(5, 30, 8) == [(5, 8), (8, 16), (16, 24), (24, 30)]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"v_heads": 3}, r"TinyHybridConfig.v_heads=3: must be a multiple of k_heads=2"),
        ({"num_kv_heads": 3}, r"num_kv_heads=3: must divide num_heads=4"),
        ({"rope_dim": 7}, r"rope_dim=7"),
        ({"rope_dim": 32}, r"rope_dim=32: must be <= head_dim=16"),
        ({"conv_kernel": 1}, r"conv_kernel=1"),
        ({"hidden": 0}, r"hidden=0"),
        ({"k_dim": 2.5}, r"k_dim=2.5"),
        ({"full_attention_interval": True}, r"full_attention_interval=True"),
        ({"eps": -1.0}, r"eps=-1.0"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        TinyHybridConfig.mini(**overrides)


def test_state_bytes():
    cfg = TinyHybridConfig.mini()
    assert cfg.conv_dim == 2 * 2 * 16 + 4 * 16 == 128
    assert cfg.conv_state_bytes() == 128 * 3 * 4
    assert cfg.recurrent_state_bytes() == 4 * 16 * 16 * 4
    assert cfg.snapshot_bytes() == 6 * (128 * 3 * 4 + 4 * 16 * 16 * 4)
    assert cfg.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    big = TinyHybridConfig.qwen3_next_80b()
    assert big.conv_dim == 8192
    assert big.conv_state_bytes(jnp.bfloat16) == 8192 * 3 * 2
    assert big.recurrent_state_bytes() == 32 * 128 * 128 * 4 == 2 * 1024 * 1024
    assert len(big.linear_layers) == 36
    assert big.kv_bytes_per_token(np.float16) == 12 * 2 * 2 * 256 * 2
