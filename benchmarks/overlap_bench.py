"""Load-back + prefill overlap: a layer-wise load fused into the prefill vs load then prefill.

A tiny DSV4-style model (``TinyDSV4Config.tiny_faithful()``: page 256, window
128) restores a prefix of ``N`` pages from the host slabs, then prefills one
chunk (one page) after it. Warm timings (every program compiled first), median
of repeats, blocking on the result each time:

* ``load``: ``engine.load(pools, move)`` (all layers, one program);
* ``prefill``: ``model.prefill(pools, chunk, start=N*page, ...)`` on loaded pools;
* ``fused``: ``engine.prepare_layerwise(pools, move)`` then
  ``model.prefill(..., load=...)``: layer ``l``'s rows land inside the stage's
  layer scan right before layer ``l`` (layer ``l + 1``'s host->device copy is
  issued one layer ahead);
* ``sequence``: ``load`` then ``prefill`` back to back, one wait at the end;
* ``fused_unguarded`` (staged only): ``fused`` with ``guarded=False``: every
  kind's rows move each layer (no ``lax.cond`` around the copy; more bytes).

Every variant computes the same chunk on the same restored prefix: the logits
must be bit-identical (``fused_bit_exact``).

``overlap_ratio = t(fused) / (t(load) + t(prefill))``: below 1 when the copies
hide under compute. On CPU there is no link to hide (device memory is host
memory): the ratio there measures the cost of the fused program, not overlap.

Prints a table and, as the last line, one JSON object.
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

from jaxhicache.pools.host import HostPools
from jaxhicache.transfer import CopyPath, PageMove, TransferEngine
from kernels_pallas.common import Backend
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel


def _medians(fns, reps: int) -> dict[str, float]:
    """Median seconds of each function; the variants run interleaved, one round per repeat
    (machines here are shared: drift hits every variant alike)."""
    for fn in fns:
        fn()  # warm-up (compile)
    ts: dict[str, list[float]] = {fn.__name__: [] for fn in fns}
    for _ in range(reps):
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            ts[fn.__name__].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def bench_overlap(cfg, prefix_pages, reps, paths, backend=None, pp=1, seed=0) -> list[dict]:
    """One row per (copy path, prefix pages): seconds of each variant and the ratio."""
    model = PagedModel(cfg, init_params(cfg, seed), pp=pp)
    spec, page = model.spec, cfg.page_size
    w = spec.swa_trailing_pages
    rng = np.random.default_rng(seed)
    rows = []
    for n in prefix_pages:
        device_pages = n + 2
        host = HostPools(spec, model.layer_maps, n, n)
        for kind in spec.kinds():  # a finite random prefix in the slabs
            slab = host.stacked(kind)
            slab[...] = rng.standard_normal(slab.shape).astype(slab.dtype) * 0.1
        tokens = rng.integers(0, cfg.vocab, page).astype(np.int32)
        dev = rng.permutation(n).astype(np.int32)  # the prefix's device pages
        hst = rng.permutation(n).astype(np.int32)
        move = PageMove.of(dev, hst, dev[n - w :], hst[n - w :])
        full = np.concatenate([dev, [n]]).astype(np.int32)  # page n: the new chunk
        swa = np.full(n + 1, -1, np.int32)
        swa[n - w :] = dev[n - w :]
        swa[n] = n
        for path in paths:
            eng = TransferEngine(
                model.mesh, model.layer_maps, host, backend=backend, copy_path=path
            )
            state = {"pools": model.init_pools(device_pages, device_pages)}

            logits = {}

            def load():
                p, h = eng.load(state["pools"], move)
                h.wait()
                state["pools"] = p

            def prefill():
                lg, p, _ = model.prefill(state["pools"], tokens, n * page, full, swa)
                state["pools"] = jax.block_until_ready(p)
                logits["prefill"] = lg

            def fused(guarded=True):
                lw = eng.prepare_layerwise(state["pools"], move)
                lw = lw if guarded else lw.replace(guarded=False)
                lg, p, _ = model.prefill(state["pools"], tokens, n * page, full, swa, load=lw)
                state["pools"] = jax.block_until_ready(p)
                logits["fused" if guarded else "fused_unguarded"] = lg

            def fused_unguarded():
                fused(guarded=False)

            def sequence():
                p, _ = eng.load(state["pools"], move)
                lg, p, _ = model.prefill(p, tokens, n * page, full, swa)
                state["pools"] = jax.block_until_ready(p)
                logits["sequence"] = lg

            fns = [load, prefill, fused, sequence]
            if path is CopyPath.STAGED:
                fns.append(fused_unguarded)  # every kind's rows copied each layer, no cond
            t = _medians(fns, reps)
            # every variant computes the same chunk on the same restored prefix
            ref = np.asarray(logits["sequence"])
            exact = all(np.array_equal(np.asarray(v), ref) for v in logits.values())
            eng.close()
            rows.append(
                {
                    "path": path.value,
                    "prefix_pages": n,
                    "load_MiB": move.full_device.size * spec.page_bytes() / 2**20,
                    **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                    "overlap_ratio": t["fused"] / (t["load"] + t["prefill"]),
                    "sequence_ratio": t["sequence"] / (t["load"] + t["prefill"]),
                    "unguarded_ratio": t.get("fused_unguarded", float("nan"))
                    / (t["load"] + t["prefill"]),
                    "fused_bit_exact": bool(exact),
                }
            )
    return rows


def print_table(rows, file=sys.stdout) -> None:
    cols = ["load_ms", "prefill_ms", "fused_ms", "sequence_ms", "overlap_ratio"]
    cols += ["sequence_ratio", "unguarded_ratio"]
    head = " ".join(f"{c:>15}" for c in cols)
    print(f"{'path':<7} {'pages':>5} {'MiB':>7} {head} {'bit-exact':>9}", file=file)
    for r in rows:
        vals = " ".join(f"{r[c]:>15.3f}" for c in cols)
        print(
            f"{r['path']:<7} {r['prefix_pages']:>5} {r['load_MiB']:>7.1f} {vals} "
            f"{r['fused_bit_exact']!s:>9}",
            file=file,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer prefix sizes and repeats")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--backend", choices=[b.name for b in Backend], default=None)
    p.add_argument("--paths", default=None, help="comma list of copy paths (default: all allowed)")
    p.add_argument("--model", choices=["tiny_faithful", "mini"], default="tiny_faithful")
    p.add_argument("--pages", default=None, help="comma list of prefix page counts")
    args = p.parse_args(argv)
    platform = jax.default_backend()
    if args.paths:
        paths = [CopyPath(x) for x in args.paths.split(",")]
    else:
        paths = [CopyPath.STAGED, CopyPath.DIRECT] if platform == "cpu" else [CopyPath.STAGED]
    backend = Backend[args.backend] if args.backend else None
    cfg = getattr(TinyDSV4Config, args.model)()
    pages, reps = ([8, 32], args.reps or 5) if args.quick else ([16, 64, 128], args.reps or 9)
    if args.pages:
        pages = [int(x) for x in args.pages.split(",")]
    rows = bench_overlap(cfg, pages, reps, paths, backend)
    print(
        f"platform={platform} device={jax.devices()[0].device_kind} jax={jax.__version__} "
        f"cpus={os.cpu_count()} model={args.model}({cfg.num_layers} layers, page "
        f"{cfg.page_size}) prefill=1 chunk of {cfg.page_size} tokens, median of {reps}"
    )
    print_table(rows)
    big = max(rows, key=lambda r: (r["path"] == "staged", r["prefix_pages"]))
    summary = {
        "platform": platform,
        "path": big["path"],
        "prefix_pages": big["prefix_pages"],
        "overlap_ratio": round(big["overlap_ratio"], 3),
        "fused_bit_exact": all(r["fused_bit_exact"] for r in rows),
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
