"""Prefix restores after prefill chunks longer than a page.

A chunk writes C4 compressor-state ring rows for the last 8 tokens of the
chunk and for the last 8 tokens of every page it covers (``models/chunk.py``).
A restore at a page boundary ``P`` reads the ring rows of tokens ``P-4 .. P-1``
from SWA page ``P/page - 1``.  When the cached prefix came from chunks of one
page or less, the chunk-end rule alone already covers every page's tail, so
only sources with chunks longer than a page (``P`` strictly inside a chunk,
more than 4 tokens before its end) need the per-page rule.

Each source run here prefills the whole sequence in chunks of one length
(``page + 1``, ``page + 5``, ``2 page + 3``, one shot), then the prefix up to
every page boundary is restored into fresh pages and the rest is prefilled
again in chunks of the same length.  The continued logits must match the
uninterrupted run and the dense reference within ``TOL``.

Which restores depend on the per-page rule (:func:`_page_rule_needed`):
chunks of ``page + 1`` end at most 4 tokens past each boundary, so their
chunk-end rows already cover ``P-4 .. P-1`` (a positive check only);
``page + 5`` needs the rule at every boundary; ``2 page + 3`` and one shot at
every boundary strictly inside a chunk.  Deleting the rule makes those
restores differ by 0.7-1.6 (mini) and 0.4-0.56 (tiny-faithful).

Every chunk is padded to the sequence length (``pad_to``), so each config
compiles one program.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.config import C4_RATIO, C4_RING, TinyDSV4Config
from models.dsv4 import init_params
from models.reference import reference_with_margins
from models.restore import restore_prefix
from models.streaming import (
    init_stream_state,
    restored_state,
    run_chunked,
    single_stage_params,
)

TOL = 1e-4  # as in tests/test_model.py
MIN_MARGIN = 2e-5  # the reference's top-K selection is this far from a tie


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class _Model:
    """One config, its weights, a token sequence and its dense reference logits."""

    def __init__(self, cfg: TinyDSV4Config, n: int, seed: int = 0):
        self.cfg, self.n = cfg, n
        self.spec = cfg.cache_spec()
        self.params = init_params(cfg, seed)
        self.sp = single_stage_params(cfg, self.params)
        self.tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab, n).astype(np.int32)
        ref, margins = reference_with_margins(cfg, self.params, self.tokens)
        self.ref = np.asarray(ref)
        self.margin = float(np.min(margins))
        self.n_pages = -(-n // cfg.page_size)
        self._sources: dict[int, tuple] = {}

    def source(self, chunk: int):
        """The uninterrupted run in chunks of ``chunk`` tokens: ``(logits, final state)``."""
        if chunk not in self._sources:
            state = init_stream_state(self.cfg, self.n, num_pages=2 * self.n_pages)
            logits, state = run_chunked(self.cfg, self.sp, state, self.tokens, chunk, pad_to=self.n)
            self._sources[chunk] = (np.asarray(logits), state)
        return self._sources[chunk]

    def restore(self, chunk: int, prefix_len: int):
        """Restore the source run's prefix ``[0, prefix_len)`` into pages ``[n, 2n)`` and
        prefill the rest in chunks of ``chunk``; returns the logits of ``[prefix_len, n)``."""
        _, state = self.source(chunk)
        src = np.arange(self.n_pages, dtype=np.int32)
        dst = src + self.n_pages
        pools, (full, swa) = restore_prefix(self.spec, state.pools, prefix_len, src, src, dst, dst)
        assert (swa[: prefix_len // self.cfg.page_size - self.spec.swa_trailing_pages] == -1).all()
        st = restored_state(self.cfg, pools, full, swa, prefix_len)
        logits, st = run_chunked(
            self.cfg, self.sp, st, self.tokens[prefix_len:], chunk, pad_to=self.n
        )
        assert st.pos == self.n
        return np.asarray(logits)


@pytest.fixture(scope="module")
def mini():
    return _Model(TinyDSV4Config.mini(), 80)  # page 16, window 8, HCA ratio 8


@pytest.fixture(scope="module")
def faithful():
    return _Model(TinyDSV4Config.tiny_faithful(), 600)  # page 256, window 128, HCA 128


def _page_rule_needed(n: int, chunk: int, page: int) -> list[int]:
    """Boundaries ``P`` whose ring rows ``P-4 .. P-1`` only the per-page rule writes.

    The chunk holding token ``P-1`` ends at ``e``; its chunk-end rule writes
    tokens ``[e-8, e)``, which covers ``P-4 .. P-1`` iff ``e - 8 <= P - 4``.
    """
    out = []
    for p in range(page, n, page):
        e = min(n, ((p - 1) // chunk + 1) * chunk)
        if e - C4_RING > p - C4_RATIO:
            out.append(p)
    return out


def _check(m: _Model, chunk: int, needs_rule: list[int], capsys):
    page = m.cfg.page_size
    assert chunk > page  # the point of this file
    assert _page_rule_needed(m.n, chunk, page) == needs_rule
    assert m.margin >= MIN_MARGIN, m.margin
    full, _ = m.source(chunk)
    d = _diff(full, m.ref)
    assert d <= TOL, f"uninterrupted run in chunks of {chunk} vs reference: {d:.3g}"
    found = {}
    for p in range(page, m.n, page):
        got = m.restore(chunk, p)
        found[p] = (_diff(got, full[p:]), _diff(got, m.ref[p:]))
    with capsys.disabled():
        print(f"\nchunks of {chunk} (page {page}): restore at P -> max|Δlogit| vs run, vs ref: ")
        print("  " + ", ".join(f"P={p}: {a:.2g}, {b:.2g}" for p, (a, b) in found.items()))
    bad = {p: v for p, v in found.items() if not max(v) <= TOL}
    assert not bad, f"restores after chunks of {chunk} differ by more than {TOL}: {bad}"


@pytest.mark.parametrize(
    ("chunk", "needs_rule"),
    [(17, []), (21, [16, 32, 48, 64]), (35, [16, 48, 64]), (80, [16, 32, 48, 64])],
    ids=["page+1", "page+5", "2page+3", "oneshot"],
)
def test_restore_after_long_chunks_mini(mini, chunk, needs_rule, capsys):
    _check(mini, chunk, needs_rule, capsys)


@pytest.mark.parametrize(
    ("chunk", "needs_rule"),
    [(257, []), (515, [256]), (600, [256, 512])],
    ids=["page+1", "2page+3", "oneshot"],
)
def test_restore_after_long_chunks_tiny_faithful(faithful, chunk, needs_rule, capsys):
    _check(faithful, chunk, needs_rule, capsys)
