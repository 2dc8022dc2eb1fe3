"""PagedHybridModel (models/hybrid_paged.py) ≡ the streaming forward and the dense reference.

The hybrid model on the library's pools: attention K/V in ``FULL_KV`` pages, the
linear layers' conv / recurrent state in ``CONV_STATE`` / ``RECURRENT_STATE`` snapshot
slots.  Chunked prefill (chunk 16, snapshots at 16 and 32) then greedy decode equals
the streaming run and the reference (PP 1, PP 2 ``[3, 5]``, PP 2 x TP 2); a request
restored at 32 from the snapshot slot (copy-on-write into a new slot, K/V pages
reused by id) continues like the uninterrupted run; a stale snapshot and a snapshot
advanced in place are caught by the same comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PoolKind
from models.hybrid import init_params, reference_forward
from models.hybrid_config import TinyHybridConfig
from models.hybrid_paged import PagedHybridModel
from models.hybrid_stage import conv_pool_order
from models.hybrid_streaming import run_chunked
from models.protocol import ServableModel

TOL = 1e-4
RESTORE_TOL = 1e-5
CONTROL_MIN = 1e-2
CHUNK = 16
N = 48  # prompt
STEPS = 4  # greedy decode steps
W = 4  # table width (pages): one compiled shape for every request
PAGES, SLOTS = 12, 6
SNAPS = {16: 1, 32: 2}  # grid snapshots -> slots; the request's own state: slot 0
CONV, REC = PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE

CFG = TinyHybridConfig.mini()
PARAMS = init_params(CFG, seed=0)
PROMPT = np.random.default_rng(1).integers(0, CFG.vocab, N).astype(np.int32)
BRANCH = np.random.default_rng(2).integers(0, CFG.vocab, N - 32).astype(np.int32)
NO_SWA = -np.ones(W, np.int32)
_MODELS: dict = {}


def model(pp: int, tp: int = 1) -> PagedHybridModel:
    if (pp, tp) not in _MODELS:
        part = [3, 5] if pp == 2 else None
        _MODELS[pp, tp] = PagedHybridModel(CFG, PARAMS, mesh=make_mesh(pp, tp), partition=part)
    return _MODELS[pp, tp]


def serve(m, pools, tokens, start, table, state_in, state_out, snapshots=None, steps=STEPS):
    """Prefill ``tokens`` from ``start`` then ``steps`` greedy decode steps (state in place
    in ``state_out``).  Returns ``(logits [len + steps, V], generated, pools)``."""
    logits, pools, _ = m.prefill(
        pools,
        tokens,
        start,
        table,
        NO_SWA,
        CHUNK,
        state_in=state_in,
        state_out=state_out,
        snapshots=snapshots,
    )
    rows, gen, pos = [logits], [], start + len(tokens)
    for _ in range(steps):
        gen.append(int(rows[-1][-1].argmax()))
        step, pools, _ = m.decode_step(
            pools, gen[-1], pos, table, NO_SWA, None, state_in=state_out, state_out=state_out
        )
        rows.append(step[None])
        pos += 1
    return np.concatenate(rows), gen, pools


def slot_state(m, pools, slot):
    """``(conv [n_linear, C, K-1], recurrent)`` of one slot, by global layer (pool order)."""
    conv = m.global_layer_rows(pools, CONV)
    rec = m.global_layer_rows(pools, REC)
    lin = CFG.linear_layers
    return np.stack([conv[g][slot] for g in lin]), np.stack([rec[g][slot] for g in lin])


@pytest.fixture(scope="module")
def oracle():
    run = run_chunked(CFG, PARAMS, PROMPT, CHUNK, CHUNK)
    return run


def test_spec_and_protocol():
    spec = CFG.cache_spec()
    assert spec is CFG.cache_spec() and spec == ModelCacheSpec.tiny_hybrid()
    assert spec.row_bytes(CONV) == CFG.conv_state_bytes()
    assert spec.row_bytes(REC) == CFG.recurrent_state_bytes()
    assert spec.row_bytes(PoolKind.FULL_KV) == CFG.kv_bytes_per_token() // 2 * CFG.page_size
    assert CFG.cache_spec("x").name == "x"
    assert isinstance(model(1), ServableModel)


@pytest.mark.parametrize("pp,tp", [(1, 1), (2, 1), (2, 2)], ids=["pp1", "pp2-3,5", "pp2xtp2"])
def test_paged_matches_streaming_and_reference(pp, tp, oracle):
    m = model(pp, tp)
    pools = m.init_pools(PAGES, 0, num_state_slots=SLOTS)
    table = np.arange(W, dtype=np.int32)
    logits, gen, pools = serve(m, pools, PROMPT, 0, table, -1, 0, SNAPS)
    ref = np.asarray(reference_forward(CFG, PARAMS, np.concatenate([PROMPT, gen])))
    assert np.abs(logits[:N] - np.asarray(oracle.logits)).max() < TOL
    assert np.abs(logits - ref).max() < TOL
    assert gen == [int(r.argmax()) for r in ref[N - 1 : N - 1 + STEPS]]  # greedy tokens equal
    order = conv_pool_order(CFG, tp)  # the pool's rank-major channel order (identity: tp 1)
    for pos, slot in SNAPS.items():
        conv, rec = slot_state(m, pools, slot)
        snap = oracle.snapshots[pos]
        assert np.abs(conv - np.asarray(snap.conv)[:, order]).max() < TOL
        assert np.abs(rec - np.asarray(snap.recurrent)).max() < TOL


def first_request():
    """Request 1 on PP 2 in new pools: the prompt with snapshots at 16, 32, then decode
    (its own state: slot 0)."""
    m = model(2)
    pools = m.init_pools(PAGES, 0, num_state_slots=SLOTS)
    table = np.arange(W, dtype=np.int32)
    _, _, pools = serve(m, pools, PROMPT, 0, table, -1, 0, SNAPS)
    return m, pools, table


def uninterrupted_branch(m):
    """The branch ``PROMPT[:32] + BRANCH`` from 0 in private pools: the oracle of a restore."""
    pools = m.init_pools(PAGES, 0, num_state_slots=SLOTS)
    tokens = np.concatenate([PROMPT[:32], BRANCH])
    logits, gen, _ = serve(m, pools, tokens, 0, np.arange(W, dtype=np.int32), -1, 0)
    return logits[32:], gen


def restore(m, pools, table1, state_in, state_out=3):
    """Request 2 at P = 32: K/V pages of [0, 32) reused by id, the rest new pages."""
    table = np.concatenate([table1[:2], np.arange(8, 8 + W - 2, dtype=np.int32)])
    return serve(m, pools, BRANCH, 32, table, state_in, state_out)


def test_restore_from_snapshot_slot_copy_on_write():
    m, pools, table1 = first_request()
    before = slot_state(m, pools, SNAPS[32])
    logits, gen, pools = restore(m, pools, table1, state_in=SNAPS[32])
    want, want_gen = uninterrupted_branch(m)
    assert np.abs(logits - want).max() < RESTORE_TOL
    assert gen == want_gen
    after = slot_state(m, pools, SNAPS[32])
    for a, b in zip(before, after, strict=True):  # the cached snapshot is never written
        assert np.array_equal(a, b)
    ref = np.asarray(reference_forward(CFG, PARAMS, np.concatenate([PROMPT[:32], BRANCH, gen])))
    assert np.abs(logits - ref[32:]).max() < TOL


def test_control_stale_snapshot():
    """The snapshot written one chunk early (at 16) used at P = 32: caught."""
    m, pools, table1 = first_request()
    logits, _, _ = restore(m, pools, table1, state_in=SNAPS[16], state_out=4)
    want, _ = uninterrupted_branch(m)
    assert np.abs(logits - want).max() > CONTROL_MIN


def test_control_snapshot_advanced_in_place():
    """Request 1 keeps going in its cached snapshot slot (state_out == state_in == the
    snapshot at 32); request 2 then reads that slot at 32: caught."""
    m = model(2)
    pools = m.init_pools(PAGES, 0, num_state_slots=SLOTS)
    table = np.arange(W, dtype=np.int32)
    _, _, pools = serve(m, pools, PROMPT[:32], 0, table, -1, 2, {16: 1}, steps=0)
    _, _, pools = serve(m, pools, PROMPT[32:], 32, table, 2, 2, steps=0)  # the bug
    logits, _, _ = restore(m, pools, table, state_in=2)
    want, _ = uninterrupted_branch(m)
    assert np.abs(logits - want).max() > CONTROL_MIN


def test_batched_forward_and_padding_rows():
    """One [B=4, T=1] decode forward of two requests (slots 0 and 3) with two padding rows
    that name slots: the padding rows read and write nothing."""
    m, table1 = model(2), np.arange(W, dtype=np.int32)
    pools = m.init_pools(PAGES, 0, num_state_slots=SLOTS)
    _, _, pools = serve(m, pools, PROMPT, 0, table1, -1, 0, SNAPS, steps=0)
    table2 = np.concatenate([table1[:2], [8, 9]]).astype(np.int32)
    _, _, pools = serve(m, pools, BRANCH, 32, table2, SNAPS[32], 3, steps=0)
    snap16 = slot_state(m, pools, SNAPS[16])
    slab = m.new_scratch_slab(4)
    tokens = np.array([[5], [7], [0], [0]], np.int32)
    full = np.stack([table1, table2, table1, table2])
    logits, pools, slab = m.forward(
        pools,
        slab,
        tokens,
        [N, N, 0, 0],
        [1, 1, 0, 0],
        full,
        np.stack([NO_SWA] * 4),
        [0, 1, 2, 3],
        fresh=[True] * 4,
        state_in=[0, 3, SNAPS[16], 0],
        state_out=[0, 3, SNAPS[16], 3],
    )
    seq1 = np.concatenate([PROMPT, [5]])
    seq2 = np.concatenate([PROMPT[:32], BRANCH, [7]])
    for row, seq in enumerate((seq1, seq2)):
        ref = np.asarray(reference_forward(CFG, PARAMS, seq))
        assert np.abs(logits[row, 0] - ref[-1]).max() < TOL
    for a, b in zip(snap16, slot_state(m, pools, SNAPS[16]), strict=True):
        assert np.array_equal(a, b)


def test_state_slot_checks():
    m, pools, table1 = first_request()
    slab = m.new_scratch_slab(2)
    tables = np.stack([table1, np.concatenate([table1[:2], [8, 9]]).astype(np.int32)])
    args = (np.zeros((2, 1), np.int32), [N, 40], [1, 1], tables, np.stack([NO_SWA] * 2), [0, 1])
    cases = [
        (([0, 2], [0, 0]), "both write state slot 0"),
        (([0, 0], [0, 3]), "reads state slot 0 that row 0 writes"),
        (([-1, 2], [0, 3]), "state_in=-1 .* starts at 48"),
        (([0, SLOTS], [0, 3]), f"state_in={SLOTS} is outside"),
        (([0, 2], [0, -1]), "state_out=-1 is outside"),
    ]
    for (s_in, s_out), msg in cases:
        with pytest.raises(ValueError, match=msg):
            m.forward(pools, slab, *args, fresh=[True, True], state_in=s_in, state_out=s_out)
    with pytest.raises(ValueError, match="needs state_in and state_out"):
        m.forward(pools, slab, *args, fresh=[True, True])
    bad_snaps = [
        ({24: 1}, "not a chunk end"),
        ({16: 0}, "is state_out"),
        ({16: 1, 32: 1}, "repeat"),
        ({48: 1}, "final position 48"),
    ]
    for snaps, msg in bad_snaps:
        with pytest.raises(ValueError, match=msg):
            m.prefill(
                pools, PROMPT, 0, table1, NO_SWA, CHUNK, state_in=-1, state_out=0, snapshots=snaps
            )
    with pytest.raises(ValueError, match="is state_in"):
        m.prefill(
            pools, BRANCH, 32, table1, NO_SWA, CHUNK, state_in=2, state_out=0, snapshots={48: 2}
        )


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="tp=4 does not divide k_heads=2"):
        PagedHybridModel(CFG, PARAMS, mesh=make_mesh(2, 4))
