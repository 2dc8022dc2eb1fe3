"""What the main job shows: ``results.json``, the PNG and the text table.

    results dict (``models.multiturn``) ──> write_outputs(results, records, out)
                                              ├── out/results.json   (strict JSON)
                                              └── out/multiturn.png  (TTFT per turn,
                                                  tier mix per turn; concurrent runs:
                                                  + throughput off vs on)
                                        ──> format_table(results)    (what the CLI prints)

``records`` are the sequential job's per-request records (``turn``, ``ttft_off_s``,
``ttft_on_s``); a concurrent run (``results["mode"] == "concurrent"``) is drawn from
its ``per_request`` rows. Nothing here runs the model or touches a cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

__all__ = ["format_table", "json_default", "write_outputs"]


def write_outputs(results: dict, records: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    png = out / "multiturn.png"
    if results.get("mode") == "concurrent":
        _plot_concurrent(results, png)
    else:
        _plot(results, records, png)
    results["files"] = {"results": str(out / "results.json"), "plot": str(png)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default) + "\n")


def json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _plot(results: dict, records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [p["turn"] for p in results["per_turn"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in records:
        a.scatter(r.turn - 0.08, r.ttft_off_s * 1e3, s=10, color="tab:gray", alpha=0.5)
        a.scatter(r.turn + 0.08, r.ttft_on_s * 1e3, s=10, color="tab:blue", alpha=0.5)
    a.plot(
        turns,
        [p["ttft_off_p50_ms"] for p in results["per_turn"]],
        "o-",
        color="tab:gray",
        label="cache off (p50)",
    )
    a.plot(
        turns,
        [p["ttft_on_p50_ms"] for p in results["per_turn"]],
        "o-",
        color="tab:blue",
        label="cache on (p50)",
    )
    a.set(xlabel="turn", ylabel="TTFT (ms)", title="TTFT per turn", xticks=turns)
    a.set_ylim(bottom=0)
    a.legend()
    _tier_bars(b, results)
    cfg = results["config"]
    ratio = results["ttft_ratio_later_turns"]
    fig.suptitle(
        f"jaxhicache bench multiturn: {cfg['preset']} model, {cfg['workload']['clients']} clients × "
        f"{cfg['workload']['turns']} turns"
        + ("" if ratio is None else f", later-turn TTFT ratio {ratio:.2f}")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------ table
def _l3(cfg: dict) -> str:
    """The L3 store, and its full-space pages per object when more than one."""
    if not cfg["store"]:
        return "none"
    g = cfg.get("l3_pages_per_object", 1)
    return cfg["store"] + (f" ({g} pages per object)" if g > 1 else "")


def _family(cfg: dict) -> str:
    return {"dsv4": "DSV4", "mla": "MLA + DSA", "hybrid": "recurrent hybrid"}.get(
        cfg.get("family", "dsv4"), cfg.get("family", "?")
    )


def _layers(cfg: dict) -> int:
    m = cfg["model"]  # DSV4 configs have one compress ratio per layer, the others num_layers
    return m["num_layers"] if "num_layers" in m else len(m["compress_ratios"])


def format_table(r: dict) -> str:
    """The human summary of a results dict (what the CLI prints)."""
    if r.get("mode") == "concurrent":
        return _concurrent_table(r)
    cfg = r["config"]
    w = cfg["workload"]
    t1, tl = r["ttft"]["turn1"], r["ttft"]["later_turns"]
    hit, pre, b, u = r["hit_tokens"], r["prefill_tokens"], r["bytes"], r["usage"]

    def gbps(x):
        return "-" if x.get("GBps") is None else f"{x['GBps']:.2f} GB/s"

    def f(x, spec: str) -> str:  # "-" for a figure the run has none of, same width
        if x is not None:
            return format(x, spec)
        align, width = re.match(r"([<>^]?)(\d*)", spec).groups()
        return format("-", align + width)

    def mb(n):
        return f"{n / 1e6:.2f} MB"

    total_hit = sum(hit.values())
    l3 = u["l3_store"]
    lines = [
        f"jaxhicache bench multiturn — {cfg['preset']} model ({_family(cfg)}, page "
        f"{cfg['page_size']}, {cfg['model']['hidden']} hidden, {_layers(cfg)} layers), "
        f"pp={cfg['pp']} tp={cfg['tp']}, {cfg['devices']}",
        f"workload: {w['clients']} clients × {w['turns']} turns, {w['system_prompts']} system prompt(s) "
        f"of {w['system_prompt_len']} tokens, user ~{w['user_tokens']}, answer ~{w['gen_tokens']} "
        f"(seed {w['seed']}); tiers: device {cfg['device_pages']} pages, host {cfg['host_pages']} "
        f"pages, L3 {_l3(cfg)}; {cfg['write_policy']}, prefetch {cfg['prefetch_policy']}",
        f"warm-up {r['warmup_s']:.1f} s (not timed below); cache off {r['cache_off_s']:.1f} s, "
        f"cache on {r['cache_on_s']:.1f} s; compilations in timed steps: {r['compiles_in_timed_steps']}",
        "",
        f"{'metric':<34}{'cache off':>14}{'cache on':>14}{'on/off':>10}",
        *(
            f"{name:<34}{f(t['off_p50_ms'], '>7.1f')}/{f(t['off_p90_ms'], '<6.1f')}"
            f"{f(t['on_p50_ms'], '>7.1f')}/{f(t['on_p90_ms'], '<6.1f')}{f(t['ratio_p50'], '>10.3f')}"
            for name, t in (
                ("TTFT turn 1 p50 / p90 (ms)", t1),
                ("TTFT turns >= 2 p50 / p90 (ms)", tl),
            )
        ),
        f"{'decode step p50 (ms)':<34}{f(r['decode_step_ms']['cache_off_p50'], '>14.2f')}"
        f"{f(r['decode_step_ms']['cache_on_p50'], '>14.2f')}{f(r['decode_step_ratio'], '>10.3f')}",
        f"{'prefill tokens computed':<34}{pre['cache_off']:>14,}{pre['cache_on']:>14,}"
        f"{pre['cache_on'] / pre['cache_off']:>10.3f}",
        f"{'hit tokens device / host / L3':<34}{'':>14}{hit['device']:>6,}/{hit['host']:,}/"
        f"{hit['storage']:,} ({total_hit:,})",
        f"{'L3 restore vs recompute (probe)':<34}"
        + (
            f"{'':>28}{r['l3_restore_vs_recompute']:>10.3f}"
            if r["l3_restore_vs_recompute"] is not None
            else "  no probe was served from L3"
            if cfg.get("l3", True)
            else "  no L3 tier for this model family"
        ),
        f"{'tokens equal to cache off':<34}{'':>14}{'yes' if r['tokens_match'] else 'NO':>14}"
        f"   (max |Δlogit| {r['max_step_logit_diff']:.1e})",
        "",
        f"moved (cache-on pass): D2H {mb(b['d2h']['bytes'])} ({gbps(b['d2h'])}), H2D "
        f"{mb(b['h2d']['bytes'])} (fused into prefill), L3 write {mb(b['l3_write']['bytes'])} "
        f"({gbps(b['l3_write'])}), L3 read {mb(b['l3_read']['bytes'])} ({gbps(b['l3_read'])})",
        f"usage at the end of the pass: device {u['device_pages_used']}/{u['device_pages']} pages, "
        f"host {u['host_pages_used']}/{u['host_pages']} pages (evicted: device "
        f"{u['device_evicted_pages']}, host {u['host_evicted_pages']}), L3 "
        + (f"{l3['objects']:,} objects, {mb(l3['bytes'])}" if l3 else "not listed"),
    ]
    for p in r["l3_probe"]:
        lines.append(
            f"  L3 probe client {p['client']}: {p['prompt_len']} tokens, {p['storage_tokens']} "
            f"from L3: {p['ttft_l3_ms']:.1f} ms vs recompute {p['ttft_recompute_ms']:.1f} ms "
            f"({p['ratio']:.3f})"
        )
    if r["mismatches"]:
        lines.append(f"MISMATCHED requests: {r['mismatches']}")
    if r.get("two_pass"):
        from models.multiturn_two_pass import two_pass_lines

        lines += two_pass_lines(r["two_pass"])
    return "\n".join(lines)


# ------------------------------------------------------------ concurrent run
def _tier_bars(ax, results: dict) -> None:
    turns = [p["turn"] for p in results["per_turn"]]
    bottom = np.zeros(len(turns))
    for key, label, color in (
        ("device_tokens", "device (L1)", "tab:green"),
        ("host_tokens", "host (L2)", "tab:orange"),
        ("storage_tokens", "storage (L3)", "tab:purple"),
        ("computed_tokens", "computed", "tab:gray"),
    ):
        v = np.array([p[key] for p in results["per_turn"]], float)
        ax.bar(turns, v, bottom=bottom, label=label, color=color)
        bottom += v
    ax.set(xlabel="turn", ylabel="prompt tokens (all clients)", xticks=turns)
    ax.set_title("where prompt tokens came from (cache on)")
    ax.legend()


def _plot_concurrent(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [p["turn"] for p in results["per_turn"]]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for row in results["per_request"]:
        a.scatter(row["turn"] - 0.08, row["ttft_off_ms"], s=10, color="tab:gray", alpha=0.5)
        a.scatter(row["turn"] + 0.08, row["ttft_on_ms"], s=10, color="tab:blue", alpha=0.5)
    for key, color, label in (
        ("ttft_off_p50_ms", "tab:gray", "cache off (p50)"),
        ("ttft_on_p50_ms", "tab:blue", "cache on (p50)"),
    ):
        a.plot(turns, [p[key] for p in results["per_turn"]], "o-", color=color, label=label)
    a.set(xlabel="turn", ylabel="TTFT (ms)", title="TTFT per turn", xticks=turns)
    a.set_ylim(bottom=0)
    a.legend()
    _tier_bars(b, results)
    thr = results["throughput"]
    names = ("cache_off", "cache_on")
    bars = c.bar(
        ["cache off", "cache on"],
        [thr[k]["tokens_per_s"] for k in names],
        color=["tab:gray", "tab:blue"],
    )
    for bar, k in zip(bars, names, strict=True):
        c.annotate(
            f"{thr[k]['tokens_per_s']:.0f} tok/s\n{thr[k]['requests_per_s']:.2f} req/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    c.set(ylabel="output tokens / s", title="throughput")
    c.set_ylim(0, 1.25 * max(thr[k]["tokens_per_s"] for k in names))
    cfg = results["config"]
    fig.suptitle(
        f"jaxhicache bench multiturn --concurrency {results['concurrency']}: {cfg['preset']} "
        f"model, {cfg['workload']['clients']} clients × {cfg['workload']['turns']} turns; "
        f"throughput on/off {results['throughput_ratio']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concurrent_table(r: dict) -> str:
    cfg, w = r["config"], r["config"]["workload"]
    thr, itl, hit, pre = r["throughput"], r["itl_ms"], r["hit_tokens"], r["prefill_tokens"]
    u, ret = r["usage"], r["retractions"]

    def f(x, spec: str) -> str:
        if x is not None:
            return format(x, spec)
        align, width = re.match(r"([<>^]?)(\d*)", spec).groups()
        return format("-", align + width)

    def pair(a, b):
        return f"{f(a, '>7.1f')}/{f(b, '<6.1f')}"

    off, on = thr["cache_off"], thr["cache_on"]
    lines = [
        f"jaxhicache bench multiturn --concurrency {r['concurrency']} — {cfg['preset']} model "
        f"({_family(cfg)}, page {cfg['page_size']}, {cfg['model']['hidden']} hidden, "
        f"{_layers(cfg)} layers), pp={cfg['pp']} tp={cfg['tp']}, "
        f"{cfg['devices']}; continuous-batching engine (chunk {cfg['chunk_size']}, "
        f"{cfg['prefill_tokens_per_step']} prefill tokens per step)",
        f"workload: {w['clients']} clients × {w['turns']} turns, {r['concurrency']} in flight, "
        f"think {r['think_ms']:g} ms; {w['system_prompts']} system prompt(s) of "
        f"{w['system_prompt_len']} tokens, user ~{w['user_tokens']}, answer ~{w['gen_tokens']} "
        f"(seed {w['seed']}); tiers: device {cfg['device_pages']} pages, host "
        f"{cfg['host_pages']} pages, L3 {_l3(cfg)}; {cfg['write_policy']}, prefetch "
        f"{cfg['prefetch_policy']}",
        f"warm-up {r['warmup_s']:.1f} s (not timed below); cache off {r['cache_off_s']:.1f} s, "
        f"cache on {r['cache_on_s']:.1f} s; compilations in timed steps: "
        f"{r['compiles_in_timed_steps']}",
        "",
        f"{'metric':<34}{'cache off':>14}{'cache on':>14}{'on/off':>10}",
        f"{'output tokens / s':<34}{off['tokens_per_s']:>14.1f}{on['tokens_per_s']:>14.1f}"
        f"{r['throughput_ratio']:>10.3f}",
        f"{'requests / s':<34}{off['requests_per_s']:>14.2f}{on['requests_per_s']:>14.2f}"
        f"{r['requests_ratio']:>10.3f}",
        *(
            f"{name:<34}{pair(t['off_p50_ms'], t['off_p90_ms'])}"
            f"{pair(t['on_p50_ms'], t['on_p90_ms'])}{f(t['ratio_p50'], '>10.3f')}"
            for name, t in (
                ("TTFT turn 1 p50 / p90 (ms)", r["ttft"]["turn1"]),
                ("TTFT turns >= 2 p50 / p90 (ms)", r["ttft"]["later_turns"]),
            )
        ),
        f"{'inter-token p50 / p90 (ms)':<34}{pair(itl['cache_off_p50'], itl['cache_off_p90'])}"
        f"{pair(itl['cache_on_p50'], itl['cache_on_p90'])}{f(itl['ratio_p50'], '>10.3f')}",
        f"{'prefill tokens computed':<34}{pre['cache_off']:>14,}{pre['cache_on']:>14,}"
        f"{pre['cache_on'] / pre['cache_off']:>10.3f}",
        f"{'hit tokens device / host / L3':<34}{'':>14}{hit['device']:>6,}/{hit['host']:,}/"
        f"{hit['storage']:,} ({sum(hit.values()):,})",
        f"{'retractions':<34}{ret['cache_off']:>14}{ret['cache_on']:>14}",
        f"{'tokens equal to cache off':<34}{'':>14}{'yes' if r['tokens_match'] else 'NO':>14}",
        "",
        f"usage at the end of the pass: device {u['device_pages_used']}/{u['device_pages']} pages, "
        f"host {u['host_pages_used']}/{u['host_pages']} pages (evicted: device "
        f"{u['device_evicted_pages']}, host {u['host_evicted_pages']}); engine steps "
        f"{r['engine_steps']['cache_off']} off / {r['engine_steps']['cache_on']} on",
    ]
    if r["mismatches"]:
        lines.append(f"MISMATCHED requests: {r['mismatches']}")
    return "\n".join(lines)
