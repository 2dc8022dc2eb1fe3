"""Radix-tree control-plane benchmark (protocol of ``../shared/bench/README.md``).

For every request of the shared multi-turn workload: ``match_prefix`` (timed,
including the concatenated device ids), lock the matched node, fresh page ids
for the unmatched tail (untimed), ``insert`` (timed), free what the tree gave
back, unlock; every 32 requests evict the excess over the cap (LRU). The first
50 requests run on a throw-away tree as warm-up.

With SWA the request hands ``insert`` an SWA page for every page it computed;
the tree keeps the ones outside the window as reclaimable. Every 32 requests,
SWA pages over ``--swa-cap-tokens`` are reclaimed (``reclaim_swa``), then
evicted with their nodes if that is not enough. The same run also replays the
workload once in *eager* mode, the behaviour before reclaimable SWA: right
after every insert, reclaim every page outside the leaf, lock and branch-point
windows (``reclaim_swa(reclaimable, keep_branch_windows=True)``); the table
shows both usable hit rates (``--no-eager`` skips it).

Workloads: ``default`` / ``--quick`` are the shared generator's presets;
``--workload reuse`` is built from the same generator with documents instead
of system prompts: 2,048-token documents (agent contexts), each read by 2 or 3
(``--uses``) consecutive conversations of 2 turns (2,000 conversations), so a
long prefix is reused only a few times, soon after it was first cached.
Explicit workload flags (``--system-prompt-len`` ...) override any preset.

    python benchmarks/tree_bench.py --page-size 16            # default workload
    python benchmarks/tree_bench.py --page-size 1 --quick     # the workload's --small
    python benchmarks/tree_bench.py --swa-window 0            # plain full-attention tree
    python benchmarks/tree_bench.py --page-size 16 --workload reuse
    python benchmarks/tree_bench.py --page-size 16 --swa-cap-tokens 100000   # SWA pressure

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxhicache.pools.allocator import OutOfPages, PageAllocator  # noqa: E402
from jaxhicache.spec import Tier  # noqa: E402
from jaxhicache.tree import RadixTree  # noqa: E402

# SGLang 0.5.15 RadixCache figures from ../shared/bench/README.md:
# (workload, page) -> (match ops/s, p50, p99, insert ops/s, p50, p99, hit rate)
REFERENCE = {
    ("default", 1): (45_240, 22, 45, 33_472, 31, 65, 0.826),
    ("default", 16): (34_766, 28, 60, 28_542, 36, 78, 0.826),
    ("default", 64): (27_472, 36, 71, 24_043, 43, 82, 0.827),
    ("small", 1): (61_000, 17, 32, 38_000, 27, 78, 0.796),
}
EVICT_EVERY = 32
WARMUP = 50
DEV = Tier.DEVICE
# The reuse preset (documents instead of system prompts; see the module docstring).
REUSE = {
    "system_prompt_len": 2048,
    "num_conversations": 2000,
    "turns": 2,
    "user_tokens": 200,
    "gen_tokens": 100,
    "concurrency": 64,
}


def _load_workload(shared: Path):
    bench = shared / "bench"
    if not (bench / "workload.py").exists():
        raise SystemExit(f"workload generator not found: {bench / 'workload.py'} (use --shared)")
    sys.path.insert(0, str(bench))
    import workload

    return workload


def _parse(argv: list[str]):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    known, _ = pre.parse_known_args(argv)
    workload = _load_workload(known.shared)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared",
        help="folder holding bench/workload.py (default: ../shared from the repo root)",
    )
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the workload's --small preset")
    p.add_argument(
        "--swa-window",
        type=int,
        default=128,
        help="SWA window in tokens (DSV4: 128); 0 = no SWA component",
    )
    p.add_argument(
        "--cap-tokens",
        type=int,
        default=None,
        help="evict above this many cached tokens (500,000; 20,000 with --small)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs; figures are medians")
    p.add_argument(
        "--swa-cap-tokens",
        type=int,
        default=None,
        help="SWA pages above this many tokens are reclaimed, then evicted (default: --cap-tokens)",
    )
    p.add_argument("--no-eager", action="store_true", help="skip the eager-mode replay")
    p.add_argument(
        "--workload",
        choices=("default", "reuse"),
        default="default",
        help="default: the shared generator's preset; reuse: documents read 2-3 times",
    )
    p.add_argument(
        "--uses",
        type=int,
        nargs="+",
        default=[2, 3],
        help="reuse workload: conversations per document, drawn from these (default: 2 3)",
    )
    workload.add_workload_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.small = True
        if "--small" not in argv:
            argv = [*argv, "--small"]
    cfg = workload.config_from_args(args, argv)
    if args.workload == "reuse":
        base = dataclasses.replace(workload.WorkloadConfig(), **REUSE)
        explicit = {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if any(a.startswith("--" + k.replace("_", "-")) for a in argv)
        }
        cfg = dataclasses.replace(base, **explicit)
        cfg = dataclasses.replace(cfg, num_system_prompts=cfg.num_conversations)
    return workload, args, cfg


def reuse_workload(workload, cfg, uses: list[int]):
    """The shared generator's conversations, each reading a document: runs of 2 or 3
    (``uses``) consecutive conversations share one (the generator's system prompts
    serve as documents; token content and schedule are the generator's)."""
    wl = workload.Workload(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    docs = []
    doc = 0
    while len(docs) < cfg.num_conversations:
        docs.extend([doc] * int(rng.choice(uses)))
        doc += 1
    wl.conv_system = docs[: cfg.num_conversations]
    return wl


class _Run:
    def __init__(self, page_size, swa_pages, cap_tokens, swa_cap_tokens, max_len, eager=False):
        ps = page_size
        self.ps = ps
        self.swa_pages = swa_pages
        self.cap_pages = cap_tokens // ps
        self.swa_cap_pages = swa_cap_tokens // ps
        self.eager = eager
        self.tree = RadixTree(ps, swa_pages)
        slack = (EVICT_EVERY + 8) * (max_len // ps + 1)
        self.dev = PageAllocator(self.cap_pages + slack, "device-full")
        self.swa = PageAllocator(self.swa_cap_pages + slack, "device-swa")
        self.reclaimed = 0  # SWA pages reclaimed (pressure, or eager mode)
        self.swa_evictions = 0  # evictions that SWA pressure alone asked for

    def _alloc(self, alloc: PageAllocator, n: int) -> np.ndarray:
        try:
            return alloc.alloc(n)
        except OutOfPages:  # never expected with the slack above; stay correct anyway
            if alloc is self.swa:
                self._reclaim(n - alloc.num_free)
            if alloc.num_free < n:
                self._evict(n * self.ps)
            return alloc.alloc(n)

    def _reclaim(self, n: int) -> int:
        ids = self.tree.reclaim_swa(n, DEV)
        self.swa.free(ids)
        self.reclaimed += ids.size
        return ids.size

    def _evict(self, extra_tokens: int = 0) -> None:
        tree = self.tree
        excess = tree.total_device_pages() - self.cap_pages + extra_tokens // self.ps
        if excess > 0:
            r = tree.evict_device(excess)
            self.dev.free(r.full_ids)
            self.swa.free(r.swa_ids)
        if not self.swa_pages:
            return
        over = tree.total_device_swa_pages() - self.swa_cap_pages
        if over > 0:
            over -= self._reclaim(over)
        while over > 0:  # what reclaim cannot free leaves with its nodes
            r = tree.evict_device(over)
            if not r.evicted_pages:
                break
            self.swa_evictions += 1
            self.dev.free(r.full_ids)
            self.swa.free(r.swa_ids)
            over = tree.total_device_swa_pages() - self.swa_cap_pages

    def request(self, i: int, tokens: np.ndarray, out: tuple | None):
        tree = self.tree
        ps = self.ps
        pages = len(tokens) // ps
        aligned = tokens[: pages * ps]
        t0 = time.perf_counter_ns()
        m = tree.match_prefix(tokens)
        ids = m.device_full_ids
        t1 = time.perf_counter_ns()
        tree.inc_lock(m.node)
        if m.host_len:
            raise AssertionError("no host tier in this benchmark")
        have = ids.size
        n_new = pages - have
        full = self._alloc(self.dev, n_new)
        # Every page the request computed has an SWA page (the tree refills the
        # window where the SWA rule cut the hit and keeps the rest reclaimable).
        swa = self._alloc(self.swa, n_new) if self.swa_pages else None
        t2 = time.perf_counter_ns()
        r = tree.insert(aligned, full, swa)
        t3 = time.perf_counter_ns()
        self.dev.free(r.dup_full_ids)
        if self.swa_pages:
            self.swa.free(r.free_swa_ids)
        tree.dec_lock(m.node)
        if self.eager and self.swa_pages:  # the old rule: free class 1 right away
            n = tree.reclaimable_swa_pages(DEV)
            ids = tree.reclaim_swa(n, DEV, keep_branch_windows=True)
            self.swa.free(ids)
            self.reclaimed += ids.size
        if out is not None:
            match_ns, insert_ns, full_len, usable_len, aligned_len = out
            match_ns[i] = t1 - t0
            insert_ns[i] = t3 - t2
            full_len[i] = m.full_match_len
            usable_len[i] = m.matched_len
            aligned_len[i] = pages * ps
        if (i + 1) % EVICT_EVERY == 0:
            self._evict()


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()


def run_once(wl, page_size, swa_pages, cap, swa_cap, max_len, eager=False) -> dict:
    # Warm-up on a throw-away tree.
    warm = _Run(page_size, swa_pages, cap, swa_cap, max_len, eager)
    for r in wl:
        if r.index >= WARMUP:
            break
        warm.request(r.index, r.tokens, None)
    del warm
    n = len(wl)
    out = (
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
    )
    run = _Run(page_size, swa_pages, cap, swa_cap, max_len, eager)
    tokens = 0
    t_start = time.perf_counter()
    for r in wl:
        tokens += len(r.tokens)
        run.request(r.index, r.tokens, out)
    wall = time.perf_counter() - t_start
    run.tree.check_invariants()
    match_ns, insert_ns, full_len, usable_len, aligned_len = out
    tree = run.tree
    leased = run.dev.num_used
    if leased != tree.total_device_pages():
        raise AssertionError(
            f"device pages leaked: allocator {leased}, tree {tree.total_device_pages()}"
        )
    if swa_pages and run.swa.num_used != tree.total_device_swa_pages():
        raise AssertionError("SWA pages leaked")
    return {
        "requests": n,
        "tokens": tokens,
        "wall_s": wall,
        "match_ops_per_s": n / (match_ns.sum() / 1e9),
        "insert_ops_per_s": n / (insert_ns.sum() / 1e9),
        "match_p50_us": float(np.percentile(match_ns, 50) / 1e3),
        "match_p99_us": float(np.percentile(match_ns, 99) / 1e3),
        "insert_p50_us": float(np.percentile(insert_ns, 50) / 1e3),
        "insert_p99_us": float(np.percentile(insert_ns, 99) / 1e3),
        "prefix_hit_rate": float(full_len.sum() / aligned_len.sum()),
        "usable_hit_rate": float(usable_len.sum() / aligned_len.sum()),
        "matched_len_digest": _digest(full_len),
        "usable_len_digest": _digest(usable_len),
        "final_nodes": tree.num_nodes,
        "final_device_pages": tree.total_device_pages(),
        "final_device_swa_pages": tree.total_device_swa_pages(),
        "reclaimed_swa_pages": run.reclaimed,
        "swa_pressure_evictions": run.swa_evictions,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    workload, args, cfg = _parse(argv)
    ps = args.page_size
    if ps < 1:
        raise SystemExit("--page-size must be >= 1")
    small = args.small
    cap = args.cap_tokens if args.cap_tokens is not None else (20_000 if small else 500_000)
    swa_cap = args.swa_cap_tokens if args.swa_cap_tokens is not None else cap
    swa_pages = math.ceil(args.swa_window / ps) if args.swa_window > 0 else 0
    if args.workload == "reuse":
        wl = reuse_workload(workload, cfg, args.uses)
    else:
        wl = workload.Workload(cfg)
    digest = wl.digest()
    max_len = max(len(wl.request_tokens(c, t)[0]) for c, t in wl.schedule)
    runs = [run_once(wl, ps, swa_pages, cap, swa_cap, max_len) for _ in range(max(1, args.repeats))]
    for key in ("matched_len_digest", "usable_len_digest", "prefix_hit_rate"):
        if len({r[key] for r in runs}) != 1:
            raise AssertionError(f"{key} differs between repeats: not deterministic")
    med = {
        k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)
    }
    res = dict(runs[0])
    res.update(med)
    name = args.workload if args.workload == "reuse" else ("small" if small else "default")
    res = {
        "page_size": ps,
        "workload": name,
        "swa_window": args.swa_window,
        "swa_pages": swa_pages,
        "cap_tokens": cap,
        "swa_cap_tokens": swa_cap,
        "repeats": len(runs),
        **res,
    }
    if swa_pages and not args.no_eager:
        eager = run_once(wl, ps, swa_pages, cap, swa_cap, max_len, eager=True)
        res["eager_usable_hit_rate"] = eager["usable_hit_rate"]
        res["eager_reclaimed_swa_pages"] = eager["reclaimed_swa_pages"]
        res["usable_hit_rate_change"] = res["usable_hit_rate"] - eager["usable_hit_rate"]
    res["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["workload_digest"] = digest
    like = name != "reuse" and cfg == _default_like(workload, small)
    ref = REFERENCE.get((name, ps)) if like else None
    _table(res, ref)
    print(json.dumps(res))
    return res


def _default_like(workload, small: bool):
    return workload.WorkloadConfig.small() if small else workload.WorkloadConfig()


def _table(res: dict, ref) -> None:
    print(
        f"tree_bench: page_size={res['page_size']} workload={res['workload']} "
        f"({res['requests']} requests, {res['tokens']:,} tokens, digest {res['workload_digest'][:12]}…) "
        f"swa_window={res['swa_window']} (swa_pages={res['swa_pages']}) cap={res['cap_tokens']:,} "
        f"median of {res['repeats']}"
    )
    rows = [
        ("match ops/s", res["match_ops_per_s"], 0, "{:,.0f}"),
        ("match p50 µs", res["match_p50_us"], 1, "{:.1f}"),
        ("match p99 µs", res["match_p99_us"], 2, "{:.1f}"),
        ("insert ops/s", res["insert_ops_per_s"], 3, "{:,.0f}"),
        ("insert p50 µs", res["insert_p50_us"], 4, "{:.1f}"),
        ("insert p99 µs", res["insert_p99_us"], 5, "{:.1f}"),
        ("prefix hit rate", res["prefix_hit_rate"], 6, "{:.3f}"),
    ]
    print(f"{'metric':<18}{'jaxhicache':>14}{'reference':>14}{'ratio':>10}")
    for name, ours, idx, fmt in rows:
        if ref is None:
            print(f"{name:<18}{fmt.format(ours):>14}{'-':>14}{'-':>10}")
            continue
        theirs = ref[idx]
        # ratio > 1 means we are better (faster / lower latency / same hit rate = 1)
        ratio = ours / theirs if "ops" in name or "hit" in name else theirs / max(ours, 1e-9)
        print(f"{name:<18}{fmt.format(ours):>14}{fmt.format(theirs):>14}{ratio:>9.2f}x")
    print(
        f"{'usable hit rate':<18}{res['usable_hit_rate']:>14.3f}  (SWA-limited prefix; "
        f"matched-length digest {res['matched_len_digest'][:12]}…)"
    )
    if "eager_usable_hit_rate" in res:
        print(
            f"{'  eager SWA':<18}{res['eager_usable_hit_rate']:>14.3f}  (before: out-of-window "
            f"SWA freed at insert, branch points kept); change "
            f"{res['usable_hit_rate_change']:+.3f}"
        )
    if res["swa_pages"]:
        print(
            f"{'SWA reclaimed':<18}{res['reclaimed_swa_pages']:>14,}  pages under pressure "
            f"(cap {res['swa_cap_tokens']:,} tokens); "
            f"{res['swa_pressure_evictions']} extra evictions"
        )


if __name__ == "__main__":
    main()
