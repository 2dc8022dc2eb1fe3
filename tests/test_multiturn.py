"""The main job (``jaxhicache bench multiturn``) end to end on each model family's
tiny preset, its workload generator, and ``jaxhicache storage`` on the store the job
wrote.

One job run per family (module fixture ``job``, parametrized: ``tiny`` (DSV4),
``mla-tiny``, ``hybrid-tiny``): PP 2, 3 clients × 3 turns with 11 device and 14 host
pages, which forces device and host eviction, so every tier serves hits; with
``--two-pass`` (device and host flushed, the same traffic again from L3) wherever the
family's cache has an L3 tier (``ModelPreset.l3_refusal``: every family now; the
hybrid's recurrent-state snapshots go to L3 too, and its hits are counted in
snapshot-grid units). Each run's fixture setup, cold compile cache, 2 shared cores:
about 29 s (dsv4, the first, with JAX's start-up), 18 s (mla), 12 s (hybrid).
"""

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, PrefetchPolicy, WritePolicy
from jaxhicache.cli import main
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.storage import FileBackend, LatencyBackend
from models.multiturn import (
    ModelPreset,
    MultiturnConfig,
    check,
    format_table,
    run_multiturn,
    summary,
)
from models.multiturn_config import job_store
from models.multiturn_presets import Family
from models.multiturn_results import RequestRecord, mismatches
from models.multiturn_two_pass import check_two_pass, two_pass_results
from models.serving import RequestReport
from models.workload import Transcript, Workload, WorkloadConfig

DEVICE_PAGES, HOST_PAGES = 11, 14
SPEC_MINI = ModelCacheSpec.tiny_dsv4()


def _no_nan(name):
    raise ValueError(f"results.json holds {name}: not strict JSON")


FAMILY_PRESETS = {
    "dsv4": ModelPreset.TINY,
    "mla": ModelPreset.MLA_TINY,
    "hybrid": ModelPreset.HYBRID_TINY,
}


@pytest.fixture(scope="module", params=list(FAMILY_PRESETS))
def job(request, tmp_path_factory):
    """``--quick`` on the family's tiny preset; ``--store`` and ``--two-pass`` where
    its cache has an L3 tier, every L3 hit served (the cost model's timing-based
    choices are pinned in tests/test_l3_latency.py; here what is served is pinned)."""
    preset = FAMILY_PRESETS[request.param]
    root = tmp_path_factory.mktemp(f"multiturn-{request.param}")
    out, store = root / "out", root / "store"
    l3 = preset.l3_refusal is None
    argv = [
        "bench", "multiturn", "--model", preset.value, "--pp", "2", "--quick",
        "--device-pages", str(DEVICE_PAGES), "--host-pages", str(HOST_PAGES),
        "--prefetch-policy", "wait_complete", "--out", str(out), "--no-progress",
    ] + (["--store", str(store), "--two-pass", "--no-l3-cost-model"] if l3 else [])  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, stderr.getvalue()
    results = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    return {
        "family": request.param, "preset": preset, "l3": l3, "out": out,
        "store": store if l3 else None, "stdout": stdout.getvalue(), "results": results,
    }  # fmt: skip


def _needs_l3(job):
    if not job["l3"]:
        pytest.skip(f"{job['preset'].value}: {job['preset'].l3_refusal}")


def test_results_json_headline_figures(job):
    r = job["results"]
    for key in (
        "ttft_ratio_later_turns", "decode_step_ratio", "hit_tokens", "prefill_tokens",
        "l3_restore_vs_recompute", "warmup_s", "config", "tokens_match", "ttft", "bytes",
        "usage", "per_turn", "per_request",
    ):  # fmt: skip
        assert key in r, key
    hit = r["hit_tokens"]
    assert hit["device"] > 0 and hit["host"] > 0, hit
    assert (hit["storage"] > 0) is job["l3"], hit  # no L3 tier: nothing from it
    assert r["usage"]["device_evicted_pages"] > 0 and r["usage"]["host_evicted_pages"] > 0
    pre = r["prefill_tokens"]
    assert pre["cache_on"] < pre["cache_off"]
    # every prompt token is computed or a hit (page-aligned prefix of prompt[:-1])
    assert pre["cache_on"] + sum(hit.values()) == pre["cache_off"]
    assert r["tokens_match"] is True and r["mismatches"] == []
    assert r["max_step_logit_diff"] < 1e-4
    assert 0 < r["ttft_ratio_later_turns"] < 10 and 0 < r["decode_step_ratio"] < 10
    assert r["warmup_s"] > 0 and r["compiles_in_timed_steps"] == 0
    assert r["requests"] == 9 and len(r["per_request"]) == 9
    assert [p["turn"] for p in r["per_turn"]] == [1, 2, 3]


def test_results_json_records_the_exact_configuration(job):
    c = job["results"]["config"]
    assert c["preset"] == job["preset"].value and c["pp"] == 2 and c["tp"] == 1
    assert c["family"] == job["family"] and c["l3"] is job["l3"]
    assert (c["device_pages"], c["host_pages"]) == (DEVICE_PAGES, HOST_PAGES)
    assert c["write_policy"] == "write_through" and c["prefetch_policy"] == "wait_complete"
    assert c["l3_cost_model"] is not job["l3"]  # turned off where there is an L3 tier
    assert c["store"] == (str(job["store"]) if job["l3"] else None)
    if job["family"] == "hybrid":  # the preset's cache knob: snapshots every 2 pages
        assert c["state_interval"] == 2 * c["page_size"]
    assert c["workload"]["clients"] == 3 and c["workload"]["turns"] == 3
    assert c["model"]["page_size"] == 16 and len(c["workload_digest"]) == 64


def test_l3_probe_is_served_from_storage_only(job):
    r = job["results"]
    probes = r["l3_probe"]
    if not job["l3"]:  # no L3 tier: no probe, and the table says why
        assert probes == [] and r["l3_restore_vs_recompute"] is None
        assert "no L3 tier for this model family" in job["stdout"]
        return
    assert len(probes) == 3
    for p in probes:
        assert p["storage_tokens"] > 0 and p["device_tokens"] == p["host_tokens"] == 0, p
        assert p["tokens_match"] and p["ttft_l3_ms"] > 0 and p["ttft_recompute_ms"] > 0
    assert r["l3_restore_vs_recompute"] == pytest.approx(np.median([p["ratio"] for p in probes]))


def test_table_and_json_line(job):
    lines = job["stdout"].strip().splitlines()
    text = "\n".join(lines)
    for needle in (
        "TTFT turn 1 p50 / p90", "TTFT turns >= 2 p50 / p90", "decode step p50",
        "prefill tokens computed", "hit tokens device / host / L3", "L3 restore vs recompute",
        "tokens equal to cache off", "D2H", "L3 write", "host", "warm-up",
    ):  # fmt: skip
        assert needle in text, needle
    last = json.loads(lines[-1])
    assert last == summary(job["results"])
    assert last["bench"] == "multiturn" and last["tokens_match"] is True


def test_two_pass_serves_every_reusable_prefix_from_l3(job):
    """After the flush every reusable token (whole pages of ``prompt[:-1]``, all of
    them inserted by pass 1) is served by some tier, and what device and host did not
    hold came from L3: none is recomputed, so the L3 hit fraction is exactly 1 (every
    page pass 1 inserted was written through to L3; the fixture serves every hit)."""
    _needs_l3(job)
    r = job["results"]
    t = r["two_pass"]
    assert r["config"]["two_pass"] is True and t["requests"] == 9
    rows = t["per_request"]
    unit = t["hit_unit"]  # a hit's granularity: the page, or a hybrid's snapshot grid
    assert unit == r["config"].get("state_interval", r["config"]["page_size"])
    assert [x["prompt_len"] for x in rows] == [x["prompt_len"] for x in r["per_request"]]
    for x in rows:
        assert x["reusable_tokens"] == (x["prompt_len"] - 1) // unit * unit, x
        assert x["device_tokens"] + x["host_tokens"] + x["storage_tokens"] == x["reusable_tokens"]
        assert x["recomputed_reusable_tokens"] == 0 and x["tokens_match"], x
    # the first request after the flush: nothing on device or host, all of it from L3
    assert rows[0]["device_tokens"] == rows[0]["host_tokens"] == 0 < rows[0]["storage_tokens"]
    hit = t["hit_tokens"]
    assert t["reusable_tokens"] == sum(x["reusable_tokens"] for x in rows) == sum(hit.values())
    assert t["recomputed_reusable_tokens"] == 0 and t["l3_hit_fraction"] == 1.0
    assert t["l3_share_of_reusable"] == pytest.approx(hit["storage"] / t["reusable_tokens"])
    assert t["prefill_tokens"] == r["prefill_tokens"]["cache_off"] - t["reusable_tokens"]
    assert t["tokens_match"] is True and t["tokens_match_second_pass"] is True
    assert t["mismatches"] == [] and t["max_step_logit_diff"] < 1e-4
    fl = t["flushed"]  # what the flush dropped: the tiers were in use
    assert 0 < fl["device_full_pages"] <= DEVICE_PAGES and 0 < fl["host_full_pages"] <= HOST_PAGES
    for block in ("turn1", "later_turns"):
        b = t["ttft"][block]
        assert b["requests"] == (3 if block == "turn1" else 6)
        assert (
            b["ratio_p50"] == pytest.approx(b["on_p50_ms"] / b["off_p50_ms"]) and b["ratio_p50"] > 0
        )
        assert b["off_p50_ms"] == r["ttft"][block]["off_p50_ms"]  # the same cache-off pass
    assert t["ttft_ratio_later_turns"] == t["ttft"]["later_turns"]["ratio_p50"]
    assert r["compiles_in_timed_steps"] == 0  # the warm-up ran the second pass too
    text = job["stdout"]
    for needle in (
        "second pass (--two-pass)", "2nd pass TTFT turn 1", "2nd pass TTFT turns >= 2",
        "2nd pass hit tokens dev/host/L3", "2nd pass L3 hit fraction", "both passes equal cache off",
    ):  # fmt: skip
        assert needle in text, needle
    last = json.loads(text.strip().splitlines()[-1])
    assert last["two_pass_l3_hit_fraction"] == 1.0 and last["two_pass_tokens_match"] is True
    assert last["two_pass_ttft_ratio_later_turns"] == round(t["ttft_ratio_later_turns"], 4)


def test_a_family_without_l3_refuses_its_flags(capsys, monkeypatch):
    """Every family has an L3 tier today; a preset whose cache had none
    (``ModelPreset.l3_refusal``, patched here) refuses ``--store`` and ``--two-pass``
    up front, naming the reason."""
    import models.multiturn_presets as presets

    assert all(p.l3_refusal is None for p in ModelPreset)
    monkeypatch.setitem(presets._L3_REFUSAL, Family.HYBRID, "no snapshots in L3 (a test)")
    for preset in (ModelPreset.HYBRID, ModelPreset.HYBRID_TINY):
        assert "snapshots" in preset.l3_refusal
        with pytest.raises(ValueError, match=f"--two-pass on the {preset.value} model: "):
            MultiturnConfig(preset=preset, two_pass=True)
        with pytest.raises(ValueError, match="--store and --two-pass on the"):
            MultiturnConfig(preset=preset, store="/some/dir", two_pass=True)
        code = main(
            ["bench", "multiturn", "--model", preset.value, "--store", "/x", "--no-progress"]
        )
        err = capsys.readouterr().err
        assert (
            code != 0 and f"--store on the {preset.value} model" in err and "\n" not in err.strip()
        )


def test_presets_build_every_family():
    """Each preset's config, its model's spec and cache knobs (no compilation)."""
    from jaxhicache.cache import HiCacheConfig

    for preset in ModelPreset:
        cfg = preset.model_config()
        assert preset.workload().vocab <= cfg.vocab
        assert preset.model_name == f"tiny-{preset.family.value}-{preset.size}"
        grid = HiCacheConfig(device_pages=8, **preset.cache_fields()).state_grid(cfg.cache_spec())
        assert (grid > 0) is (preset.family is Family.HYBRID)
        assert grid % cfg.page_size == 0
    assert {p.family for p in ModelPreset} == set(Family)
    assert [p.value for p in ModelPreset if p.is_tiny] == ["tiny", "mla-tiny", "hybrid-tiny"]


def test_two_pass_refusals():
    with pytest.raises(ValueError, match="sequential job only, not with --concurrency 2"):
        MultiturnConfig(preset=ModelPreset.TINY, concurrency=2, two_pass=True)
    with pytest.raises(ValueError, match="two_pass must be a bool"):
        MultiturnConfig(preset=ModelPreset.TINY, two_pass="yes")
    cache = HiCache(SPEC_MINI, make_mesh(1, 1), HiCacheConfig(device_pages=4))
    with pytest.raises(ValueError, match="needs an L3 store: this cache has no storage tier"):
        check_two_pass(cache)
    cache.close()


def test_plot_written(job):
    png = job["out"] / "multiturn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 800
    assert img.std() > 0.05  # not a blank canvas


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    return out, json.loads(out.strip().splitlines()[-1])


def test_storage_ls_stats_clear_on_the_jobs_store(job, tmp_path, capsys):
    _needs_l3(job)
    store = tmp_path / "store"
    shutil.copytree(job["store"], store)
    s = str(store)
    text, ls = _run(["storage", "ls", "--store", s], capsys)
    assert ls["objects"] == job["results"]["usage"]["l3_store"]["objects"] > 0
    models = {g["model"] for g in ls["groups"]}
    assert len(models) == 1 and models.pop().startswith(f"{job['preset'].model_name}-w0/run-")
    # per family: its page spaces (MLA: full pages only; the hybrid: full K/V pages and
    # one state object per snapshot) and its layers split over the 2 PP stages
    units, layers = {
        "dsv4": ({"full", "swa"}, {"0-2", "2-4"}),
        "mla": ({"full"}, {"0-2", "2-4"}),
        "hybrid": ({"full", "state"}, {"0-4", "4-8"}),
    }[job["family"]]
    assert {g["unit"] for g in ls["groups"]} == units
    assert {g["layers"] for g in ls["groups"]} == layers  # one namespace per PP stage
    assert sum(g["objects"] for g in ls["groups"]) == ls["objects"]
    assert all(u in text for u in units)
    keys_text, _ = _run(["storage", "ls", "--store", s, "--keys"], capsys)
    assert keys_text.count("jaxhicache/v2/") == ls["objects"]

    _text, st = _run(["storage", "stats", "--store", s, "--verify", "--json"], capsys)
    assert st["objects"] == ls["objects"] and st["bytes"] == ls["bytes"]
    assert st["verify"] == {"checked": ls["objects"], "ok": ls["objects"], "failed": {}}
    # the same store through a tensorstore kvstore spec
    spec = json.dumps({"driver": "file", "path": s})
    _text, st_ts = _run(["storage", "stats", "--store", spec, "--json"], capsys)
    assert (st_ts["objects"], st_ts["bytes"]) == (st["objects"], st["bytes"])

    # a flipped byte is found by --verify
    victim = next(p for p in sorted(store.rglob("*")) if p.is_file())
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF
    victim.write_bytes(bytes(blob))
    _text, bad = _run(["storage", "stats", "--store", s, "--verify", "--json"], capsys)
    assert bad["verify"]["failed"] == {"checksum_mismatch": 1}

    _text, cleared = _run(["storage", "clear", "--store", s], capsys)
    assert cleared["deleted_objects"] == ls["objects"] and cleared["objects_left"] == 0
    _text, empty = _run(["storage", "ls", "--store", s, "--json"], capsys)
    assert empty["objects"] == 0 and empty["groups"] == []


def _report(generated, ttft=0.01):
    g = np.asarray(generated, np.int32)
    return RequestReport(
        prompt_len=10, cached_tokens=0, device_cached_tokens=0, host_cached_tokens=0,
        storage_cached_tokens=0, prefill_tokens=10, generated=g, ttft_s=ttft,
        decode_s=0.001 * max(g.size - 1, 0), total_s=ttft + 0.001 * max(g.size - 1, 0), loaded_pages=0, inserted_tokens=0,
        used_cache=False, full_page_ids=np.zeros(1, np.int32), swa_page_ids=np.zeros(1, np.int32),
        prefill_logits=np.zeros((1, 4)), step_logits=np.zeros((g.size, 4)),
    )  # fmt: skip


def test_mismatched_tokens_are_reported():
    same = RequestRecord(0, 0, 1, 10, 3, _report([1, 2, 3]), _report([1, 2, 3]), 0.0)
    differ = RequestRecord(1, 1, 2, 10, 3, _report([1, 2, 3]), _report([1, 5, 3]), 0.0)
    assert same.row()["tokens_match"] and not differ.row()["tokens_match"]
    assert mismatches([same, differ]) == [{"index": 1, "client": 1, "turn": 2, "first_step": 1}]


def test_two_pass_figures_count_recomputed_and_mismatched_tokens():
    """Page 4, prompts of 10 and 20 tokens (reusable: 8 and 16). Pass 2 serves the
    first from L3 alone, the second 8 from device and only 4 of the other 8 from L3
    (4 recomputed) with another answer: fraction 12 / 16, and the mismatch named."""

    def on(gen, prompt_len, device, storage, inserted):
        return dataclasses.replace(
            _report(gen), prompt_len=prompt_len, cached_tokens=device + storage,
            device_cached_tokens=device, storage_cached_tokens=storage,
            prefill_tokens=prompt_len - device - storage, inserted_tokens=inserted,
        )  # fmt: skip

    off = [_report([1, 2]), _report([3, 4], ttft=0.02)]
    first = [
        RequestRecord(0, 0, 1, 10, 2, off[0], on([1, 2], 10, 0, 0, 11), 0.0),
        RequestRecord(1, 0, 2, 20, 2, off[1], on([3, 4], 20, 8, 0, 21), 0.0),
    ]
    second = [
        RequestRecord(0, 0, 1, 10, 2, off[0], on([1, 2], 10, 0, 8, 11), 0.0),
        RequestRecord(1, 0, 2, 20, 2, off[1], on([3, 9], 20, 8, 4, 21), 0.0),
    ]
    t = two_pass_results(first, second, 4, flushed={}, flush_s=0.0, on_s=1.0)
    assert t["reusable_tokens"] == 8 + 16 and t["recomputed_reusable_tokens"] == 4
    assert t["hit_tokens"] == {"device": 8, "host": 0, "storage": 12}
    assert t["l3_hit_fraction"] == 12 / 16 and t["l3_share_of_reusable"] == 12 / 24
    assert t["tokens_match"] is False and t["tokens_match_second_pass"] is False
    assert t["mismatches"] == [{"index": 1, "client": 0, "turn": 2, "first_step": 1}]
    assert [r["tokens_match"] for r in t["per_request"]] == [True, False]
    assert t["ttft"]["later_turns"]["off_p50_ms"] == pytest.approx(20.0)
    # pass 1 inserted less than the page-floored prompt: only that much is reusable
    short = [dataclasses.replace(first[0], on=on([1, 2], 10, 0, 0, 5)), first[1]]
    assert (
        two_pass_results(short, second, 4, flushed={}, flush_s=0, on_s=1)["reusable_tokens"]
        == 4 + 16
    )


def test_table_shows_a_dash_for_missing_figures(job):
    r = copy.deepcopy(job["results"])
    for k in ("off_p50_ms", "off_p90_ms", "on_p50_ms", "on_p90_ms", "ratio_p50"):
        r["ttft"]["later_turns"][k] = None  # a one-turn run has no later turns
    r["decode_step_ratio"] = None
    r["decode_step_ms"] = {"cache_off_p50": None, "cache_on_p50": None}
    r["l3_restore_vs_recompute"] = None
    lines = format_table(r).splitlines()
    later = next(x for x in lines if x.startswith("TTFT turns >= 2"))
    assert later.split()[-3:] == ["-/-", "-/-", "-"]
    assert next(x for x in lines if x.startswith("decode step")).split()[-3:] == ["-", "-", "-"]
    why = "no probe was served from L3" if job["l3"] else "no L3 tier for this model family"
    assert any(why in x for x in lines)


# ------------------------------------------------------------------- workload
def test_workload_is_deterministic_and_variants_share_no_page():
    cfg = WorkloadConfig(seed=3, clients=3, turns=2, system_prompt_len=32, vocab=128)
    a, b = Workload(cfg), Workload(cfg)
    assert a.digest() == b.digest()
    assert (
        Workload(
            WorkloadConfig(seed=4, clients=3, turns=2, system_prompt_len=32, vocab=128)
        ).digest()
        != a.digest()
    )
    v = Workload(cfg, variant=1)
    assert v.digest() != a.digest()
    assert [(t.client, t.turn, t.user_len, t.gen_len) for t in v.schedule] == [
        (t.client, t.turn, t.user_len, t.gen_len) for t in a.schedule
    ]
    pages_a = {s[i : i + 16].tobytes() for s in a.system_prompts for i in range(0, 32, 16)}
    pages_v = {s[i : i + 16].tobytes() for s in v.system_prompts for i in range(0, 32, 16)}
    assert not pages_a & pages_v


def test_schedule_rounds_and_transcript():
    cfg = WorkloadConfig(seed=1, clients=3, turns=3, system_prompt_len=16, vocab=64)
    wl = Workload(cfg)
    assert len(wl) == 9
    for t in range(3):  # round t: every client once
        assert sorted(x.client for x in wl.schedule[3 * t : 3 * t + 3]) == [0, 1, 2]
        assert {x.turn for x in wl.schedule[3 * t : 3 * t + 3]} == {t + 1}
    tr = Transcript(wl)
    first = wl.schedule[0]
    p = tr.prompt(first.client, 1)
    assert p.size == wl.prompt_len(first.client, 1)
    assert np.array_equal(p[:16], wl.system_prompts[wl.system_of[first.client]])
    gen = np.arange(first.gen_len, dtype=np.int32)
    tr.record(first.client, 1, gen)
    p2 = tr.prompt(first.client, 2)
    assert p2.size == wl.prompt_len(first.client, 2)
    assert np.array_equal(p2[: p.size + gen.size], np.concatenate([p, gen]))  # t+1 extends t
    with pytest.raises(ValueError, match="is at turn 2, not 3"):
        tr.prompt(first.client, 3)
    with pytest.raises(ValueError, match="has not finished"):
        tr.probe_prompt(first.client)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clients", 0),
        ("turns", -1),
        ("jitter", 1.0),
        ("vocab", 0),
        ("seed", -1),
        ("user_tokens", 1.5),
    ],
)
def test_workload_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"WorkloadConfig.{field}"):
        WorkloadConfig(**{field: value})


def test_multiturn_config_validation_and_sizing():
    with pytest.raises(ValueError, match="device_pages must be a positive int, got 0"):
        MultiturnConfig(device_pages=0)
    with pytest.raises(ValueError, match="host_pages or host_ratio"):
        MultiturnConfig(host_pages=4, host_ratio=2.0)
    with pytest.raises(ValueError, match="WritePolicy"):
        MultiturnConfig(write_policy="write_through")
    with pytest.raises(ValueError, match="PrefetchPolicy"):
        MultiturnConfig(prefetch_policy="timeout")
    with pytest.raises(ValueError, match="preset"):
        MultiturnConfig(preset="tiny")
    for bad in (-1, float("nan"), True, "5"):
        with pytest.raises(
            ValueError, match=f"store_latency_ms must be a number >= 0, got {bad!r}"
        ):
            MultiturnConfig(store_latency_ms=bad)
    cfg = MultiturnConfig(preset=ModelPreset.TINY)
    plan = check(cfg)
    # auto sizing: one request fits, device and host each below the working set
    assert plan["request_pages"] < plan["device_pages"] < plan["distinct_pages"]
    assert plan["device_pages"] <= plan["host_pages"] < plan["distinct_pages"]
    ratio = MultiturnConfig(preset=ModelPreset.TINY, device_pages=12, host_ratio=1.5)
    assert check(ratio)["host_pages"] == 18
    with pytest.raises(ValueError, match="device_pages=4 cannot hold"):
        check(MultiturnConfig(preset=ModelPreset.TINY, device_pages=4))
    with pytest.raises(ValueError, match=r"exactly when config\.store names it"):
        run_multiturn(MultiturnConfig(preset=ModelPreset.TINY, store="/some/dir"))
    assert MultiturnConfig(out_dir=os.path.join("a", "b")).out_dir == Path("a", "b")
    assert PrefetchPolicy.TIMEOUT is MultiturnConfig().prefetch_policy
    assert WritePolicy.WRITE_THROUGH is MultiturnConfig().write_policy


# ---------------------------------------------------------------- concurrency
@pytest.fixture(scope="module")
def conc(tmp_path_factory):
    """``--concurrency 3`` on the tiny model, 4 clients (so one waits for a place)."""
    out = tmp_path_factory.mktemp("multiturn_conc") / "out"
    argv = [
        "bench", "multiturn", "--model", "tiny", "--concurrency", "3", "--clients", "4",
        "--device-pages", "13", "--host-pages", "16", "--prefetch-policy", "wait_complete",
        "--store-latency-ms", "3", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, stderr.getvalue()
    results = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    return {"out": out, "stdout": stdout.getvalue(), "results": results}


def test_concurrent_run_end_to_end(conc):
    r = conc["results"]
    assert r["mode"] == "concurrent" and r["concurrency"] == 3 and r["requests"] == 12
    assert r["tokens_match"] is True and r["mismatches"] == []
    assert all(row["tokens_match"] for row in r["per_request"])
    hit = r["hit_tokens"]
    assert hit["device"] > 0 and hit["host"] > 0, hit
    for name in ("cache_off", "cache_on"):
        t = r["throughput"][name]
        assert t["requests"] == 12 and t["output_tokens"] > 0
        for k in ("tokens_per_s", "requests_per_s", "seconds"):
            assert math.isfinite(t[k]) and t[k] > 0, (name, k, t[k])
    on, off = r["throughput"]["cache_on"], r["throughput"]["cache_off"]
    assert r["throughput_ratio"] == pytest.approx(on["tokens_per_s"] / off["tokens_per_s"])
    assert on["output_tokens"] == off["output_tokens"]  # same answers, same lengths
    for block in ("turn1", "later_turns"):
        t = r["ttft"][block]
        assert all(math.isfinite(t[k]) and t[k] > 0 for k in ("off_p50_ms", "on_p90_ms"))
    itl = r["itl_ms"]
    assert 0 < itl["cache_off_p50"] <= itl["cache_off_p90"]
    assert 0 < itl["cache_on_p50"] <= itl["cache_on_p90"]
    assert set(r["retractions"]) == {"cache_off", "cache_on"}
    pre = r["prefill_tokens"]
    assert pre["cache_on"] < pre["cache_off"]
    if r["retractions"]["cache_on"] == 0:  # no re-prefill: every prompt token hit or computed
        assert pre["cache_on"] + sum(hit.values()) == pre["cache_off"]
    assert r["compiles_in_timed_steps"] == 0, r["compiled_in_timed_steps"]
    assert r["config"]["store_latency_ms"] == 3.0


def test_job_store_adds_the_latency_and_removes_its_temporary_directory():
    """``job_store``: a temporary ``FileBackend`` behind ``store_latency_ms`` (its
    requests wait that long), removed on exit; a given store is served as given."""
    cfg = MultiturnConfig(preset=ModelPreset.TINY, store_latency_ms=20)
    with job_store(cfg, None) as js:
        assert isinstance(js.backend, LatencyBackend) and js.backend.inner is js.inner
        assert isinstance(js.inner, FileBackend) and js.temporary
        root = js.inner.root
        t0 = time.perf_counter()
        assert js.backend.clear() is True  # one request to the store
        assert time.perf_counter() - t0 >= 0.02
    assert not os.path.exists(root)
    with job_store(MultiturnConfig(preset=ModelPreset.TINY), None) as js:
        assert js.backend is js.inner and isinstance(js.inner, FileBackend)
    given = FileBackend(tmp := tempfile.mkdtemp())
    try:
        with job_store(MultiturnConfig(preset=ModelPreset.TINY, store=tmp), given) as js:
            assert js.backend is given and not js.temporary
        assert os.path.isdir(tmp)  # the caller's store is left alone
    finally:
        given.close()
        shutil.rmtree(tmp)


def test_concurrent_clients_wait_for_their_answers_and_for_a_place(conc):
    rows = conc["results"]["per_request"]
    for side in ("off", "on"):
        by_client = {}
        for row in rows:
            by_client.setdefault(row["client"], []).append(row)
        for turns in by_client.values():
            turns.sort(key=lambda x: x["turn"])
            for a, b in itertools.pairwise(turns):  # next turn after the answer
                assert b[f"ready_{side}_ms"] >= a[f"end_{side}_ms"], (side, a, b)
        # at most 3 turns in flight at any moment; client 3 starts when one finished
        for row in rows:
            t = row[f"ready_{side}_ms"]
            live = [x for x in rows if x[f"ready_{side}_ms"] <= t < x[f"end_{side}_ms"]]
            assert len(live) <= 3, (side, t, live)
        first_done = min(x[f"end_{side}_ms"] for x in by_client[0] + by_client[1] + by_client[2])
        assert by_client[3][0][f"ready_{side}_ms"] >= first_done


def test_concurrent_table_json_line_and_plot(conc):
    lines = conc["stdout"].strip().splitlines()
    text = "\n".join(lines)
    for needle in (
        "--concurrency 3", "output tokens / s", "requests / s", "TTFT turn 1 p50 / p90",
        "TTFT turns >= 2 p50 / p90", "inter-token p50 / p90", "hit tokens device / host / L3",
        "retractions", "tokens equal to cache off",
    ):  # fmt: skip
        assert needle in text, needle
    last = json.loads(lines[-1])
    assert last == summary(conc["results"])
    assert last["mode"] == "concurrent" and last["tokens_match"] is True
    assert last["throughput_ratio"] == round(conc["results"]["throughput_ratio"], 4)
    import matplotlib.image

    img = matplotlib.image.imread(str(conc["out"] / "multiturn.png"))
    assert img.shape[1] > 1200 and img.std() > 0.05  # three panels, not blank


def test_concurrency_config_refusals():
    with pytest.raises(ValueError, match="concurrency=4 exceeds the workload's 3 clients"):
        MultiturnConfig(preset=ModelPreset.TINY, concurrency=4)
    with pytest.raises(ValueError, match="concurrency must be a positive int, got 0"):
        MultiturnConfig(preset=ModelPreset.TINY, concurrency=0)
    with pytest.raises(ValueError, match="think_ms must be a number >= 0, got -1"):
        MultiturnConfig(preset=ModelPreset.TINY, concurrency=2, think_ms=-1)
    with pytest.raises(ValueError, match="think_ms=5 needs a concurrency"):
        MultiturnConfig(preset=ModelPreset.TINY, think_ms=5)


def test_pages_per_object_is_256_tokens_on_an_object_store():
    """Auto ``l3_pages_per_object``: 1 on a directory (injected latency included: a
    store answering every request in flight at once gains nothing); 256 tokens' worth
    of pages on an object store (kvstore JSON or URL on s3 / gcs / http); a given value
    always wins."""
    s3 = json.dumps({"driver": "s3", "bucket": "b", "endpoint": "http://127.0.0.1:1"})
    cases = [
        (MultiturnConfig(), 1),
        (MultiturnConfig(store="/some/dir"), 1),
        (MultiturnConfig(store='{"driver": "file", "path": "/x"}'), 1),
        (MultiturnConfig(store="file:///x"), 1),
        (MultiturnConfig(store=s3), 4),
        (MultiturnConfig(store="gs://bucket/l3/"), 4),
        (MultiturnConfig(store='{"driver": "gcs", "bucket": "b"}'), 4),
        (MultiturnConfig(store_latency_ms=20), 1),
        (MultiturnConfig(store=s3, l3_pages_per_object=1), 1),
        (MultiturnConfig(l3_pages_per_object=3), 3),
    ]
    for cfg, want in cases:
        assert cfg.pages_per_object(64) == want, (cfg.store, cfg.store_latency_ms)
    assert MultiturnConfig(store=s3).pages_per_object(256) == 1  # a page is 256 tokens
    assert MultiturnConfig(store=s3).pages_per_object(512) == 1
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="l3_pages_per_object must be a positive int"):
            MultiturnConfig(l3_pages_per_object=bad)
