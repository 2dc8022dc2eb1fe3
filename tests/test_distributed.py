"""Single-process pieces of the multi-controller support (the process tests are in
test_pp_processes.py): configs, local stages, host slabs of some stages, agreement."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.cache import HiCache, HiCacheConfig
from jaxhicache.distributed import (
    Agreement,
    DistributedConfig,
    fetch,
    initialize,
    local_stages,
    put_global,
)
from jaxhicache.launch import main as launch_main
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.transfer import TransferEngine


def test_config_validates_and_round_trips_through_the_environment():
    cfg = DistributedConfig("127.0.0.1:1234", 4, 2, local_devices=2, heartbeat_timeout_s=5)
    assert DistributedConfig.from_env(cfg.env()) == cfg
    assert DistributedConfig.from_env({}) is None
    for bad, match in [
        (dict(coordinator="nohost", num_processes=2, process_id=0), "HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), "not below"),
        (dict(coordinator="h:1", num_processes=0, process_id=0), "num_processes"),
        (dict(coordinator="h:1", num_processes=2, process_id=0, local_devices=0), "local_dev"),
        (dict(coordinator="h:1", num_processes=True, process_id=0), "num_processes"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistributedConfig(**bad)
    with pytest.raises(ValueError, match="JAXHICACHE_PROCESS_ID"):
        DistributedConfig.from_env(
            {
                "JAXHICACHE_COORDINATOR": "h:1",
                "JAXHICACHE_NUM_PROCESSES": "2",
                "JAXHICACHE_PROCESS_ID": "x",
            }
        )


def test_initialize_is_a_no_op_without_a_multi_process_run(monkeypatch):
    monkeypatch.delenv("JAXHICACHE_COORDINATOR", raising=False)
    assert initialize() is False


def test_single_process_owns_every_stage_and_agreement_is_identity():
    mesh = make_mesh(4, 2)
    assert local_stages(mesh) == (0, 1, 2, 3)
    ag = Agreement()
    assert not ag.active
    np.testing.assert_array_equal(ag.min([3, 1, 2]), [3, 1, 2])
    assert ag.digests_equal(b"anything") and ag.calls == 0


def test_put_global_and_fetch():
    mesh = make_mesh(2, 2)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = put_global(x, NamedSharding(mesh, P("pp")))
    assert a.sharding.spec == P("pp")
    np.testing.assert_array_equal(fetch(a), x)
    r = put_global(x, NamedSharding(mesh, P()))
    np.testing.assert_array_equal(fetch(r), x)


def test_host_pools_hold_only_their_stages():
    spec = ModelCacheSpec.tiny_dsv4()
    maps = build_layer_maps(spec, 4)
    host = HostPools(spec, maps, 8, 8, ranks=(2, 3))
    for kind in spec.kinds():
        assert host.stacked(kind).shape[0] == 2
    assert host.local_maps == (maps[2], maps[3])
    assert len(host.nbytes_per_stage()) == 2
    host.slab(3, spec.kinds()[0])  # a local stage: fine
    with pytest.raises(ValueError, match="stage 1's host slabs live in another process"):
        host.slab(1, spec.kinds()[0])
    for bad in [(), (3, 2), (4,), (1, 1)]:
        with pytest.raises(ValueError, match="ranks must be increasing"):
            HostPools(spec, maps, 8, 8, ranks=bad)


def test_engine_refuses_host_slabs_of_other_stages():
    spec = ModelCacheSpec.tiny_dsv4()
    maps = build_layer_maps(spec, 2)
    host = HostPools(spec, maps, 8, 8, ranks=(1,))
    with pytest.raises(ValueError, match=r"hold stages \[1\] but this process owns stages"):
        TransferEngine(make_mesh(2), maps, host)


def test_check_every_and_digest():
    spec = ModelCacheSpec.tiny_dsv4()
    with pytest.raises(ValueError, match="check_every"):
        HiCacheConfig(device_pages=8, check_every=-1)
    cache = HiCache(spec, make_mesh(2), HiCacheConfig(device_pages=8, check_every=1))
    d0 = cache.digest()
    pools = cache.new_device_pools()
    tokens = np.arange(3 * spec.page_size + 1)
    pools, batch = cache.admit(pools, [tokens], 1)
    assert cache.stats()["divergence_checks"] == 1  # a no-op comparison in one process
    (req,) = batch.requests
    cache.insert(pools, req, tokens)
    cache.release(req)
    assert cache.digest() != d0  # the tree changed, and the digest sees it
    cache.close()


def test_launch_refuses_bad_arguments(capsys):
    assert launch_main(["--processes", "2"]) == 2
    assert "give the command to run after '--'" in capsys.readouterr().err
    assert launch_main(["--processes", "0", "--", "true"]) == 2
    assert "--processes must be an int >= 1, got 0" in capsys.readouterr().err
    assert launch_main(["--coordinator", "h:1", "--num-processes", "2", "--", "true"]) == 2
    assert "--coordinator needs --num-processes and --process-id" in capsys.readouterr().err
    args = ["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"]
    assert launch_main([*args, "--", "true"]) == 2
    assert "coordinator must be HOST:PORT, got 'nohost'" in capsys.readouterr().err


def test_launch_reports_the_failing_process():
    code = "import os, sys; sys.exit(5 if os.environ['JAXHICACHE_PROCESS_ID'] == '1' else 0)"
    launcher = [sys.executable, "-m", "jaxhicache.launch", "--processes", "2", "--grace-s", "5"]
    out = subprocess.run(
        [*launcher, "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 5
    assert "process 1 exited with 5" in out.stderr
    assert jax.process_count() == 1  # the children's runtime is theirs alone
