"""Batched decode: one ``PagedModel.forward`` step of B running requests vs B single steps.

The main job's ``bench`` model (``ModelPreset.BENCH``: page 64, window 32,
hidden 256, 8 layers, random weights) holds eight requests with different
prompt lengths (several pages each, prefilled one by one into disjoint pages of
one pool).  Every program is compiled first; then, interleaved per repeat
(machines here are shared: drift hits every variant alike), median of repeats:

* ``single(B)``: ``model.decode_step`` of requests ``0..B-1``, one after the other
  (what the one-at-a-time serving loop does), each blocking on its logits;
* ``batched(B)``: one ``model.forward`` of the same B requests (``T = 1``).

Each step re-decodes the requests' next token at the same position (the state
does not drift between repeats).  The batched logits are checked against the
single ones (``max_diff``, within 1e-4).

``ratio(B) = t(batched B) / t(single B)`` and, as in the issue,
``ratio_b8 = t(batched B=8) / (8 * t(single step))`` with ``t(single step)`` the
mean single step of the B = 8 run (target <= 0.5).  Prints a table and, as the
last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from models.dsv4 import init_params
from models.multiturn import ModelPreset
from models.paged import PagedModel

BATCHES = (1, 2, 4, 8)


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Requests:
    """Eight prefilled requests on one pool: tables, scratch, next token and position."""

    def __init__(self, model: PagedModel, lens: list[int], seed: int = 0):
        cfg, page = model.config, model.config.page_size
        rng = np.random.default_rng(seed)
        self.model = model
        self.lens = lens
        need = [-(-(n + 1) // page) for n in lens]
        self.width = _bucket(max(need))
        total = sum(need)
        self.pools = model.init_pools(total, total)
        self.full, self.swa, self.scratch, self.tokens = [], [], [], []
        off = 0
        for n, k in zip(lens, need, strict=True):
            full = np.full(self.width, -1, np.int32)
            full[:k] = np.arange(off, off + k)
            swa = full.copy()
            swa[:k] = total - 1 - np.arange(off, off + k)  # another order than full
            off += k
            prompt = rng.integers(0, cfg.vocab, n).astype(np.int32)
            logits, self.pools, scratch = model.prefill(self.pools, prompt, 0, full, swa)
            self.full.append(full)
            self.swa.append(swa)
            self.scratch.append(scratch)
            self.tokens.append(int(np.argmax(logits[-1])))
        self.slab = model.new_scratch_slab(len(lens))
        rows = np.asarray(self.slab.rows).copy()  # [pp, max_hca, slots, r, 2D]
        for i, s in enumerate(self.scratch):
            rows[:, :, i] = np.asarray(s.rows)
        self.slab.rows = jax.device_put(rows, self.slab.rows.sharding)
        self.slab.starts[:] = 0

    def single(self, b: int) -> list[np.ndarray]:
        out = []
        for i in range(b):
            logits, self.pools, self.scratch[i] = self.model.decode_step(
                self.pools, self.tokens[i], self.lens[i], self.full[i], self.swa[i], self.scratch[i]
            )
            out.append(logits)
        return out

    def batched(self, b: int) -> np.ndarray:
        logits, self.pools, self.slab = self.model.forward(
            self.pools,
            self.slab,
            np.asarray(self.tokens[:b], np.int32)[:, None],
            np.asarray(self.lens[:b], np.int32),
            np.ones(b, np.int32),
            np.stack(self.full[:b]),
            np.stack(self.swa[:b]),
            np.arange(b, dtype=np.int32),
        )
        return logits[:, 0]


def bench_decode(model: PagedModel, lens: list[int], reps: int) -> list[dict]:
    req = _Requests(model, lens)
    max_diff = 0.0
    for b in BATCHES:  # compile every program; check batched == single
        single = np.stack(req.single(b))
        max_diff = max(max_diff, float(np.max(np.abs(req.batched(b) - single))))
    ts: dict[tuple[str, int], list[float]] = {}
    for _ in range(reps):
        for b in BATCHES:
            for name, fn in (("single", req.single), ("batched", req.batched)):
                t0 = time.perf_counter()
                fn(b)
                ts.setdefault((name, b), []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in ts.items()}
    step = med[("single", BATCHES[-1])] / BATCHES[-1]
    return [
        {
            "batch": b,
            "single_ms": 1e3 * med[("single", b)],
            "batched_ms": 1e3 * med[("batched", b)],
            "ratio": med[("batched", b)] / med[("single", b)],
            "ratio_vs_mean_step": med[("batched", b)] / (b * step),
            "max_diff": max_diff,
        }
        for b in BATCHES
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument(
        "--lens",
        default="300,420,530,650,760,880,990,1110",
        help="comma list of 8 prompt lengths (tokens)",
    )
    args = p.parse_args(argv)
    lens = [int(x) for x in args.lens.split(",")]
    if len(lens) != BATCHES[-1]:
        raise SystemExit(f"--lens needs {BATCHES[-1]} lengths, got {len(lens)}")
    preset = ModelPreset.BENCH
    cfg = preset.model_config()
    model = PagedModel(cfg, init_params(cfg, 0), pp=args.pp, fast_compile=preset.fast_compile)
    t0 = time.perf_counter()
    rows = bench_decode(model, lens, args.reps)
    wall = time.perf_counter() - t0
    print(
        f"platform={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"jax={jax.__version__} cpus={os.cpu_count()} model=bench({cfg.num_layers} layers, "
        f"page {cfg.page_size}, hidden {cfg.hidden}) pp={args.pp} prompts={lens} "
        f"median of {args.reps}, {wall:.0f} s in all"
    )
    print(f"{'B':>3} {'B single ms':>12} {'batched ms':>11} {'ratio':>7} {'vs B*step':>10}")
    for r in rows:
        print(
            f"{r['batch']:>3} {r['single_ms']:>12.2f} {r['batched_ms']:>11.2f} "
            f"{r['ratio']:>7.3f} {r['ratio_vs_mean_step']:>10.3f}"
        )
    b8 = rows[-1]
    summary = {
        "bench": "decode",
        "platform": jax.default_backend(),
        "pp": args.pp,
        "ratio_b8": round(b8["ratio_vs_mean_step"], 3),
        "target_ratio_b8": 0.5,
        "max_diff": b8["max_diff"],
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0 if b8["max_diff"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
