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

Also prints stored bytes per page by page space (full vs SWA) for Flash.
The last line is one JSON object (``write_vs_tofile``, ``read_vs_fromfile`` for
the default layout, plus per-layout figures and byte counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace
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
        for s in PageSpace:
            out.append((r, s, ns, plan_units(spec, m, ns, s, layout)))
    return out


def _baseline_write(root, src, jobs, hashes, ids):
    """``tofile`` of the same bytes into the same files (directories made once)."""
    paths, made = [], set()
    t0 = time.perf_counter()
    for r, _s, ns, units in jobs:
        pages = StagePages(src, r, units)
        for j, u in enumerate(units):
            for h, i in zip(hashes, ids, strict=True):
                p = os.path.join(root, object_key(ns, u.unit, h))
                d = os.path.dirname(p)
                if d not in made:
                    os.makedirs(d, exist_ok=True)
                    made.add(d)
                with open(p, "wb") as f:
                    for buf in pages.source(j, int(i)):
                        np.frombuffer(buf, np.uint8).tofile(f)
                paths.append(p)
    return time.perf_counter() - t0, paths


def _baseline_read(paths):
    t0 = time.perf_counter()
    n = 0
    for p in paths:
        n += np.fromfile(p, dtype=np.uint8).nbytes
    return time.perf_counter() - t0, n


def _backend(kind, path, layout, max_in_flight):
    if kind == "file":
        return FileBackend(path, object_layout=layout, max_in_flight=max_in_flight)
    return TensorStoreBackend(path, object_layout=layout, max_in_flight=max_in_flight)


def bench_layout(spec, maps, src, dst, kind, layout, pages, reps, root, max_in_flight, rounds=3):
    """Best-of timings; each rep writes both ways (order alternating per rep), then
    reads ``rounds`` times each way, alternating (reads leave the files unchanged)."""
    hashes = page_hashes(np.arange(pages * spec.page_size) % 50_000, spec.page_size)
    ids = np.arange(pages)
    jobs = _jobs(spec, maps, layout, hashes)
    payload = pages * sum(u.nbytes for *_, units in jobs for u in units)
    objects = pages * sum(len(units) for *_, units in jobs)
    best = {"w": np.inf, "r": np.inf, "tofile": np.inf, "fromfile": np.inf}
    stored = 0
    for k in host_kinds(dst):
        dst.stacked(k).view(np.uint8)[...] = 0  # poison: every restored byte must be loaded
    for rep in range(reps):
        ours_dir = os.path.join(root, f"ours-{rep}")
        base_dir = os.path.join(root, f"base-{rep}")
        be = _backend(kind, ours_dir, layout, max_in_flight)

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
    for r, _s, _ns, units in jobs:  # the restored slabs equal the source
        for u in units:
            for p in u.parts:
                np.testing.assert_array_equal(dst.slab(r, p.kind)[ids], src.slab(r, p.kind)[ids])
    gb = payload / 1e9
    return {
        "backend": kind,
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 pages, 2 reps (CI smoke)")
    p.add_argument("--pages", type=int, default=None, help="pages per run (default 24; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 2)")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    args = p.parse_args(argv)
    pages = args.pages or (8 if args.quick else 24)
    reps = args.reps or (2 if args.quick else 5)
    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, args.pp)
    src = HostPools(spec, maps, pages, pages, reserve_bytes=1 << 30)
    dst = HostPools(spec, maps, pages, pages, reserve_bytes=1 << 30)
    _fill(src, np.random.default_rng(0))
    root = tempfile.mkdtemp(prefix="jaxhicache-storage-bench-", dir=args.dir)
    try:
        results = [
            bench_layout(spec, maps, src, dst, kind, lay, pages, reps, root, args.max_in_flight)
            for kind in ("file", "tensorstore")
            for lay in (ObjectLayout.PER_SPACE, ObjectLayout.PER_SUBPOOL)
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
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
        )
    print("stored bytes per 256-token page (payload), DSV4-Flash:")
    print(f"  {'stage layers':<14}{'full space':>12}{'SWA space':>12}")
    for s in sizes["per_stage"]:
        print(f"  {s['layers']!s:<14}{s['full']:>12,}{s['swa']:>12,}")
    print(
        f"  {'whole model':<14}{sizes['full_page_bytes']:>12,}{sizes['swa_page_bytes']:>12,}"
        f"   SWA share {sizes['swa_share']:.1%}; header {sizes['header_bytes_per_object']} B/object"
    )
    default = next(
        r for r in results if r["layout"] == DEFAULT_LAYOUT.value and r["backend"] == "file"
    )
    out = {
        "bench": "storage",
        "write_vs_tofile": round(default["write_vs_tofile"], 3),
        "read_vs_fromfile": round(default["read_vs_fromfile"], 3),
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
