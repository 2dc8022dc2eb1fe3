"""The concurrent main job's figures: the two passes' served turns → the results dict.

``off`` and ``on`` map ``(client, turn)`` to :class:`~models.multiturn_concurrent.Served`
(prompt, ready time, the engine's ``Completion``). Throughput is output tokens (and
requests) over a pass's wall time; TTFT runs from a turn's ready time to its first
token; inter-token latencies are pooled over every request of a pass. Nothing here
runs the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import numpy as np

from models.multiturn_report import json_default
from models.multiturn_results import config_fields, percentile, timing_fields, ttft_block

__all__ = ["concurrent_results", "concurrent_summary"]


def _ttft_block(off: list, on: list) -> dict:
    return ttft_block([s.ttft_s * 1e3 for s in off], [s.ttft_s * 1e3 for s in on])


def _throughput(served: dict, seconds: float) -> dict:
    tokens = sum(int(s.completion.generated.size) for s in served.values())
    return {
        "output_tokens": tokens,
        "requests": len(served),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "requests_per_s": len(served) / seconds,
    }


def _itl_ms(served: dict) -> np.ndarray:
    parts = [s.completion.itl_s for s in served.values()]
    return np.concatenate(parts) * 1e3 if parts else np.zeros(0)


def _mismatches(off: dict, on: dict) -> list[dict]:
    out = []
    for key in sorted(off):
        a, b = on[key].completion.generated, off[key].completion.generated
        if not np.array_equal(a, b):
            n = min(a.size, b.size)
            diff = np.flatnonzero(a[:n] != b[:n])
            step = int(diff[0]) if diff.size else n
            out.append({"client": key[0], "turn": key[1], "first_step": step})
    return out


def _row(off, on, t_off: float, t_on: float) -> dict:
    """One turn, both passes; ready / end times in ms from each pass's start."""
    a, b = off.completion, on.completion
    return {
        "client": off.client,
        "turn": off.turn,
        "prompt_len": int(off.prompt.size),
        "gen_len": int(a.generated.size),
        "ttft_off_ms": off.ttft_s * 1e3,
        "ttft_on_ms": on.ttft_s * 1e3,
        "itl_off_p50_ms": percentile(a.itl_s * 1e3, 50),
        "itl_on_p50_ms": percentile(b.itl_s * 1e3, 50),
        "device_tokens": b.device_cached_tokens,
        "host_tokens": b.host_cached_tokens,
        "storage_tokens": b.storage_cached_tokens,
        "prefill_tokens_off": a.prefill_tokens,
        "prefill_tokens_on": b.prefill_tokens,
        "retractions_off": a.retractions,
        "retractions_on": b.retractions,
        "tokens_match": bool(np.array_equal(a.generated, b.generated)),
        "ready_off_ms": (off.ready_s - t_off) * 1e3,
        "end_off_ms": (a.end_s - t_off) * 1e3,
        "ready_on_ms": (on.ready_s - t_on) * 1e3,
        "end_on_ms": (b.end_s - t_on) * 1e3,
    }


def concurrent_results(job, off: dict, on: dict, before, after, usage, **tm) -> dict:
    """The results dict of one concurrent run (``job``: a ``ConcurrentJob``)."""
    c = job.config
    d = {
        k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before
    }
    keys = sorted(off)
    comp = [on[k].completion for k in keys]
    hit = {
        "device": sum(x.device_cached_tokens for x in comp),
        "host": sum(x.host_cached_tokens for x in comp),
        "storage": sum(x.storage_cached_tokens for x in comp),
    }
    thr_off, thr_on = _throughput(off, tm["off_s"]), _throughput(on, tm["on_s"])
    itl_off, itl_on = _itl_ms(off), _itl_ms(on)
    later = _ttft_block([off[k] for k in keys if k[1] >= 2], [on[k] for k in keys if k[1] >= 2])
    bad = _mismatches(off, on)
    per_turn = []
    for t in range(1, c.workload.turns + 1):
        rs = [on[k].completion for k in keys if k[1] == t]
        per_turn.append(
            {
                "turn": t,
                "ttft_off_p50_ms": percentile([off[k].ttft_s * 1e3 for k in keys if k[1] == t], 50),
                "ttft_on_p50_ms": percentile([on[k].ttft_s * 1e3 for k in keys if k[1] == t], 50),
                "device_tokens": sum(x.device_cached_tokens for x in rs),
                "host_tokens": sum(x.host_cached_tokens for x in rs),
                "storage_tokens": sum(x.storage_cached_tokens for x in rs),
                "computed_tokens": sum(x.prefill_tokens for x in rs),
            }
        )
    r_off, r_on = tm["retractions"]
    t_off = min(s.ready_s for s in off.values())
    t_on = min(s.ready_s for s in on.values())
    return {
        "job": "multiturn",
        "mode": "concurrent",
        "date": datetime.date.today().isoformat(),
        "requests": len(keys),
        "concurrency": job.concurrency,
        "think_ms": c.think_ms,
        "throughput_ratio": thr_on["tokens_per_s"] / thr_off["tokens_per_s"],
        "requests_ratio": thr_on["requests_per_s"] / thr_off["requests_per_s"],
        "throughput": {"cache_off": thr_off, "cache_on": thr_on},
        "ttft_ratio_later_turns": later["ratio_p50"],
        "ttft": {
            "turn1": _ttft_block(
                [off[k] for k in keys if k[1] == 1], [on[k] for k in keys if k[1] == 1]
            ),
            "later_turns": later,
        },
        "itl_ms": {
            "cache_off_p50": percentile(itl_off, 50),
            "cache_off_p90": percentile(itl_off, 90),
            "cache_on_p50": percentile(itl_on, 50),
            "cache_on_p90": percentile(itl_on, 90),
            "ratio_p50": (
                percentile(itl_on, 50) / percentile(itl_off, 50) if itl_off.size else None
            ),
        },
        "hit_tokens": hit,
        "prefill_tokens": {
            "cache_on": sum(x.prefill_tokens for x in comp),
            "cache_off": sum(off[k].completion.prefill_tokens for k in keys),
        },
        "retractions": {"cache_off": r_off, "cache_on": r_on},
        "tokens_match": not bad,
        "mismatches": bad,
        "usage": {
            "device_pages": job.device_pages,
            "device_pages_used": after["device_full_pages_used"],
            "host_pages": job.host_pages,
            "host_pages_used": after["host_full_pages_used"],
            "device_evicted_pages": d.get("device_evicted_pages", 0),
            "host_evicted_pages": d.get("host_evicted_pages", 0),
            "l3_write_bytes": d.get("l3_write_bytes_total", 0),
            "l3_read_bytes": d.get("l3_read_bytes_total", 0),
            "l3_store": usage,
        },
        "per_turn": per_turn,
        "cache_counters": d,
        "engine_steps": {"cache_off": tm["steps"][0], "cache_on": tm["steps"][1]},
        **timing_fields(tm),
        "config": {
            **config_fields(job, job.mcfg, tm["temp_store"]),
            "concurrency": job.concurrency,
            "think_ms": c.think_ms,
            "engine": dataclasses.asdict(job.on.config),
            "chunk_size": job.on.chunk,
            "prefill_tokens_per_step": job.on.budget,
        },
        "per_request": [_row(off[k], on[k], t_off, t_on) for k in keys],
    }


def concurrent_summary(results: dict) -> dict:
    """The one-line JSON of a concurrent run (the headline figures)."""
    r = results
    out = {
        "bench": "multiturn",
        "mode": "concurrent",
        "concurrency": r["concurrency"],
        "throughput_ratio": r["throughput_ratio"],
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in r["throughput"].items()},
        "ttft_ratio_later_turns": r["ttft_ratio_later_turns"],
        "ttft_turn1_ratio": r["ttft"]["turn1"]["ratio_p50"],
        "itl_ratio": r["itl_ms"]["ratio_p50"],
        "hit_tokens": r["hit_tokens"],
        "retractions": r["retractions"],
        "tokens_match": r["tokens_match"],
        "warmup_s": r["warmup_s"],
        "wall_s": r["wall_s"],
        "compiles_in_timed_steps": r["compiles_in_timed_steps"],
        "preset": r["config"]["preset"],
    }
    return json.loads(
        json.dumps(out, default=json_default), parse_float=lambda x: round(float(x), 4)
    )
