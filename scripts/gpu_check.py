"""GPU checks behind ``scripts/gpu_check.sh`` (see there). Prints its table last.

1. Triton kernels (``interpret=False``) vs the ``jnp`` references on fresh random
   data with poisoned outputs, for every DSV4 row size and MHA dtypes.
2. Ceilings: device-to-device copy, pinned-host D2H and H2D bandwidth.
3. The transfer benchmark (``benchmarks/transfer_bench.py``) with each figure as a
   fraction of its ceiling.
4. Whether a ``pinned_host`` array can feed the Triton kernel directly.
5. Load-back/prefill overlap (``benchmarks/overlap_bench.py``): a layer-wise load
   fused into the prefill of a tiny DSV4-style model vs load then prefill,
   ``overlap_ratio = t(fused) / (t(load) + t(prefill))``, and whether the fused
   run's logits are bit-identical to load-then-prefill.

``--allow-cpu`` runs the same code on CPU (XLA backend) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from overlap_bench import bench_overlap
from overlap_bench import print_table as print_overlap_table
from transfer_bench import bench_case, flash_shaped

from jaxhicache.spec import ModelCacheSpec
from jaxhicache.transfer import CopyPath
from kernels_pallas.common import Backend, Layout
from kernels_pallas.paged_gather import paged_gather, paged_gather_reference
from kernels_pallas.paged_scatter import paged_scatter, paged_scatter_reference

DSV4_ROW_BYTES = (149_760, 37_440, 8_448, 1_728, 65_536, 16_384)


def _rand(rng, shape, dtype):
    dtype = np.dtype(jnp.dtype(dtype))
    if dtype.itemsize == 1:
        return rng.integers(1, 255, shape, dtype=np.uint8).view(dtype)
    return rng.standard_normal(shape).astype(dtype)


def kernel_checks(backend: Backend, log) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = [((b,), "uint8") for b in DSV4_ROW_BYTES]
    cases += [
        ((2, 16, 4, 64), d) for d in ("bfloat16", "float16", "float32", "float8_e4m3fn", "uint8")
    ]
    results = []
    for row, dtype in cases:
        for layout in (Layout.PAGE_FIRST, Layout.LAYER_FIRST):
            pool = jnp.asarray(_rand(rng, (3, 37, *row), dtype))
            ids = np.asarray(rng.permutation(37)[:13], np.int32)
            ok = True
            try:
                got = paged_gather(pool, ids, layout=layout, backend=backend)
                want = paged_gather_reference(pool, ids, layout=layout)
                ok &= bool(
                    np.array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
                )
                staging = jnp.asarray(_rand(rng, want.shape, dtype))
                poisoned = jnp.asarray(_rand(rng, pool.shape, dtype))  # every page differs
                got = paged_scatter(poisoned, ids, staging, layout=layout, backend=backend)
                want = paged_scatter_reference(poisoned, ids, staging, layout=layout)
                ok &= bool(
                    np.array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
                )
                err = ""
            except Exception as e:  # record, keep going: this is a report
                ok, err = False, f"{type(e).__name__}: {e}"
                log.write(traceback.format_exc())
            results.append(
                {
                    "row": list(row),
                    "dtype": dtype,
                    "layout": layout.name,
                    "ok": ok,
                    "error": err[:300],
                }
            )
    return results


def _bw(fn, nbytes, reps=10):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return nbytes / min(ts) / 1e9


def ceilings(nbytes: int) -> dict:
    dev = jax.devices()[0]
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), dev)
    copy = jax.jit(lambda a: a + 0)  # reads and writes nbytes each
    d2d = _bw(lambda: copy(x).block_until_ready(), 2 * nbytes) / 2  # bytes moved once
    out = {"d2d_copy_GBps": d2d}
    try:
        host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        devs = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        xh = jax.device_put(x, host)
        out["d2h_pinned_GBps"] = _bw(lambda: jax.device_put(x, host).block_until_ready(), nbytes)
        out["h2d_pinned_GBps"] = _bw(lambda: jax.device_put(xh, devs).block_until_ready(), nbytes)
    except Exception as e:
        out["pinned_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def pinned_feeds_triton(backend: Backend) -> str:
    """Can a pinned_host array be the Triton kernel's operand directly?"""
    dev = jax.devices()[0]
    pool = jnp.asarray(np.arange(4 * 16 * 256, dtype=np.float32).reshape(4, 16, 256))
    try:
        host = jax.device_put(
            pool, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        )
    except Exception as e:
        return f"no pinned_host memory: {type(e).__name__}: {e}"[:300]
    ids = np.array([3, 1, 7], np.int32)
    try:
        got = paged_gather(host, ids, backend=backend)
        same = np.array_equal(np.asarray(got), np.asarray(paged_gather_reference(pool, ids)))
        kind = getattr(got.sharding, "memory_kind", None)
        return f"ran; result {'correct' if same else 'WRONG'}; output memory_kind={kind}"
    except Exception as e:
        return f"rejected: {type(e).__name__}: {str(e).splitlines()[0][:250]}"


def overlap_check(platform: str, backend: Backend, quick: bool, log) -> dict:
    """The overlap benchmark (staged path with the platform's kernels; on CPU both paths)."""
    from models.config import TinyDSV4Config

    if platform == "gpu":
        pages, paths = ([64, 256] if quick else [64, 256, 1024]), [CopyPath.STAGED]
    else:
        pages, paths = [8], [CopyPath.STAGED, CopyPath.DIRECT]
    try:
        rows = bench_overlap(TinyDSV4Config.tiny_faithful(), pages, 5, paths, backend)
    except Exception as e:  # record, keep going: this is a report
        log.write(traceback.format_exc())
        return {"error": f"{type(e).__name__}: {e}"[:500], "rows": []}
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--allow-cpu", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    platform = jax.default_backend()
    if platform != "gpu" and not args.allow_cpu:
        print(f"no GPU backend (platform={platform}); use --allow-cpu to test the script")
        return 2
    backend = Backend.TRITON if platform == "gpu" else Backend.XLA
    with open(os.path.join(args.out, "kernel_checks.log"), "w") as log:
        kc = kernel_checks(backend, log)
    ceil = ceilings(1 << (30 if platform == "gpu" else 26))
    pinned = pinned_feeds_triton(backend)
    counts = [1, 16, 64, 256] if args.quick or platform != "gpu" else [1, 4, 16, 64, 256, 1024]
    layers = 4 if args.quick or platform != "gpu" else 6
    pages = max(counts)
    dsv4 = flash_shaped(layers)
    mha = ModelCacheSpec.mha(
        num_layers=8, num_kv_heads=8, head_dim=128, page_size=64, dtype="bfloat16"
    )
    rows = bench_case(dsv4.name, dsv4, pages, counts, 5, backend)
    rows += bench_case("mha-l8-h8-d128-p64-bf16", mha, pages, counts, 5, backend)
    with open(os.path.join(args.out, "overlap.log"), "w") as log:
        overlap = overlap_check(platform, backend, args.quick, log)
    d2d, d2h, h2d = (
        ceil.get(k, float("nan")) for k in ("d2d_copy_GBps", "d2h_pinned_GBps", "h2d_pinned_GBps")
    )
    for r in rows:
        r["gather_frac"] = r["gather_GBps"] / d2d
        r["scatter_frac"] = r["scatter_GBps"] / d2d
        r["backup_frac"] = r["backup_GBps"] / d2h
        r["load_frac"] = r["load_GBps"] / h2d
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "backend": backend.name,
        "kernel_checks_passed": sum(c["ok"] for c in kc),
        "kernel_checks_total": len(kc),
        "kernel_failures": [c for c in kc if not c["ok"]],
        "ceilings": ceil,
        "pinned_host_feeds_triton": pinned,
        "rows": rows,
        "overlap": overlap,
    }
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    # ---- the table, last
    print(
        f"\n== jaxhicache GPU check {report['date']}  {report['device']}  jax {report['jax']}  backend {backend.name}"
    )
    print(
        f"kernels vs reference: {report['kernel_checks_passed']}/{report['kernel_checks_total']} bit-exact"
    )
    print(
        "ceilings GB/s: "
        + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in ceil.items())
    )
    print(f"pinned_host array into the Triton kernel: {pinned}")
    print(
        f"{'case':<26} {'pages':>5} {'MiB':>8} {'gather':>14} {'scatter':>14} {'backup(D2H)':>14} {'load(H2D)':>14}"
    )
    for r in rows:
        cells = [
            f"{r[k + '_GBps']:6.1f} {r[k + '_frac']:5.0%}"
            for k in ("gather", "scatter", "backup", "load")
        ]
        print(
            f"{r['case']:<26} {r['pages']:>5} {r['bytes'] / 2**20:>8.1f} "
            + " ".join(f"{c:>14}" for c in cells)
        )
    print(
        "(GB/s and fraction of ceiling: gather/scatter vs d2d copy, backup vs pinned D2H, load vs pinned H2D)"
    )
    print(
        "\nload-back + prefill (tiny_faithful, 1 chunk of 256 tokens after an N-page prefix; "
        "overlap_ratio = t(fused) / (t(load) + t(prefill)), < 1 = copies hidden under compute)"
    )
    if overlap.get("error"):
        print(f"overlap benchmark FAILED: {overlap['error']} (log: {args.out}/overlap.log)")
    else:
        print_overlap_table(overlap["rows"])
    ok = report["kernel_checks_passed"] == report["kernel_checks_total"]
    ok &= not overlap.get("error") and all(r["fused_bit_exact"] for r in overlap["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
