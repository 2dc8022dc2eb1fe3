"""The batched forward (``PagedModel.forward``): many requests in one program.

Six requests with different prompt lengths (different page counts; prompts and
decode steps cross page and HCA-window boundaries) are prefilled in chunks with
different starts, then decoded together with two padding rows, in a permuted
row order and with permuted scratch slots.  Every row must equal the same
request run alone through ``prefill`` / ``decode_step`` (tokens exactly, logits
and written pool rows within ``TOL``), on PP 1 and PP 2.  Padding rows leave
pools and slab bit-identical; every host refusal is tested; a negative control
(row 0's page table for every row, host checks bypassed) is caught by the same
comparison.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PoolKind
from jaxhicache.transfer import CopyPath, PageMove, TransferEngine
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.streaming import BatchArgs, check_batch

TOL = 1e-4  # see tests/test_model.py
PAGE = 16
W = 4  # table width (pages): the caller's bucket, one compilation
T = PAGE  # prefill chunk bucket
PAGES = 32  # full and SWA pages in the pools
LENS = [7, 15, 22, 30, 39, 46]  # prompts; + STEPS decode tokens cross 8/16/24/32/40/48
CUTS = [[7], [5, 10], [16, 6], [11, 16, 3], [16, 16, 7], [3, 16, 16, 11]]  # chunk sizes
STEPS = 4
ROWS = [3, None, 0, 5, 1, None, 4, 2]  # decode batch: request per row (None: padding)
SLOTS = [6, 3, 0, 5, 2, 7]  # request r's scratch slot
SPARE = 1  # a slot no request uses (padding tests)


def _tables(r):
    """Request r's tables: full pages 4r.., SWA pages counting down from the top."""
    full = np.arange(4 * r, 4 * r + W, dtype=np.int32)
    swa = (PAGES - 1 - 4 * r - np.arange(W)).astype(np.int32)
    return full, swa


def _copy_pools(pools):
    return pools.replace(
        arrays={k: jax.device_put(np.asarray(a), a.sharding) for k, a in pools.arrays.items()}
    )


def _host(pools):
    return {k: np.array(a, copy=True) for k, a in pools.arrays.items()}


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class _Run:
    """One PP layout: the single-request oracle and the batched run of the same requests."""

    def __init__(self, cfg, params, pp):
        self.cfg, self.pp = cfg, pp
        self.m = PagedModel(cfg, params, pp=pp)
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(0, cfg.vocab, n).astype(np.int32) for n in LENS]
        self._oracle()
        self._batched()

    def _oracle(self):
        """Each request alone: its prefill chunks (same cuts), then greedy decode steps."""
        m = self.m
        pools = m.init_pools(PAGES, PAGES)
        self.o_prefill, self.o_steps, self.o_tokens, self.o_scratch = [], [], [], []
        for r, prompt in enumerate(self.prompts):
            full, swa = _tables(r)
            scratch, off, chunks = None, 0, []
            for n in CUTS[r]:
                lg, pools, scratch = m.prefill(
                    pools, prompt[off : off + n], off, full, swa, chunk_size=T, scratch=scratch
                )
                chunks.append(lg)
                off += n
            self.o_prefill.append(chunks)
            tok, steps, toks = int(np.argmax(chunks[-1][-1])), [], []
            for i in range(STEPS):
                toks.append(tok)
                lg, pools, scratch = m.decode_step(pools, tok, LENS[r] + i, full, swa, scratch)
                steps.append(lg)
                tok = int(np.argmax(lg))
            self.o_steps.append(steps)
            self.o_tokens.append(toks)
            self.o_scratch.append(np.asarray(scratch.rows))
        self.o_pools = _host(pools)

    def prefill_batch(self, k):
        """Batched prefill step k: row r carries request r's chunk k (or padding)."""
        tokens = np.zeros((len(LENS), T), np.int32)
        starts, n_valid = np.zeros(len(LENS), np.int32), np.zeros(len(LENS), np.int32)
        for r, cuts in enumerate(CUTS):
            if k < len(cuts):
                starts[r] = sum(cuts[:k])
                n_valid[r] = cuts[k]
                tokens[r, : cuts[k]] = self.prompts[r][starts[r] : starts[r] + cuts[k]]
        tables = [_tables(r) for r in range(len(LENS))]
        full, swa = (np.stack([t[i] for t in tables]) for i in range(2))
        fresh = np.full(len(LENS), k == 0)
        return tokens, starts, n_valid, full, swa, np.asarray(SLOTS, np.int32), fresh

    def decode_batch(self, toks, pos, rows=ROWS):
        """A decode batch of ``rows``: padding rows point at request 0's pages and slot."""
        b = len(rows)
        tokens = np.full((b, 1), 5, np.int32)
        starts, n_valid = np.full(b, 9, np.int32), np.zeros(b, np.int32)
        full, swa = np.zeros((b, W), np.int32), np.zeros((b, W), np.int32)
        slots, fresh = np.full(b, SLOTS[0], np.int32), np.ones(b, bool)
        for i, r in enumerate(rows):
            full[i], swa[i] = _tables(0 if r is None else r)
            if r is not None:
                tokens[i, 0], starts[i], n_valid[i] = toks[r], pos[r], 1
                slots[i], fresh[i] = SLOTS[r], False
        return tokens, starts, n_valid, full, swa, slots, fresh

    def _batched(self):
        m = self.m
        pools, slab = m.init_pools(PAGES, PAGES), m.new_scratch_slab(len(ROWS))
        self.b_prefill = [[] for _ in LENS]
        for k in range(max(len(c) for c in CUTS)):
            lg, pools, slab = m.forward(pools, slab, *self.prefill_batch(k))
            for r, cuts in enumerate(CUTS):
                if k < len(cuts):
                    self.b_prefill[r].append(lg[r, : cuts[k]])
        self.after_prefill = (_host(pools), np.asarray(slab.rows), slab.starts.copy())
        toks = [int(np.argmax(c[-1][-1])) for c in self.b_prefill]
        pos = list(LENS)
        self.b_steps = [[] for _ in LENS]
        self.b_tokens = [[] for _ in LENS]
        self.traces_before_repeat = None
        for i in range(STEPS):
            if i == 1:
                self.traces_before_repeat = m.traces
            lg, pools, slab = m.forward(pools, slab, *self.decode_batch(toks, pos))
            for row, r in enumerate(ROWS):
                if r is not None:
                    self.b_tokens[r].append(toks[r])
                    self.b_steps[r].append(lg[row, 0])
                    toks[r], pos[r] = int(np.argmax(lg[row, 0])), pos[r] + 1
        self.traces_after = m.traces
        self.b_pools, self.b_slab = _host(pools), np.asarray(slab.rows)
        self.b_starts = slab.starts


@pytest.fixture(scope="module")
def setup():
    cfg = TinyDSV4Config.mini()
    return cfg, init_params(cfg, 0), {}


def _run(setup, pp) -> _Run:
    cfg, params, runs = setup
    if pp not in runs:
        runs[pp] = _Run(cfg, params, pp)
    return runs[pp]


@pytest.mark.parametrize("pp", [1, 2])
def test_batched_prefill_equals_single_prefills(setup, pp):
    run = _run(setup, pp)
    for r in range(len(LENS)):
        assert len(run.b_prefill[r]) == len(CUTS[r])
        for k, (b, o) in enumerate(zip(run.b_prefill[r], run.o_prefill[r], strict=True)):
            assert b.shape == o.shape == (CUTS[r][k], setup[0].vocab)
            assert np.isfinite(b).all()
            assert _diff(b, o) <= TOL, f"request {r} chunk {k}"
    # fresh rows started their slots at 0; unused slots stay unstarted
    want = np.full(len(ROWS), -1)
    want[SLOTS] = 0
    np.testing.assert_array_equal(run.after_prefill[2], want)


@pytest.mark.parametrize("pp", [1, 2])
def test_batched_decode_equals_single_decode(setup, pp):
    run = _run(setup, pp)
    for r in range(len(LENS)):
        assert run.b_tokens[r] == run.o_tokens[r], f"request {r} tokens"
        for i in range(STEPS):
            assert _diff(run.b_steps[r][i], run.o_steps[r][i]) <= TOL, f"request {r} step {i}"
    # the state they leave: every pool row and each request's scratch slot
    for kind, arr in run.o_pools.items():
        assert np.any(arr != 0), kind
        np.testing.assert_allclose(run.b_pools[kind], arr, atol=TOL, rtol=0, err_msg=kind.value)
    for r, slot in enumerate(SLOTS):
        np.testing.assert_allclose(run.b_slab[:, :, slot], run.o_scratch[r], atol=TOL, rtol=0)


@pytest.mark.parametrize("pp", [1, 2])
def test_same_shapes_do_not_retrace(setup, pp):
    run = _run(setup, pp)
    assert run.traces_before_repeat is not None
    assert run.traces_after == run.traces_before_repeat  # steps 2..4 reused step 1's program


def _written(run, rows):
    """(full pages, SWA pages) the valid decode rows write at their positions."""
    full, swa = set(), set()
    for r in rows:
        f, s = _tables(r)
        p = (LENS[r] + STEPS) // PAGE
        full.add(int(f[p]))
        swa.add(int(s[p]))
    return full, swa


def _oracle_state(run):
    """The single-request runs' final pools, their scratch in the requests' slots."""
    m = run.m
    pools = m.init_pools(PAGES, PAGES)
    pools = pools.replace(
        arrays={k: jax.device_put(a, pools[k].sharding) for k, a in run.o_pools.items()}
    )
    slab = m.new_scratch_slab(len(ROWS))
    rows = np.asarray(slab.rows).copy()
    for r, slot in enumerate(SLOTS):
        rows[:, :, slot] = run.o_scratch[r]
        slab.starts[slot] = 0
    slab.rows = jax.device_put(rows, slab.rows.sharding)
    return pools, slab


def test_padding_rows_write_nothing(setup):
    """Padding rows point at request 0's pages and slot, with ``fresh`` set: none changes.

    The state comes from the single-request runs (no batched program wrote it)."""
    run = _run(setup, 1)
    m = run.m
    pools, slab = _oracle_state(run)
    starts_before = slab.starts.copy()
    before, slab_before = _host(pools), np.asarray(slab.rows)
    live = [r for r in ROWS if r not in (None, 0)]  # request 0 is paused: padding rows only
    rows = [r if r in live else None for r in ROWS]
    toks = {r: int(np.argmax(run.o_steps[r][-1])) for r in live}
    pos = {r: LENS[r] + STEPS for r in live}
    args = run.decode_batch(toks, pos, rows)
    assert (args[2] == 0).sum() == 3 and args[6][args[2] == 0].all()  # fresh padding rows
    _, pools, slab = m.forward(pools, slab, *args)
    after, slab_after = _host(pools), np.asarray(slab.rows)
    wf, ws = _written(run, live)
    changed_somewhere = False
    for kind in before:
        swa_space = kind in (PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE)
        keep = np.ones(before[kind].shape[2], bool)
        keep[list(ws if swa_space else wf)] = False
        np.testing.assert_array_equal(after[kind][:, :, keep], before[kind][:, :, keep], kind.value)
        changed_somewhere |= bool(np.any(after[kind] != before[kind]))
    assert changed_somewhere  # the valid rows did write
    others = [s for s in range(len(ROWS)) if s not in {SLOTS[r] for r in live}]
    np.testing.assert_array_equal(slab_after[:, :, others], slab_before[:, :, others])
    np.testing.assert_array_equal(slab.starts, starts_before)


def test_negative_control_one_page_table_for_all_rows(setup):
    """Every row given row 0's page tables (host checks bypassed): the comparison of
    ``test_batched_decode_equals_single_decode`` catches it."""
    run = _run(setup, 1)
    m = run.m
    pools, slab_rows, _ = run.after_prefill
    pools_dev = m.init_pools(PAGES, PAGES)
    pools_dev = pools_dev.replace(
        arrays={k: jax.device_put(a, pools_dev[k].sharding) for k, a in pools.items()}
    )
    slab = m.new_scratch_slab(len(ROWS))
    toks = [int(np.argmax(c[-1][-1])) for c in run.b_prefill]
    tokens, st, nv, full, swa, slots, fresh = run.decode_batch(toks, list(LENS))
    full[:], swa[:] = full[0], swa[0]
    fn, fargs = m._program(
        pools_dev,
        jax.device_put(slab_rows, slab.rows.sharding),
        BatchArgs(tokens, st, nv, full, swa, slots, fresh),
    )
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(fn(*fargs)[0])
    worst = max(
        _diff(logits[row, 0], run.o_steps[r][0]) for row, r in enumerate(ROWS) if r is not None
    )
    assert worst > TOL


# ------------------------------------------------------------------ refusals
def _ok_args(run):
    toks = [int(np.argmax(c[-1][-1])) for c in run.b_prefill]
    return list(run.decode_batch(toks, list(LENS)))


REFUSALS = {
    "tokens_1d": (lambda a: a.__setitem__(0, a[0][:, 0]), r"tokens must be a 2-D int array"),
    "starts_len": (
        lambda a: a.__setitem__(1, a[1][:-1]),
        r"starts has shape \(7,\), tokens has B=8",
    ),
    "n_valid_range": (lambda a: a[2].__setitem__(0, 2), r"n_valid\[0\]=2 is outside \[0, T=1\]"),
    "tables_shape": (
        lambda a: a.__setitem__(4, a[4][:, :3]),
        r"page tables full \(8, 4\) / swa \(8, 3\)",
    ),
    "tables_rows": (
        lambda a: (a.__setitem__(3, a[3][:7]), a.__setitem__(4, a[4][:7])),
        r"must both be \[B=8, W\]",
    ),
    "negative_start": (lambda a: a[1].__setitem__(0, -3), r"starts\[0\]=-3 is negative"),
    "slot_range": (
        lambda a: a[5].__setitem__(0, 8),
        r"slots\[0\]=8 is outside the slab's \[0, 8\)",
    ),
    "same_slot": (lambda a: a[5].__setitem__(2, a[5][0]), r"rows 0 and 2 both use scratch slot 5"),
    "never_started": (
        lambda a: a[5].__setitem__(0, SPARE),
        r"row 0: scratch slot 1 was never started",
    ),
    "missing_page": (
        lambda a: a[3].__setitem__((0, 0), -1),
        r"row 0: full pages \[0\] are absent",
    ),
    "hca_mid_window_fresh": (
        lambda a: a[6].__setitem__(0, True),
        r"row 0: chunk at 30 needs HCA partial-window tokens \[24, 30\)",
    ),
    "same_full_page": (
        lambda a: a[3].__setitem__((2, 0), a[3][0, 1]),
        r"rows 0 and 2 both write full page 13",
    ),
    "same_swa_page": (
        lambda a: a[4].__setitem__((3, 2), a[4][0, 1]),
        r"rows 0 and 3 both write swa page 18",
    ),
    "reads_written_page": (
        lambda a: a[3].__setitem__((6, 0), a[3][3, 2]),
        r"row 6 reads full page 22 that row 3 writes",
    ),
    "fresh_dtype": (
        lambda a: a.__setitem__(6, a[6].astype(np.int32)),
        r"fresh must be a bool array",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals(setup, case):
    run = _run(setup, 1)
    m = run.m
    args = _ok_args(run)
    pools, slab = m.init_pools(PAGES, PAGES), m.new_scratch_slab(len(ROWS))
    slab.starts[:] = 0
    slab.starts[SPARE] = -1
    check_batch(m.config, *args, slab.starts)  # the unmutated batch passes
    mutate, match = REFUSALS[case]
    mutate(args)
    with pytest.raises(ValueError, match=match):
        m.forward(pools, slab, *args)


def test_refusals_of_slab_and_load(setup):
    run = _run(setup, 1)
    m = run.m
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="slots must be a positive int"):
            m.new_scratch_slab(bad)
    args = _ok_args(run)
    args[2][:] = 0  # padding rows only
    pools, slab = m.init_pools(PAGES, PAGES), m.new_scratch_slab(len(ROWS))
    with pytest.raises(ValueError, match="a fused load needs at least one valid row"):
        m.forward(pools, slab, *args, load=object())


def test_fresh_resets_a_reused_slot(setup):
    """A request starting at 0 in request 5's used slot: the slot is NaN except its own row."""
    run = _run(setup, 1)
    m = run.m
    pools = m.init_pools(PAGES, PAGES)
    slab = m.new_scratch_slab(len(ROWS))
    slab.rows = jax.device_put(run.b_slab, slab.rows.sharding)
    slab.starts = run.b_starts.copy()
    slot = SLOTS[5]
    assert np.isfinite(run.b_slab[:, :, slot]).any()  # the old request left rows there
    rows = [5] + [None] * (len(ROWS) - 1)
    args = run.decode_batch({5: 9}, {5: 0}, rows)
    args[6][0] = True
    _, pools, slab = m.forward(pools, slab, *args)
    got = np.asarray(slab.rows)[:, :, slot]  # [pp, max_hca, r, 2D]
    hca = m.stacked.subpool_valid[PoolKind.C128_KV]  # [pp, max_hca]
    assert np.isfinite(got[hca][:, 0]).all()  # position 0 written in every HCA layer
    assert np.isnan(got[:, :, 1:]).all() and np.isnan(got[~hca]).all()
    assert slab.starts[slot] == 0
    np.testing.assert_array_equal(np.delete(slab.starts, slot), np.delete(run.b_starts, slot))


def test_fused_load_in_a_batched_step(setup):
    """Request 5's prefix pages come back from host inside the batched decode step
    (``load=``): bit-identical to the step on intact pools; without the load the
    zeroed pages are caught (negative control)."""
    run = _run(setup, 1)
    m = run.m
    full5, swa5 = _tables(5)
    dev_full, dev_swa = full5[:3], swa5[2:3]  # prefix pages < 48 and the window page
    move = PageMove.of(dev_full, [0, 1, 2], dev_swa, [0])
    host = HostPools(m.spec, m.layer_maps, 4, 4)
    eng = TransferEngine(m.mesh, m.layer_maps, host, copy_path=CopyPath.DIRECT)
    try:
        pools, slab = _oracle_state(run)
        eng.backup(pools, move).wait()
        live = [r for r in ROWS if r is not None]
        toks = {r: int(np.argmax(run.o_steps[r][-1])) for r in live}
        pos = {r: LENS[r] + STEPS for r in live}
        args = run.decode_batch(toks, pos)
        row5 = ROWS.index(5)
        want, _, _ = m.forward(pools, slab, *args)

        def zeroed():
            pools, slab = _oracle_state(run)
            arrays = {}
            for kind, a in pools.arrays.items():
                a = np.array(a, copy=True)
                swa_space = kind in (PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE)
                a[:, :, dev_swa if swa_space else dev_full] = 0
                arrays[kind] = jax.device_put(a, pools[kind].sharding)
            return pools.replace(arrays=arrays), slab

        pools, slab = zeroed()
        lw = eng.prepare_layerwise(pools, move)
        got, _, _ = m.forward(pools, slab, *args, load=lw)
        np.testing.assert_array_equal(got[ROWS.index(5)], want[row5])
        bad, _, _ = m.forward(*zeroed(), *args)
        assert _diff(bad[row5], want[row5]) > TOL
        others = [i for i, r in enumerate(ROWS) if r not in (None, 5)]
        np.testing.assert_array_equal(got[others], want[others])
    finally:
        eng.close()
