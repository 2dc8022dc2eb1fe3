"""``--two-pass``: the main job's traffic served again from L3 alone.

The project's stand-in for the reference system's nightly "answer, flush device and
host, answer again from L3, accuracy must not drop" test, stricter: the tokens must
be identical. After the cache-on pass (pass 1)::

    HiCache.flush(pools)     every backup and L3 write lands, then device and host
       │                     are emptied (L3 kept); what it dropped is recorded
    pass 2                   the same prompts, in the same order, through the same
       │                     serving path as pass 1 (nothing else changes)
    ──> results["two_pass"]  hits per tier, the L3 hit fraction of the reusable
                             tokens, TTFT vs cache off, tokens vs cache off

Definitions (per request ``i`` of pass 2, hit unit ``P``: the page size, or for a
recurrent hybrid its snapshot grid ``state_interval``, since a hit ends on a snapshot):

- **reusable tokens** ``R_i``: the whole units of ``prompt_i[:-1]`` (the part a hit
  can cover: the last prompt token is always computed, hits are whole units) that
  pass 1 inserted into the cache, ``min(P * floor((len_i - 1) / P), P *
  floor(inserted_i / P))`` with ``inserted_i`` pass 1's page-aligned inserted tokens
  of the same prompt (always covering ``P * floor((len_i - 1) / P)``: pass 1 served
  that prompt, and a hybrid's prefill snapshots the last grid point before its end);
- **recomputed reusable tokens**: ``max(0, R_i - cached_i)``, reusable tokens pass 2
  computed instead of being served by any tier;
- **L3 hit fraction** ``= storage / (storage + recomputed reusable)``, summed over
  requests: of the reusable tokens that device and host did not serve, the share
  L3 served. 1.0 exactly when no reusable token was recomputed. (Not ``storage /
  reusable``: pass 2 refills device and host as it goes, from L3 and from its own
  answers, and a later request's prefix is rightly a device or host hit there;
  ``l3_share_of_reusable`` reports that plain share.)

Below 1.0 means a reusable page was not served from L3: it never reached storage
(``write_through_selective`` backs up a page only on its second hit; a failed
write), the prefetch did not land in time (``timeout`` / ``best_effort``), or the
L3 cost model judged recomputing it cheaper than loading it.

Nothing here is specific to one model family: the job hands over per-request
figures; the flush is the cache's public call.
"""

from __future__ import annotations

import re

import numpy as np

from models.multiturn_results import mismatches, ttft_block

__all__ = [
    "check_two_pass",
    "reusable_tokens",
    "two_pass_lines",
    "two_pass_results",
    "two_pass_summary",
]


def check_two_pass(cache) -> None:
    """``ValueError`` unless ``cache`` writes its pages on to an L3 store (pass 2 has
    nowhere else to be served from)."""
    l3 = getattr(cache, "l3", None)
    if l3 is None:
        raise ValueError("--two-pass needs an L3 store: this cache has no storage tier")
    if not l3.config.backup:
        raise ValueError(
            "--two-pass needs an L3 store that is written: StorageConfig.backup is off"
        )


def reusable_tokens(prompt_len: int, unit: int, inserted: int) -> int:
    """``R_i`` (module docstring): whole hit units (pages, or a hybrid's snapshot grid)
    of ``prompt[:-1]`` that pass 1 inserted."""
    return min((prompt_len - 1) // unit * unit, inserted // unit * unit)


def _ms(xs) -> list[float]:
    return [x * 1e3 for x in xs]


def two_pass_results(records1, records2, unit: int, *, flushed: dict, flush_s: float, on_s: float):
    """``results["two_pass"]`` from the two passes' records (``RequestRecord``: the
    cache-off report as ``off``, that pass's cache-on report as ``on``), in schedule
    order; ``unit``: a hit's granularity (the page size, or a hybrid's snapshot grid)."""
    rows, reusable, recomputed = [], 0, 0
    for a, b in zip(records1, records2, strict=True):
        r = reusable_tokens(b.prompt_len, unit, a.on.inserted_tokens)
        lost = max(0, r - b.on.cached_tokens)
        reusable += r
        recomputed += lost
        rows.append(
            {
                "index": b.index,
                "client": b.client,
                "turn": b.turn,
                "prompt_len": b.prompt_len,
                "reusable_tokens": r,
                "device_tokens": b.on.device_cached_tokens,
                "host_tokens": b.on.host_cached_tokens,
                "storage_tokens": b.on.storage_cached_tokens,
                "recomputed_reusable_tokens": lost,
                "ttft_on_ms": b.ttft_on_s * 1e3,
                "tokens_match": bool(np.array_equal(b.on.generated, b.off.generated)),
            }
        )
    hit = {
        "device": sum(b.on.device_cached_tokens for b in records2),
        "host": sum(b.on.host_cached_tokens for b in records2),
        "storage": sum(b.on.storage_cached_tokens for b in records2),
    }
    served_l3 = hit["storage"] + recomputed

    def block(sel):
        rs = [r for r in records2 if sel(r)]
        return ttft_block(_ms(r.ttft_off_s for r in rs), _ms(r.ttft_on_s for r in rs))

    later = block(lambda r: r.turn >= 2)
    bad1, bad2 = mismatches(records1), mismatches(records2)
    return {
        "requests": len(records2),
        "hit_unit": unit,
        "reusable_tokens": reusable,
        "hit_tokens": hit,
        "recomputed_reusable_tokens": recomputed,
        "l3_hit_fraction": hit["storage"] / served_l3 if served_l3 else None,
        "l3_share_of_reusable": hit["storage"] / reusable if reusable else None,
        "prefill_tokens": sum(b.on.prefill_tokens for b in records2),
        "ttft": {"turn1": block(lambda r: r.turn == 1), "later_turns": later},
        "ttft_ratio_later_turns": later["ratio_p50"],
        "tokens_match": not bad1 and not bad2,
        "tokens_match_second_pass": not bad2,
        "mismatches": bad2,
        "max_step_logit_diff": max(
            float(np.abs(b.on.step_logits - b.off.step_logits).max()) for b in records2
        ),
        "flushed": flushed,
        "flush_s": flush_s,
        "cache_on_s": on_s,
        "host_headroom_s": sum(b.headroom_s for b in records2),
        "per_request": rows,
    }


def two_pass_summary(results: dict) -> dict:
    """The headline two-pass figures for the one-line JSON (empty without the pass)."""
    t = results.get("two_pass")
    if not t:
        return {}
    return {
        "two_pass_l3_hit_fraction": t["l3_hit_fraction"],
        "two_pass_ttft_ratio_later_turns": t["ttft_ratio_later_turns"],
        "two_pass_tokens_match": t["tokens_match"],
    }


def _f(x, spec: str) -> str:
    if x is not None:
        return format(x, spec)
    align, width = re.match(r"([<>^]?)(\d*)", spec).groups()
    return format("-", align + width)


def two_pass_lines(t: dict) -> list[str]:
    """The table's two-pass lines (the same columns as the pass-1 lines above them)."""
    fl = t["flushed"]
    lines = [
        "",
        f"second pass (--two-pass): device and host flushed ({fl['device_full_pages']} device, "
        f"{fl['host_full_pages']} host pages dropped; {fl['l3_written_objects']} L3 objects "
        f"written while waiting, {t['flush_s']:.2f} s), the same traffic again "
        f"({t['cache_on_s']:.1f} s)",
    ]
    for name, b in (
        ("2nd pass TTFT turn 1 p50/p90 (ms)", t["ttft"]["turn1"]),
        ("2nd pass TTFT turns >= 2 p50/p90", t["ttft"]["later_turns"]),
    ):
        lines.append(
            f"{name:<34}{_f(b['off_p50_ms'], '>7.1f')}/{_f(b['off_p90_ms'], '<6.1f')}"
            f"{_f(b['on_p50_ms'], '>7.1f')}/{_f(b['on_p90_ms'], '<6.1f')}"
            f"{_f(b['ratio_p50'], '>10.3f')}"
        )
    hit = t["hit_tokens"]
    lines += [
        f"{'2nd pass hit tokens dev/host/L3':<34}{'':>14}{hit['device']:>6,}/{hit['host']:,}/"
        f"{hit['storage']:,} ({sum(hit.values()):,})",
        f"{'2nd pass L3 hit fraction':<34}{'':>14}{_f(t['l3_hit_fraction'], '>14.3f')}"
        f"   (reusable {t['reusable_tokens']:,}, recomputed {t['recomputed_reusable_tokens']:,})",
        f"{'both passes equal cache off':<34}{'':>14}{'yes' if t['tokens_match'] else 'NO':>14}"
        f"   (2nd pass max |Δlogit| {t['max_step_logit_diff']:.1e})",
    ]
    if t["mismatches"]:
        lines.append(f"2nd pass MISMATCHED requests: {t['mismatches']}")
    return lines
