"""The sequential main job's figures: per-request records → the results dict.

``RequestRecord`` pairs one request's cache-off and cache-on ``RequestReport``;
:func:`build_results` turns the records, the L3 probes and the cache counters into
the dict that ``results.json`` holds; :func:`summary` picks the headline figures
(the CLI's last line). Nothing here runs the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable

import jax
import numpy as np

from jaxhicache.cache import HiCache
from models.multiturn_report import json_default
from models.serving import RequestReport

__all__ = ["RequestRecord", "build_results", "mismatches", "percentile", "snapshot", "summary"]


@dataclasses.dataclass
class RequestRecord:
    """One request of the schedule, cache off and cache on."""

    index: int
    client: int
    turn: int
    prompt_len: int
    gen_len: int
    off: RequestReport
    on: RequestReport
    headroom_s: float  # the job's host-headroom step before the cache-on request

    @property
    def ttft_off_s(self) -> float:
        return self.off.ttft_s

    @property
    def ttft_on_s(self) -> float:
        """Cache-on TTFT, the host-headroom step included."""
        return self.headroom_s + self.on.ttft_s

    def row(self) -> dict:
        off, on = self.off, self.on
        return {
            "index": self.index,
            "client": self.client,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "gen_len": self.gen_len,
            "ttft_off_ms": self.ttft_off_s * 1e3,
            "ttft_on_ms": self.ttft_on_s * 1e3,
            "headroom_ms": self.headroom_s * 1e3,
            "decode_step_off_ms": _ms(_step_s(off)),
            "decode_step_on_ms": _ms(_step_s(on)),
            "device_tokens": on.device_cached_tokens,
            "host_tokens": on.host_cached_tokens,
            "storage_tokens": on.storage_cached_tokens,
            "prefill_tokens_on": on.prefill_tokens,
            "tokens_match": bool(np.array_equal(on.generated, off.generated)),
        }


def _step_s(r: RequestReport) -> float | None:
    """Seconds per decode step (``RequestReport.decode_s``: first token to last, the
    cache's insert and release excluded); ``None`` for one token."""
    n = r.generated.size
    return r.decode_s / (n - 1) if n > 1 else None


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def summary(results: dict) -> dict:
    """The one-line JSON of a run (the headline figures)."""
    keys = (
        "ttft_ratio_later_turns", "decode_step_ratio", "hit_tokens", "prefill_tokens",
        "tokens_match", "l3_restore_vs_recompute", "warmup_s", "wall_s",
        "compiles_in_timed_steps",
    )  # fmt: skip
    out = {"bench": "multiturn", **{k: results[k] for k in keys}}
    out["ttft_turn1_ratio"] = results["ttft"]["turn1"]["ratio_p50"]
    out["preset"] = results["config"]["preset"]
    out["family"] = results["config"].get("family", "dsv4")
    from models.multiturn_two_pass import two_pass_summary  # (it imports this module)

    out.update(two_pass_summary(results))
    return json.loads(
        json.dumps(out, default=json_default), parse_float=lambda x: round(float(x), 4)
    )


def snapshot(cache: HiCache) -> dict:
    """The cache's counters plus the transfer engine's D2H seconds."""
    s = cache.stats()
    s["d2h_seconds"] = cache.engine.stats.backup_seconds
    return s


def percentile(xs, q) -> float | None:
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else None


def ttft_block(off_ms: list[float], on_ms: list[float]) -> dict:
    """TTFT p50/p90 cache off and on (milliseconds, one value per request) and their
    ratios (``None`` without requests)."""
    out = {
        "requests": len(off_ms),
        "off_p50_ms": percentile(off_ms, 50),
        "off_p90_ms": percentile(off_ms, 90),
        "on_p50_ms": percentile(on_ms, 50),
        "on_p90_ms": percentile(on_ms, 90),
    }
    out["ratio_p50"] = out["on_p50_ms"] / out["off_p50_ms"] if off_ms else None
    out["ratio_p90"] = out["on_p90_ms"] / out["off_p90_ms"] if off_ms else None
    return out


def _ttft_block(records: list[RequestRecord], sel: Callable[[RequestRecord], bool]) -> dict:
    rs = [r for r in records if sel(r)]
    return ttft_block([r.ttft_off_s * 1e3 for r in rs], [r.ttft_on_s * 1e3 for r in rs])


def mismatches(records: list[RequestRecord]) -> list[dict]:
    """Requests whose cache-on tokens differ from cache-off's, with the first differing step."""
    out = []
    for r in records:
        a, b = r.on.generated, r.off.generated
        if not np.array_equal(a, b):
            diff = np.flatnonzero(a[: min(a.size, b.size)] != b[: min(a.size, b.size)])
            step = int(diff[0]) if diff.size else min(a.size, b.size)
            out.append({"index": r.index, "client": r.client, "turn": r.turn, "first_step": step})
    return out


def _gbps(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def timing_fields(tm: dict) -> dict:
    """Wall times of the job's passes and the compilations counted inside them."""
    return {
        "warmup_s": tm["warmup_s"],
        "cache_off_s": tm["off_s"],
        "cache_on_s": tm["on_s"],
        "wall_s": tm["wall_s"],
        "compiles_in_timed_steps": tm["compiles"].count,
        "compiled_in_timed_steps": tm["compiles"].names,
    }


def config_fields(job, model_config, temp_store: bool) -> dict:
    """The configuration both jobs record: preset, model, mesh, pools, policies, store,
    workload and the machine (``job``: a sequential or concurrent job)."""
    c = job.config
    return {
        "preset": c.preset.value,
        "family": c.preset.family.value,
        "l3": job.store is not None,
        "quick": c.quick,
        "model": dataclasses.asdict(model_config),
        "fast_compile": c.preset.fast_compile,
        "pp": c.pp,
        "tp": c.tp,
        "device_pages": job.device_pages,
        "host_pages": job.host_pages,
        "page_size": job.page,
        "write_policy": c.write_policy.value,
        "prefetch_policy": c.prefetch_policy.value,
        "prefetch_threshold": job.page,
        **c.preset.cache_fields(),
        "two_pass": c.two_pass,
        "store": c.store or ("temporary FileBackend directory" if job.store else None),
        "store_latency_ms": c.store_latency_ms,
        "l3_cost_model": c.l3_cost_model,
        "l3_pages_per_object": c.pages_per_object(job.page),
        "store_backend": (
            "FileBackend(<temp>)" if temp_store else None if job.store is None else repr(job.store)
        ),
        "model_id": job.model_id,
        "workload": dataclasses.asdict(c.workload),
        "workload_digest": job.workload.digest(),
        "jax": jax.__version__,
        "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
        "cpu_count": os.cpu_count(),
    }


def build_results(job, records, probes, before, after, usage, **tm) -> dict:
    c = job.config
    d = {
        k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before
    }
    hit = {
        "device": sum(r.on.device_cached_tokens for r in records),
        "host": sum(r.on.host_cached_tokens for r in records),
        "storage": sum(r.on.storage_cached_tokens for r in records),
    }
    bad = mismatches(records)
    logit_diff = max(float(np.abs(r.on.step_logits - r.off.step_logits).max()) for r in records)
    probe_ok = [
        p for p in probes if p["storage_tokens"] > 0 and p["device_tokens"] == p["host_tokens"] == 0
    ]
    step_on = [_step_s(r.on) for r in records if r.gen_len > 1]
    step_off = [_step_s(r.off) for r in records if r.gen_len > 1]
    later = _ttft_block(records, lambda r: r.turn >= 2)
    turns = c.workload.turns
    per_turn = []
    for t in range(1, turns + 1):
        rs = [r for r in records if r.turn == t]
        computed = sum(r.on.prefill_tokens for r in rs)
        per_turn.append(
            {
                "turn": t,
                "ttft_off_p50_ms": percentile([r.ttft_off_s * 1e3 for r in rs], 50),
                "ttft_on_p50_ms": percentile([r.ttft_on_s * 1e3 for r in rs], 50),
                "device_tokens": sum(r.on.device_cached_tokens for r in rs),
                "host_tokens": sum(r.on.host_cached_tokens for r in rs),
                "storage_tokens": sum(r.on.storage_cached_tokens for r in rs),
                "computed_tokens": computed,
            }
        )
    d2h_s = d.get("d2h_seconds", 0.0)
    mc = job.mcfg
    return {
        "job": "multiturn",
        "date": datetime.date.today().isoformat(),
        "requests": len(records),
        "ttft_ratio_later_turns": later["ratio_p50"],
        "ttft": {"turn1": _ttft_block(records, lambda r: r.turn == 1), "later_turns": later},
        "decode_step_ratio": float(np.median(step_on) / np.median(step_off)) if step_on else None,
        "decode_step_ms": {
            "cache_off_p50": float(np.median(step_off) * 1e3) if step_off else None,
            "cache_on_p50": float(np.median(step_on) * 1e3) if step_on else None,
        },
        "hit_tokens": hit,
        "prefill_tokens": {
            "cache_on": sum(r.on.prefill_tokens for r in records),
            "cache_off": sum(r.off.prefill_tokens for r in records),
        },
        "tokens_match": not bad and all(p["tokens_match"] for p in probes),
        "mismatches": bad,
        "max_step_logit_diff": logit_diff,
        "l3_restore_vs_recompute": (
            float(np.median([p["ratio"] for p in probe_ok])) if probe_ok else None
        ),
        "l3_probe": probes,
        "bytes": {
            "d2h": {
                "bytes": d.get("backup_bytes", 0),
                "seconds": d2h_s,
                "GBps": _gbps(d.get("backup_bytes", 0), d2h_s),
            },
            "h2d": {
                "bytes": d.get("load_bytes", 0),
                "note": "fused into the first prefill chunk (layer-wise); not timed apart",
            },
            "l3_write": {
                "bytes": d.get("l3_write_bytes_total", 0),
                "seconds": d.get("l3_write_seconds_total", 0.0),
                "GBps": _gbps(
                    d.get("l3_write_bytes_total", 0), d.get("l3_write_seconds_total", 0.0)
                ),
            },
            "l3_read": {
                "bytes": d.get("l3_read_bytes_total", 0),
                "seconds": d.get("l3_read_seconds_total", 0.0),
                "GBps": _gbps(d.get("l3_read_bytes_total", 0), d.get("l3_read_seconds_total", 0.0)),
            },
        },
        "usage": {
            "device_pages": job.device_pages,
            "device_pages_used": after["device_full_pages_used"],
            "host_pages": job.host_pages,
            "host_pages_used": after["host_full_pages_used"],
            "device_evicted_pages": d.get("device_evicted_pages", 0),
            "host_evicted_pages": d.get("host_evicted_pages", 0),
            "backups_skipped": d.get("backups_skipped", 0),
            "l3_store": usage,
        },
        "per_turn": per_turn,
        "cache_counters": d,  # the cache-on pass's deltas of HiCache.stats()
        "host_headroom_s": sum(r.headroom_s for r in records),  # inside the cache-on TTFTs
        **timing_fields(tm),
        "config": {
            **config_fields(job, mc, tm["temp_store"]),
            "chunk_size": job.loop.chunk_size,
            "probe_clients": job.probe_clients,
        },
        "per_request": [r.row() for r in records],
    }
