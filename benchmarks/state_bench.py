"""Recurrent-state snapshots: what the snapshot component costs (issue 17's figures).

1. **Tree operations with vs without the snapshot component**, same run, on the shared
   multi-turn workload (``../shared/bench``, its small preset with ``--quick``): per
   request ``match_prefix`` (timed), lock, ``insert`` of the unmatched pages (timed),
   and with snapshots an ``attach_state`` at the last grid point of the inserted prefix
   (timed with the insert), unlock; every 32 requests evict device pages over a cap and
   snapshots over a slot cap. Reports ops/s of both trees, their ratio, and the usable
   hit rate (with snapshots a hit ends on the grid).
2. **Snapshot cost per chunk**: the tiny hybrid model (``models/hybrid*.py``), one
   prefill chunk continuing a request, state written in place (no snapshot kept)
   versus into a new slot that the cache keeps as a snapshot (what ``HiCache.states``
   plans at a grid point); median of ``--reps`` timed calls each, interleaved, plus the
   snapshot's bytes against the chunk's KV bytes.

    python benchmarks/state_bench.py --quick

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxhicache.tree import RadixTree  # noqa: E402


def _tree_run(wl, page: int, interval: int, cap_pages: int, slot_cap: int) -> dict:
    tree = RadixTree(page, state_interval=interval)
    free = list(range(cap_pages * 4))
    slots = list(range(slot_cap * 4))
    match_ns = insert_ns = 0
    usable = aligned = n = 0
    for r in wl:
        toks = np.asarray(r.tokens, np.int64)
        key = toks[:-1]
        t0 = time.perf_counter_ns()
        m = tree.match_prefix(key)
        t1 = time.perf_counter_ns()
        match_ns += t1 - t0
        tree.inc_lock(m.node)
        whole = len(toks) // page
        have = m.matched_len // page
        ids = np.array([free.pop() for _ in range(whole - have)], np.int32)
        t0 = time.perf_counter_ns()
        res = tree.insert(toks[: whole * page], ids)
        if interval:
            g = whole * page // interval * interval
            if g:
                _, unused = tree.attach_state(toks[:g], slots.pop())
                if unused >= 0:
                    slots.append(unused)
        insert_ns += time.perf_counter_ns() - t0
        free.extend(res.dup_full_ids.tolist())
        tree.dec_lock(m.node)
        usable += m.matched_len
        aligned += len(key) // page * page
        n += 1
        if n % 32 == 0:
            over = tree.total_device_pages() - cap_pages
            if over > 0:
                ev = tree.evict_device(over)
                free.extend(ev.full_ids.tolist())
                slots.extend(ev.state_ids.tolist())
            if interval and len(tree.states.dev) > slot_cap:
                got, _ = tree.states.evict(len(tree.states.dev) - slot_cap, True)
                slots.extend(got.tolist())
    tree.check_invariants()
    return {
        "match_ops_per_s": n / (match_ns / 1e9),
        "insert_ops_per_s": n / (insert_ns / 1e9),
        "usable_hit_rate": usable / aligned,
        "requests": n,
    }


def tree_figures(args) -> dict:
    sys.path.insert(0, str(args.shared / "bench"))
    import workload

    cfg = workload.WorkloadConfig.small() if args.quick else workload.WorkloadConfig()
    wl = list(workload.Workload(cfg))
    cap = 20_000 // args.page if args.quick else 500_000 // args.page
    runs = {"plain": [], "snapshots": []}
    for _ in range(args.reps):  # interleaved: the machine's noise hits both alike
        runs["plain"].append(_tree_run(wl, args.page, 0, cap, 0))
        runs["snapshots"].append(_tree_run(wl, args.page, args.interval, cap, cap // 4))
    out = {}
    for name, rs in runs.items():
        for k in ("match_ops_per_s", "insert_ops_per_s", "usable_hit_rate"):
            out[f"{name}_{k}"] = statistics.median(r[k] for r in rs)
    out["match_ratio"] = out["snapshots_match_ops_per_s"] / out["plain_match_ops_per_s"]
    out["insert_ratio"] = out["snapshots_insert_ops_per_s"] / out["plain_insert_ops_per_s"]
    out["requests"] = runs["plain"][0]["requests"]
    return out


def chunk_figures(args) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from models.hybrid import init_params
    from models.hybrid_config import TinyHybridConfig
    from models.hybrid_paged import PagedHybridModel

    cfg = TinyHybridConfig.mini()
    model = PagedHybridModel(cfg, init_params(cfg, seed=0), pp=1)
    chunk, page = args.chunk, cfg.page_size
    pages = 4 * chunk // page
    pools = model.init_pools(pages, 0, num_state_slots=4)
    table = np.arange(pages, dtype=np.int32)
    swa = np.full(pages, -1, np.int32)
    toks = np.random.default_rng(0).integers(0, cfg.vocab, 2 * chunk).astype(np.int32)
    # the first chunk: the request's state in slot 0
    _, pools, _ = model.prefill(
        pools, toks[:chunk], 0, table, swa, chunk_size=chunk, state_in=-1, state_out=0
    )
    times = {"in_place": [], "snapshot": []}
    for _ in range(args.reps + 1):  # the first round compiles
        for name, out in (("in_place", 0), ("snapshot", 1)):
            t0 = time.perf_counter()
            logits, pools, _ = model.prefill(
                pools, toks[chunk:], chunk, table, swa, chunk_size=chunk, state_in=0, state_out=out
            )
            np.asarray(logits)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    spec = model.spec
    return {
        "chunk_tokens": chunk,
        "chunk_in_place_ms": med["in_place"] * 1e3,
        "chunk_snapshot_ms": med["snapshot"] * 1e3,
        "snapshot_cost_ratio": med["snapshot"] / med["in_place"],
        "snapshot_bytes": spec.snapshot_bytes(),
        "chunk_kv_bytes": spec.page_bytes() * chunk // page,
        "snapshot_bytes_per_chunk_kv_bytes": spec.snapshot_bytes()
        / (spec.page_bytes() * chunk // page),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the workload's small preset")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--page", type=int, default=16, help="tokens per page (tree part)")
    p.add_argument("--interval", type=int, default=64, help="snapshot grid in tokens")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk (model part)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    res = {**tree_figures(args), **chunk_figures(args)}
    print(f"{'figure':<40}{'value':>14}")
    for k in (
        "plain_match_ops_per_s",
        "snapshots_match_ops_per_s",
        "match_ratio",
        "plain_insert_ops_per_s",
        "snapshots_insert_ops_per_s",
        "insert_ratio",
        "plain_usable_hit_rate",
        "snapshots_usable_hit_rate",
        "chunk_in_place_ms",
        "chunk_snapshot_ms",
        "snapshot_cost_ratio",
        "snapshot_bytes_per_chunk_kv_bytes",
    ):
        print(f"{k:<40}{res[k]:>14.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
