"""L3 storage benchmark: file-backend write / read throughput vs numpy tofile / fromfile.

DeepSeek-V4-Flash pages (the real fp8 geometry, 43 layers, page 256: 9,158,208
bytes per page over all stages) split over PP 4 stages (about 2.3 MB per stage
page), moved between the host slabs and a ``TensorStoreBackend`` on the file
driver, for both object layouts:

* ``per_space``: one object per (page, stage, page space) — 2 objects per stage page;
* ``per_subpool``: one object per (page, stage, sub-pool) — 6 per stage page.

Each figure is measured in the same run, on the same directory's file system,
against ``numpy.ndarray.tofile`` / ``numpy.fromfile`` of exactly the same bytes
split into the same files (no header, no checksum, no atomic rename), and
reported as a ratio (the machines are shared and noisy). Reads are page-cache
warm for both. Best of ``--reps`` repetitions, alternating ours and the baseline.
Reads are also timed against a raw ``readv`` of the same files into the same slab
rows (no header, no check): ``fromfile`` fills a recycled, cache-hot buffer, while a
load writes cold slab memory, so this is the bound of any read into the slabs.

Also prints stored bytes per page by page space (full vs SWA) for Flash. SWA-space
objects hold the window rows only (layout version 2: the last ``window - 1`` SWA KV
tokens and the A halves of the last 4 compressor-state slots of each page).

L3 restore vs recompute (tiny DSV4 model, ``models/``, one stage): instance A
serves an N-page prefix with write-through into a ``FileBackend`` and closes; a
fresh cache over the same store (device and host empty) serves the prefix plus
half a page, its N pages prefetched from L3 (``WAIT_COMPLETE``). Its TTFT
(``RequestReport.ttft_s``: admission, L3 read, load, the remaining prefill) is
compared with ``serve_uncached`` of the same prompt (whole prefix recomputed),
median of ``--l3-reps`` repeats, each over a fresh cache. Every program shape is
compiled first on a throw-away store (warm-up time reported apart). Checks: the
whole prefix came from storage, logits within 1e-4 of the recompute.

SWA checkpoints (``swa_checkpoint_every`` k = 1, 4, 16): object file bytes per
page and page space after A backs up a long prefix, and the restore ratio of a
prefix ending at a checkpoint; plus DSV4-Flash bytes per page for each k from
``stored_bytes_per_page`` (full space every page, the SWA window at every k-th).

The last line is one JSON object (``write_vs_tofile``, ``read_vs_fromfile`` for
the default layout, ``l3_restore_vs_recompute``, ``swa_checkpoints``,
``flash_checkpoint_bytes``, plus per-layout figures and byte counts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PAGE_SPACES, ModelCacheSpec, PageSpace
from jaxhicache.storage import (
    FileBackend,
    Namespace,
    ObjectLayout,
    TensorStoreBackend,
    object_key,
    page_hashes,
    plan_units,
    stored_bytes_per_page,
)
from jaxhicache.storage.format import header_length
from jaxhicache.storage.layout import StagePages

DEFAULT_LAYOUT = ObjectLayout.PER_SPACE


def _fill(host: HostPools, rng) -> None:
    for k in host.spec.kinds():
        a = host.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8)


def _jobs(spec, maps, layout, hashes):
    """(rank, space, namespace, units) for every stage and page space."""
    out = []
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        for s in PAGE_SPACES:
            out.append((r, s, ns, plan_units(spec, m, ns, s, layout)))
    return out


def _baseline_write(root, src, jobs, hashes, ids):
    """``tofile`` of the same bytes into the same files (directories made once).

    The payload of every object is gathered into contiguous arrays before the clock
    starts (SWA objects hold window rows, not contiguous in the slab): the baseline
    is pure file I/O, ours also reads the slab rows in place."""
    payloads = []
    for r, _s, ns, units in jobs:
        pages = StagePages(src, r, units)
        for u in units:
            for h, i in zip(hashes, ids, strict=True):
                parts = [np.ascontiguousarray(pages.view(p, int(i))) for p in u.parts]
                payloads.append((os.path.join(root, object_key(ns, u.unit, h)), parts))
    paths, made = [], set()
    t0 = time.perf_counter()
    for p, parts in payloads:
        d = os.path.dirname(p)
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        with open(p, "wb") as f:
            for a in parts:
                a.tofile(f)
        paths.append(p)
    return time.perf_counter() - t0, paths


def _baseline_read(paths, pool=None, k=1):
    """``fromfile`` of every path; with ``pool`` (``k`` threads), in ``k`` contiguous
    shares at once, as ``FileBackend(io_threads=k)`` splits a get."""

    def share(ps):
        return sum(np.fromfile(p, dtype=np.uint8).nbytes for p in ps)

    t0 = time.perf_counter()
    if pool is None:
        n = share(paths)
    else:
        cuts = [len(paths) * i // k for i in range(k + 1)]
        n = sum(pool.map(share, [paths[a:b] for a, b in itertools.pairwise(cuts)]))
    return time.perf_counter() - t0, n


def _slab_views(dst, jobs, ids):
    """The slab rows each baseline file's bytes belong in (``_baseline_write``'s order)."""
    out = []
    for r, _s, _ns, units in jobs:
        pages = StagePages(dst, r, units)
        for j in range(len(units)):
            out += [pages.direct(j, int(i)) for i in ids]
    return out


def _baseline_readv(paths, views):
    """What any read into the slabs costs at least: one ``readv`` of each payload file
    straight into its slab rows (every part's runs in place), no header, no check, no
    bookkeeping."""
    t0 = time.perf_counter()
    n = 0
    for p, v in zip(paths, views, strict=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            n += os.readv(fd, v)
        finally:
            os.close(fd)
    return time.perf_counter() - t0, n


def _backend(kind, path, layout, max_in_flight, io_threads=0):
    if kind == "file":
        return FileBackend(
            path, object_layout=layout, max_in_flight=max_in_flight, io_threads=io_threads
        )
    return TensorStoreBackend(path, object_layout=layout, max_in_flight=max_in_flight)


def bench_layout(
    spec, maps, src, dst, kind, layout, pages, reps, root, max_in_flight, rounds=3, io_threads=0
):
    """Best-of timings; each rep writes both ways (order alternating per rep), then
    reads ``rounds`` times each way, alternating (reads leave the files unchanged)."""
    hashes = page_hashes(np.arange(pages * spec.page_size) % 50_000, spec.page_size)
    ids = np.arange(pages)
    jobs = _jobs(spec, maps, layout, hashes)
    payload = pages * sum(u.nbytes for *_, units in jobs for u in units)
    objects = pages * sum(len(units) for *_, units in jobs)
    best = {"w": np.inf, "r": np.inf, "tofile": np.inf, "fromfile": np.inf, "fromfile_k": np.inf}
    best["readv"] = np.inf
    slab_views = _slab_views(dst, jobs, ids)
    pool = ThreadPoolExecutor(io_threads) if io_threads else None
    stored = 0
    for k in host_kinds(dst):
        dst.stacked(k).view(np.uint8)[...] = 0  # poison: every restored byte must be loaded
    for rep in range(reps):
        ours_dir = os.path.join(root, f"ours-{rep}")
        base_dir = os.path.join(root, f"base-{rep}")
        be = _backend(kind, ours_dir, layout, max_in_flight, io_threads)

        def write_ours(be=be):
            t0 = time.perf_counter()
            for r, s, ns, _units in jobs:
                assert be.put(ns, s, hashes, src, r, ids).all()
            best["w"] = min(best["w"], time.perf_counter() - t0)

        def read_ours(be=be):
            t0 = time.perf_counter()
            for r, s, ns, _units in jobs:
                assert be.get(ns, s, hashes, dst, r, ids).all()
            best["r"] = min(best["r"], time.perf_counter() - t0)

        paths = []

        def write_base(base_dir=base_dir):
            tw, ps = _baseline_write(base_dir, src, jobs, hashes, ids)
            paths[:] = ps
            best["tofile"] = min(best["tofile"], tw)

        def read_base():
            tr, nread = _baseline_read(paths)
            assert nread == payload
            best["fromfile"] = min(best["fromfile"], tr)
            tr, nread = _baseline_readv(paths, slab_views)
            assert nread == payload
            best["readv"] = min(best["readv"], tr)
            if pool is not None:  # the same bytes on as many threads as ours
                tr, nread = _baseline_read(paths, pool, io_threads)
                assert nread == payload
                best["fromfile_k"] = min(best["fromfile_k"], tr)

        first, second = (write_ours, write_base) if rep % 2 == 0 else (write_base, write_ours)
        first()
        second()
        for i in range(rounds):
            a, b = (read_ours, read_base) if (rep + i) % 2 == 0 else (read_base, read_ours)
            a()
            b()
        st = be.stats()
        stored = st.write_bytes_total
        assert st.integrity_failures_total == st.read_errors_total == st.write_errors_total == 0
        be.close()
        shutil.rmtree(ours_dir)
        shutil.rmtree(base_dir)
    for r, _s, _ns, units in jobs:  # the restored rows (SWA space: the window) equal the source
        got, want = StagePages(dst, r, units), StagePages(src, r, units)
        for u in units:
            for p in u.parts:
                for i in ids.tolist():
                    np.testing.assert_array_equal(got.view(p, i), want.view(p, i))
    if pool is not None:
        pool.shutdown()
    gb = payload / 1e9
    threaded = {}
    if io_threads:
        threaded = {
            "fromfile_threads_GBps": gb / best["fromfile_k"],
            "read_vs_fromfile_threads": best["fromfile_k"] / best["r"],
        }
    return {
        "backend": kind if not io_threads else f"{kind}-t{io_threads}",
        "io_threads": io_threads,
        "layout": layout.value,
        "pages": pages,
        "objects": objects,
        "payload_bytes": payload,
        "stored_bytes": stored,
        "write_GBps": gb / best["w"],
        "read_GBps": gb / best["r"],
        "tofile_GBps": gb / best["tofile"],
        "fromfile_GBps": gb / best["fromfile"],
        "write_vs_tofile": best["tofile"] / best["w"],
        "read_vs_fromfile": best["fromfile"] / best["r"],
        "readv_into_slab_vs_fromfile": best["fromfile"] / best["readv"],
        "read_vs_readv_into_slab": best["readv"] / best["r"],
        **threaded,
    }


def host_kinds(host: HostPools):
    return host.spec.kinds()


def flash_bytes(pp: int) -> dict:
    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, pp)
    out = {
        "full_page_bytes": stored_bytes_per_page(spec, None, PageSpace.FULL),
        "swa_page_bytes": stored_bytes_per_page(spec, None, PageSpace.SWA),
        "per_stage": [
            {
                "layers": [m.start_layer, m.end_layer],
                "full": stored_bytes_per_page(spec, m, PageSpace.FULL),
                "swa": stored_bytes_per_page(spec, m, PageSpace.SWA),
            }
            for m in maps
        ],
    }
    ns = Namespace.for_stage(spec, maps[0])
    key = object_key(ns, PageSpace.FULL, "0" * 64)
    out["header_bytes_per_object"] = header_length(key)
    total = out["full_page_bytes"] + out["swa_page_bytes"]
    out["swa_share"] = out["swa_page_bytes"] / total
    return out


# ---------------------------------------------------------------- L3 restore vs recompute
def _serving_model(preset: str, layers: int):
    from models.config import TinyDSV4Config
    from models.dsv4 import init_params
    from models.paged import PagedModel

    make = TinyDSV4Config.tiny_faithful if preset == "tiny_faithful" else TinyDSV4Config.mini
    cfg = make(num_layers=layers)
    return PagedModel(cfg, init_params(cfg, 0), pp=1)


def _loop(model, store_dir: str, every: int, pages: int):
    from jaxhicache.cache import WritePolicy
    from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
    from models.serving import ServingLoop

    page = model.config.page_size
    storage = StorageConfig(
        model_id="bench-tiny",
        prefetch_threshold=page,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        swa_checkpoint_every=every,
    )
    return ServingLoop.for_model(
        model,
        device_pages=pages,
        host_pages=3 * pages,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=storage,
        store=FileBackend(store_dir),
        layerwise=True,
    )


def _stored_bytes(store_dir: str) -> dict:
    """Object file bytes under ``store_dir`` by page space (the unit directory)."""
    out = {s.value: 0 for s in PageSpace}
    for d, _dirs, files in os.walk(store_dir):
        unit = os.path.basename(os.path.dirname(d))
        for f in files:
            out[unit] = out.get(unit, 0) + os.path.getsize(os.path.join(d, f))
    return out


def _write_prefix(model, store_dir, every, pages, prefix) -> float:
    """Instance A serves ``prefix`` (+1 token) with write-through to L3, then closes."""
    t0 = time.perf_counter()
    a = _loop(model, store_dir, every, pages)
    a.serve(prefix, 1)
    a.close()
    return time.perf_counter() - t0


def _restore_once(model, store_dir, every, pages, prompt, oracle_loop):
    """A fresh cache over the store serves ``prompt`` (from L3) and the recompute of it."""
    b = _loop(model, store_dir, every, pages)
    try:
        r = b.serve(prompt, 1)
    finally:
        b.close()
    o = oracle_loop.serve_uncached(prompt, 1)
    diff = max(
        float(np.abs(r.step_logits - o.step_logits).max()),
        float(np.abs(r.prefill_logits - o.prefill_logits[r.cached_tokens :]).max()),
    )
    return r, o, diff


def bench_restore(model, every, write_pages, hit_pages, extra, reps, root, tag) -> dict:
    """Median TTFT of an L3-served prompt (``hit_pages`` from storage + ``extra`` tokens)
    vs recomputing it, after a warm-up of the same shapes over a throw-away store."""
    page = model.config.page_size
    vocab = model.config.vocab
    cap = write_pages + 4
    oracle = _loop(model, os.path.join(root, f"{tag}-oracle"), every, cap)

    def tokens(seed):
        rng = np.random.default_rng(seed)
        prefix = rng.integers(0, vocab, write_pages * page + 1).astype(np.int32)
        prompt = np.concatenate(
            [prefix[: hit_pages * page], rng.integers(0, vocab, extra).astype(np.int32)]
        )
        return prefix, prompt

    # warm-up: the same program shapes on another store and other tokens
    t0 = time.perf_counter()
    wdir = os.path.join(root, f"{tag}-warm")
    prefix, prompt = tokens(1000)
    _write_prefix(model, wdir, every, cap, prefix)
    for _ in range(2):
        _restore_once(model, wdir, every, cap, prompt, oracle)
    warm_s = time.perf_counter() - t0
    shutil.rmtree(wdir, ignore_errors=True)

    sdir = os.path.join(root, f"{tag}-store")
    prefix, prompt = tokens(7)
    write_s = _write_prefix(model, sdir, every, cap, prefix)
    stored = _stored_bytes(sdir)
    t_l3, t_re, diffs = [], [], []
    for _ in range(reps):
        r, o, diff = _restore_once(model, sdir, every, cap, prompt, oracle)
        assert r.storage_cached_tokens > 0, r
        assert r.storage_cached_tokens == hit_pages * page, (r.storage_cached_tokens, hit_pages)
        assert diff < 1e-4, diff
        assert (r.generated == o.generated).all()
        t_l3.append(r.ttft_s)
        t_re.append(o.ttft_s)
        diffs.append(diff)
    oracle.close()
    shutil.rmtree(sdir, ignore_errors=True)
    l3, re_ = float(np.median(t_l3)), float(np.median(t_re))
    return {
        "swa_checkpoint_every": every,
        "write_pages": write_pages,
        "hit_pages": hit_pages,
        "prompt_tokens": int(prompt.size),
        "warmup_s": warm_s,
        "write_s": write_s,
        "ttft_l3_ms": l3 * 1e3,
        "ttft_recompute_ms": re_ * 1e3,
        "ratio": l3 / re_,
        "max_logit_diff": max(diffs),
        "stored_bytes": stored,
        "stored_bytes_per_page": {s: b / write_pages for s, b in stored.items()},
    }


def flash_checkpoint_bytes(ks) -> dict:
    """DSV4-Flash stored bytes per page and per million tokens for SWA checkpoints every k."""
    spec = ModelCacheSpec.deepseek_v4_flash()
    full = stored_bytes_per_page(spec, None, PageSpace.FULL)
    swa = stored_bytes_per_page(spec, None, PageSpace.SWA)
    w = spec.swa_trailing_pages  # SWA pages stored per checkpoint
    out = {}
    for k in ks:
        per_page = full + swa * min(w, k) / k
        out[str(k)] = {
            "bytes_per_page": per_page,
            "GB_per_Mtok": per_page * 1e6 / spec.page_size / 1e9,
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 pages, 2 reps (CI smoke)")
    p.add_argument("--pages", type=int, default=None, help="pages per run (default 24; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 2)")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument(
        "--io-threads",
        type=int,
        default=2,
        help="FileBackend io_threads of the extra threaded row (default 2; 0: no such row)",
    )
    p.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    p.add_argument(
        "--model",
        choices=("mini", "tiny_faithful"),
        default=None,
        help="tiny DSV4 preset for the L3 restore runs (default mini; page 16, window 8)",
    )
    p.add_argument("--layers", type=int, default=None, help="model layers (default 12; quick 8)")
    p.add_argument(
        "--l3-pages",
        type=int,
        default=None,
        help="prefix pages restored from L3 (default 32; quick 16)",
    )
    p.add_argument(
        "--ckpt-pages",
        type=int,
        default=None,
        help="pages backed up in the checkpoint runs (default 64; quick 32); restore half",
    )
    p.add_argument("--l3-reps", type=int, default=None, help="restore repeats (default 7; quick 3)")
    p.add_argument("--skip-throughput", action="store_true", help="only the L3 restore parts")
    args = p.parse_args(argv)
    pages = args.pages or (8 if args.quick else 24)
    reps = args.reps or (2 if args.quick else 5)
    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, args.pp)
    src = HostPools(spec, maps, pages, pages, reserve_bytes=1 << 30)
    dst = HostPools(spec, maps, pages, pages, reserve_bytes=1 << 30)
    _fill(src, np.random.default_rng(0))
    preset = args.model or "mini"
    layers = args.layers or (8 if args.quick else 12)
    l3_pages = args.l3_pages or (16 if args.quick else 32)
    ckpt_pages = args.ckpt_pages or (32 if args.quick else 64)
    l3_reps = args.l3_reps or (3 if args.quick else 7)
    ks = (1, 4, 16)
    root = tempfile.mkdtemp(prefix="jaxhicache-storage-bench-", dir=args.dir)
    try:
        results = (
            []
            if args.skip_throughput
            else [
                bench_layout(spec, maps, src, dst, kind, lay, pages, reps, root, args.max_in_flight)
                for kind in ("file", "tensorstore")
                for lay in (ObjectLayout.PER_SPACE, ObjectLayout.PER_SUBPOOL)
            ]
            + [
                bench_layout(
                    spec,
                    maps,
                    src,
                    dst,
                    "file",
                    DEFAULT_LAYOUT,
                    pages,
                    reps,
                    root,
                    args.max_in_flight,
                    io_threads=args.io_threads,
                )
                for _ in range(args.io_threads > 0)
            ]
        )
        model = _serving_model(preset, layers)
        extra = model.config.page_size // 2
        restore = bench_restore(model, 1, l3_pages, l3_pages, extra, l3_reps, root, "restore")
        # checkpoints: back up ckpt_pages, restore a prefix ending at a checkpoint of every k
        hit = ckpt_pages // 2 // max(ks) * max(ks) or max(ks)
        ckpt = [
            bench_restore(model, k, ckpt_pages, hit, extra, l3_reps, root, f"ckpt{k}") for k in ks
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    flash_ckpt = flash_checkpoint_bytes(ks)
    sizes = flash_bytes(args.pp)

    print(
        f"DSV4-Flash, PP {args.pp}, {pages} pages x {len(maps)} stages "
        f"({spec.page_bytes() / 1e6:.2f} MB per page), file driver, best of {reps}"
    )
    hdr = f"{'backend':<13}{'layout':<12}{'objects':>8}{'write GB/s':>12}{'tofile':>9}{'ratio':>7}{'read GB/s':>11}{'fromfile':>10}{'ratio':>7}"
    print(hdr)
    for r in results:
        print(
            f"{r['backend']:<13}{r['layout']:<12}{r['objects']:>8}{r['write_GBps']:>12.2f}{r['tofile_GBps']:>9.2f}"
            f"{r['write_vs_tofile']:>7.2f}{r['read_GBps']:>11.2f}{r['fromfile_GBps']:>10.2f}"
            f"{r['read_vs_fromfile']:>7.2f}"
            + (
                f"   ({r['read_vs_fromfile_threads']:.2f} of fromfile on {r['io_threads']} threads)"
                if r["io_threads"]
                else ""
            )
        )
    print(
        "raw readv of the same bytes into the same slab rows (no header, no check), "
        "of fromfile / ours of it:"
    )
    for r in results:
        print(
            f"  {r['backend']:<13}{r['layout']:<12}{r['readv_into_slab_vs_fromfile']:>7.2f}"
            f"{r['read_vs_readv_into_slab']:>7.2f}"
        )
    print("stored bytes per 256-token page (payload), DSV4-Flash:")
    print(f"  {'stage layers':<14}{'full space':>12}{'SWA space':>12}")
    for s in sizes["per_stage"]:
        print(f"  {s['layers']!s:<14}{s['full']:>12,}{s['swa']:>12,}")
    print(
        f"  {'whole model':<14}{sizes['full_page_bytes']:>12,}{sizes['swa_page_bytes']:>12,}"
        f"   SWA share {sizes['swa_share']:.1%}; header {sizes['header_bytes_per_object']} B/object"
    )
    cfg = model.config
    print(
        f"L3 restore vs recompute: TinyDSV4 {preset}, {layers} layers, page {cfg.page_size}, "
        f"window {cfg.window}, FileBackend, TTFT median of {l3_reps} "
        f"(warm-up {restore['warmup_s']:.1f} s, not counted)"
    )
    print(
        f"  {'ckpt k':>6}{'stored pg':>10}{'hit pg':>8}{'prompt':>8}{'L3 ms':>9}{'recomp ms':>11}"
        f"{'ratio':>7}{'full B/pg':>11}{'SWA B/pg':>10}{'max |dlogit|':>14}"
    )
    for r in [restore, *ckpt]:
        bpp = r["stored_bytes_per_page"]
        print(
            f"  {r['swa_checkpoint_every']:>6}{r['write_pages']:>10}{r['hit_pages']:>8}"
            f"{r['prompt_tokens']:>8}{r['ttft_l3_ms']:>9.2f}{r['ttft_recompute_ms']:>11.2f}"
            f"{r['ratio']:>7.3f}{bpp['full']:>11,.0f}{bpp['swa']:>10,.0f}{r['max_logit_diff']:>14.2e}"
        )
    print("DSV4-Flash stored bytes per 256-token page with SWA checkpoints every k pages:")
    for k, v in flash_ckpt.items():
        print(
            f"  k={k:<4}{v['bytes_per_page']:>14,.0f} B/page{v['GB_per_Mtok']:>8.2f} GB per 1M tokens"
        )
    default = next(
        (r for r in results if r["layout"] == DEFAULT_LAYOUT.value and r["backend"] == "file"),
        None,
    )
    threaded = next((r for r in results if r["io_threads"]), None)

    def rnd(d):
        if isinstance(d, dict):
            return {k: rnd(v) for k, v in d.items()}
        return round(d, 4) if isinstance(d, float) else d

    out = {
        "bench": "storage",
        "write_vs_tofile": default and round(default["write_vs_tofile"], 3),
        "read_vs_fromfile": default and round(default["read_vs_fromfile"], 3),
        "io_threads": args.io_threads,
        "write_vs_tofile_io_threads": threaded and round(threaded["write_vs_tofile"], 3),
        "read_vs_fromfile_io_threads": threaded and round(threaded["read_vs_fromfile"], 3),
        "read_vs_fromfile_io_threads_same_threads": threaded
        and round(threaded["read_vs_fromfile_threads"], 3),
        "readv_into_slab_vs_fromfile": default and round(default["readv_into_slab_vs_fromfile"], 3),
        "l3_restore_vs_recompute": round(restore["ratio"], 4),
        "l3_restore": rnd(restore),
        "swa_checkpoints": {
            str(r["swa_checkpoint_every"]): {
                "stored_bytes_per_page": rnd(r["stored_bytes_per_page"]),
                "restore_vs_recompute": round(r["ratio"], 4),
                "hit_pages": r["hit_pages"],
                "write_pages": r["write_pages"],
            }
            for r in ckpt
        },
        "flash_checkpoint_bytes": rnd(flash_ckpt),
        "model": {"preset": preset, "layers": layers, "page": cfg.page_size, "window": cfg.window},
        "backend": "file",
        "layout": DEFAULT_LAYOUT.value,
        "cases": {
            f"{r['backend']}/{r['layout']}": {
                k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
            }
            for r in results
        },
        "flash_bytes_per_page": sizes,
        "pp": args.pp,
        "pages": pages,
        "reps": reps,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
