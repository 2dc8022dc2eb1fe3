"""L3 on a real S3-compatible server on loopback (moto in server mode)."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e '.[test]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]')")

from moto_server import BUCKET, MotoServer  # noqa: E402
from storage_rows import stored_bytes  # noqa: E402

from jaxhicache.layer_map import build_layer_maps  # noqa: E402
from jaxhicache.pools.host import HostPools  # noqa: E402
from jaxhicache.spec import PAGE_SPACES, ModelCacheSpec, PageSpace, PoolKind  # noqa: E402
from jaxhicache.storage import (  # noqa: E402
    Namespace,
    ObjectLayout,
    TensorStoreBackend,
    object_key,
    page_hashes,
)


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    server = MotoServer()
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield server, client
    finally:
        server.stop()


def _spec_for(server):
    return {
        "driver": "s3",
        "bucket": BUCKET,
        "path": "fleet-a/",
        "endpoint": server.endpoint,
        "aws_region": "us-east-1",
        "aws_credentials": {"type": "environment"},
    }


def _pools(spec, maps, fill=None):
    h = HostPools(spec, maps, 8, 8, reserve_bytes=0)
    rng = np.random.default_rng(3)
    for k in spec.kinds():
        a = h.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8) if fill is None else fill
    return h


_bytes = stored_bytes  # what an object holds (SWA space: the window rows)


@pytest.mark.parametrize("layout", list(ObjectLayout))
def test_s3_round_trip_then_server_stopped_mid_run(s3, layout):
    server, client = s3
    spec = ModelCacheSpec.tiny_dsv4()
    maps = build_layer_maps(spec, 2)
    src, dst = _pools(spec, maps), _pools(spec, maps, fill=0xEE)
    be = TensorStoreBackend(_spec_for(server), object_layout=layout, request_retries=1)
    hs = page_hashes(np.arange(6 * spec.page_size) % 997, spec.page_size)
    ns = [Namespace.for_stage(spec, m) for m in maps]
    ids = np.arange(6)
    for r in range(2):
        for s in PAGE_SPACES:
            assert be.put(ns[r], s, hs[:4], src, r, ids[:4]).all()
            assert be.exists_prefix(ns[r], s, hs) == 4
            assert be.get(ns[r], s, hs[:4], dst, r, ids[2:6]).all()
            np.testing.assert_array_equal(_bytes(dst, r, s, ids[2:6]), _bytes(src, r, s, ids[:4]))
    # the objects are real S3 objects under the store's path, named by their keys
    listed = client.list_objects_v2(Bucket=BUCKET)["Contents"]
    names = {o["Key"] for o in listed}
    unit = PageSpace.FULL if layout is ObjectLayout.PER_SPACE else PoolKind.C4_KV
    assert f"fleet-a/{object_key(ns[1], unit, hs[0])}" in names
    assert all(n.startswith("fleet-a/jaxhicache/v2/") for n in names)
    before = be.stats()
    assert before.read_errors_total == before.write_errors_total == 0

    server.stop()  # the store goes away mid-run
    dst2 = _pools(spec, maps, fill=0xEE)
    t0 = time.perf_counter()
    assert not be.put(ns[0], PageSpace.FULL, hs[4:], src, 0, ids[4:]).any()
    assert be.exists_prefix(ns[0], PageSpace.FULL, hs) == 0
    assert not be.get(ns[0], PageSpace.FULL, hs[:4], dst2, 0, ids[:4]).any()
    assert time.perf_counter() - t0 < 30
    assert (_bytes(dst2, 0, PageSpace.FULL, ids) == 0xEE).all()
    d = be.stats() - before
    assert d.write_errors_total >= 1 and d.backup_failed_pages_total == 2
    assert d.read_errors_total >= 2 and d.prefetch_failed_pages_total == 4
    assert d.miss_pages_total == 6 and d.integrity_failures_total == 0
