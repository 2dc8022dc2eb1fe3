"""Multi-process pipeline parallelism on ``jax.distributed`` (real processes, loopback).

Each test starts its own processes through :func:`jaxhicache.launch.launch_local`
(free coordinator port on 127.0.0.1, gloo CPU collectives, fake CPU devices per
process) running ``tests/pp_worker.py``, and checks what they wrote against a
single-process run of the same conversations in this process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxhicache.cache import WritePolicy
from jaxhicache.launch import launch_local
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import PoolKind
from models import PagedModel, TinyDSV4Config, init_params
from models.serving import ServingLoop

WORKER = Path(__file__).parent / "pp_worker.py"
TOL = 1e-4  # the suite's logit tolerance (the runs below are in fact bit-identical)


def _worker_module():
    spec = importlib.util.spec_from_file_location("pp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, pp: int, processes: int, mode: str, grace_s: float = 60.0):
    t0 = time.monotonic()
    codes = launch_local(
        [sys.executable, str(WORKER), str(pp), str(tmp_path), mode],
        processes,
        pp // processes,
        heartbeat_timeout_s=10,
        grace_s=grace_s,
        log_dir=tmp_path,
    )
    return codes, time.monotonic() - t0


def _logs(tmp_path: Path, n: int) -> str:
    return "\n".join((tmp_path / f"p{i}.log").read_text(errors="replace")[-3000:] for i in range(n))


@pytest.fixture(scope="module")
def single_process():
    """The same conversations served by one process driving both stages."""
    worker = _worker_module()
    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), pp=2)
    loop = ServingLoop.for_model(
        model,
        device_pages=16,
        host_ratio=4.0,
        write_policy=WritePolicy.WRITE_THROUGH,
        layerwise=True,  # as tests/pp_worker.py
    )
    _, reports = worker.serve_all(loop, cfg.vocab)
    loop.close()
    return {
        "step_logits": np.concatenate([r.step_logits for r in reports]),
        "generated": np.concatenate([r.generated for r in reports]),
        "digest": loop.cache.digest().hex(),
    }


@pytest.mark.parametrize(("pp", "processes"), [(2, 2), (4, 2)], ids=["pp2x1", "pp4x2"])
def test_processes_own_their_stages_and_agree(tmp_path, single_process, pp, processes):
    codes, _ = _run(tmp_path, pp, processes, "normal")
    assert codes == [0] * processes, _logs(tmp_path, processes)
    cfg = TinyDSV4Config.mini(num_layers=6)
    maps = build_layer_maps(cfg.cache_spec(), pp)
    per = pp // processes
    infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(processes)]
    outs = [np.load(tmp_path / f"p{i}.npz") for i in range(processes)]
    for i, info in enumerate(infos):
        mine = list(range(i * per, (i + 1) * per))
        assert info["stages"] == mine and info["host_ranks"] == mine
        # Host slabs hold exactly this process's stages (leading axis) ...
        for shape in info["slab_shapes"].values():
            assert shape[0] == per
        # ... and its state sub-pool rows map to the global layer ids of those stages.
        for r in mine:
            want = maps[r].subpool_to_global(PoolKind.C4_STATE).tolist()
            assert info["c4_state_global_ids"][str(r)] == want
    # Identical decisions everywhere, and the same as a single process taking them.
    assert len({info["digest"] for info in infos}) == 1
    if pp == 2:  # same geometry as the single-process run: same tree, same page ids
        assert infos[0]["digest"] == single_process["digest"]
    assert infos[0]["stats"]["host_hit_tokens"] > 0  # later turns came from the host tier
    for out in outs:
        np.testing.assert_array_equal(out["generated"], single_process["generated"])
        np.testing.assert_allclose(out["step_logits"], single_process["step_logits"], atol=TOL)
        np.testing.assert_allclose(out["step_logits"], out["uncached_step_logits"], atol=TOL)
    assert (outs[0]["host_tokens"][2:] > 0).any()


def test_disagreement_is_resolved_by_agreement(tmp_path, single_process):
    """Process 1 is told one backup failed: both drop it and end with the same tree."""
    codes, _ = _run(tmp_path, 4, 2, "disagree")
    assert codes == [0, 0], _logs(tmp_path, 2)
    infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [info["stats"]["backups_failed"] for info in infos] == [1, 1]
    assert infos[0]["digest"] == infos[1]["digest"]
    for i in range(2):
        out = np.load(tmp_path / f"p{i}.npz")
        np.testing.assert_allclose(out["step_logits"], single_process["step_logits"], atol=TOL)
        np.testing.assert_allclose(out["step_logits"], out["uncached_step_logits"], atol=TOL)


def test_without_agreement_the_digest_check_fires(tmp_path):
    """Negative control: the same injected failure, agreement off, check_every=1."""
    codes, _ = _run(tmp_path, 4, 2, "disagree-unagreed")
    assert codes == [3, 3], _logs(tmp_path, 2)
    for i in range(2):
        text = (tmp_path / f"p{i}.diverged").read_text()
        assert "cache state differs" in text


def test_a_dead_process_fails_the_others_quickly(tmp_path):
    codes, elapsed = _run(tmp_path, 2, 2, "die", grace_s=120.0)
    assert codes[1] == 17
    assert codes[0] != 0, _logs(tmp_path, 2)
    assert elapsed < 90, f"the survivor took {elapsed:.0f} s to fail"
    log = (tmp_path / "p0.log").read_text(errors="replace")
    assert "Connection closed by peer" in log or "heartbeat" in log, log[-3000:]


def test_l3_across_processes(tmp_path, single_process):
    """Each process writes and reads its own stages' objects; the lookups are agreed."""
    codes, _ = _run(tmp_path, 2, 2, "l3")
    assert codes == [0, 0], _logs(tmp_path, 2)
    infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert infos[0]["digest"] == infos[1]["digest"]
    assert infos[0]["stats"]["storage_hit_tokens"] > 0  # later turns came from storage
    # Both stages' objects are there, each under its own layer range.
    maps = build_layer_maps(TinyDSV4Config.mini(num_layers=6).cache_spec(), 2)
    stage_dirs = {p.name for p in (tmp_path / "store").rglob("layers-*") if p.is_dir()}
    assert stage_dirs == {f"layers-{m.start_layer}-{m.end_layer}" for m in maps}, stage_dirs
    for i in range(2):
        out = np.load(tmp_path / f"p{i}.npz")
        assert out["storage_tokens"].sum() == infos[i]["stats"]["storage_hit_tokens"]
        np.testing.assert_array_equal(out["generated"], single_process["generated"])
        np.testing.assert_allclose(out["step_logits"], out["uncached_step_logits"], atol=TOL)


def test_engine_under_two_processes(tmp_path):
    """The continuous-batching engine on PP 2 over 2 processes: digests checked after
    every cache call and equal at the end, equal to one process driving both stages,
    with the same tokens."""
    codes, _ = _run(tmp_path, 2, 2, "engine")
    assert codes == [0, 0], _logs(tmp_path, 2)
    infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    outs = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    cfg = TinyDSV4Config.mini(num_layers=6)
    eng = _worker_module().serve_engine(PagedModel(cfg, init_params(cfg, 0), pp=2))
    done = [eng.done[r] for r in sorted(eng.done)]
    assert infos[0]["digest"] == infos[1]["digest"] == eng.cache.digest().hex()
    assert infos[0]["retractions"] == eng.retractions > 0
    assert infos[0]["stats"]["device_hit_tokens"] > 0 and infos[0]["stats"]["divergence_checks"]
    for out in outs:
        np.testing.assert_array_equal(out["generated"], np.concatenate([c.generated for c in done]))
        assert out["aborted"].sum() == 1
    eng.cache.close()


def test_hybrid_snapshots_under_two_processes(tmp_path):
    """The recurrent hybrid on PP 2 over 2 processes: every decision about snapshots
    (which slot, which node, backups, eviction) is the same in both processes (digests
    compared after every cache call) and as in one process driving both stages; later
    turns hit on host, and every turn equals its recomputation."""
    codes, _ = _run(tmp_path, 2, 2, "hybrid")
    assert codes == [0, 0], _logs(tmp_path, 2)
    infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    outs = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    worker = _worker_module()
    _, loop = worker.hybrid_loop(make_mesh(2))
    _, reports = worker.serve_all(loop, loop.model.config.vocab)
    loop.cache.poll(wait=True)
    assert infos[0]["digest"] == infos[1]["digest"] == loop.cache.digest().hex()
    assert infos[0]["snapshots"][1] > 0 and infos[0]["stats"]["divergence_checks"] > 0
    generated = np.concatenate([r.generated for r in reports])
    for out in outs:
        np.testing.assert_array_equal(out["generated"], generated)
        np.testing.assert_allclose(out["step_logits"], out["uncached_step_logits"], atol=TOL)
        assert (out["host_tokens"][2:] > 0).all()  # later turns: snapshots from host
    loop.close()
