"""Two serving processes share one L3 store: the second serves the first's conversation
prefix from storage, with logits equal to recomputation (tiny model, PP 1 and 2; a file
store and a real S3-compatible server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("l3_worker.py")
REPO = WORKER.parents[1]
TOL = 1e-4
PREFIX = 48  # turn 1 writes KV for 45 + 6 - 1 = 50 tokens: 3 whole pages


def _run(role: str, pp: int, spec: dict, tmp_path: Path) -> dict:
    out = tmp_path / f"{role}-{pp}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(WORKER), role, str(pp), json.dumps(spec), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _two_processes(pp: int, spec: dict, tmp_path: Path) -> dict:
    first = _run("write", pp, spec, tmp_path)
    assert first["stats"]["storage_backed_up_pages"] > 0
    read = _run("read", pp, {**spec, "generated": json.dumps(first["generated"])}, tmp_path)
    assert (read["device"], read["host"], read["storage"]) == (0, 0, PREFIX), read
    assert read["diff"] <= TOL, read["diff"]
    assert read["same_tokens"]
    assert read["stats"]["storage_hit_tokens"] == PREFIX
    return read


@pytest.mark.parametrize("pp", [1, 2])
def test_second_process_serves_the_prefix_from_a_file_store(tmp_path, pp):
    _two_processes(pp, {"kind": "file", "path": str(tmp_path / "store")}, tmp_path)


def test_second_process_serves_the_prefix_from_s3(tmp_path, monkeypatch):
    pytest.importorskip("moto", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    from moto_server import BUCKET, MotoServer, s3_spec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    server = MotoServer()
    try:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        _two_processes(2, {"kind": "s3", "kvstore": s3_spec(server)}, tmp_path)
    finally:
        server.stop()


def _run_mp(mode: str, tmp_path: Path, pp: int = 2, processes: int = 2) -> list[dict]:
    from jaxhicache.launch import launch_local

    codes = launch_local(
        [sys.executable, str(WORKER), "mp", mode, str(pp), str(tmp_path)],
        processes,
        pp // processes,
        heartbeat_timeout_s=10,
        grace_s=60.0,
        log_dir=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    logs = "\n".join(
        (tmp_path / f"p{i}.log").read_text(errors="replace")[-3000:] for i in range(processes)
    )
    assert codes == [0] * processes, logs
    return [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(processes)]


@pytest.mark.parametrize("mode", ["agree", "fail-read", "fail-stat", "agree-g3", "fail-read-g3"])
def test_processes_disagreeing_about_storage_both_miss_and_agree(tmp_path, mode):
    """2 processes, PP 2 (one stage each), one file store. When only process 1's storage
    reads (or existence checks) fail, both processes miss turn 2's L3 prefix, take the
    same decisions (digests compared at every step) and match recomputation. Control
    (``agree``): without the fault both serve it from L3. ``-g3``: the 3 pages as one
    object per stage (``pages_per_object=3``), the same outcomes."""
    infos = _run_mp(mode, tmp_path)
    units = {p.parent.parent.name for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert ("full-x3" in units) == mode.endswith("-g3") and ("full" in units) != (
        "full-x3" in units
    )
    mode = mode.removesuffix("-g3")
    assert infos[0]["digest"] == infos[1]["digest"]
    want = PREFIX if mode == "agree" else 0
    assert [i["storage"] for i in infos] == [want, want], infos
    assert infos[0]["stats"]["divergence_checks"] > 0
    for info in infos:
        assert info["diff"] <= TOL and info["same_tokens"], info
    if mode == "fail-read":  # the lookup agreed on a hit; process 1's fetch failed
        assert infos[1]["injected"] > 0 and infos[0]["stats"]["storage_prefetches"] == 1
        assert infos[0]["stats"]["l3_prefetched_pages_total"] > 0  # process 0's loaded
    if mode == "fail-stat":  # process 1 saw nothing: no prefetch was started anywhere
        assert infos[1]["injected"] > 0
        assert [i["stats"]["storage_prefetches"] for i in infos] == [0, 0]
