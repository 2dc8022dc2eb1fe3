"""Recurrent hybrid cache specs (Qwen3-Next): the preset's bytes from the public config,
the state kinds' own index space under PP, their TP split, and validation."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import pool_partition_spec
from jaxhicache.rows import RecurrentGeometry
from jaxhicache.spec import (
    AttentionKind,
    HitPolicy,
    KVFormat,
    ModelCacheSpec,
    PageSpace,
    PoolKind,
    TPSharding,
    hybrid_layer_kinds,
)

CONV, REC, KV = PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE, PoolKind.FULL_KV


def test_qwen3_next_bytes_match_the_public_config():
    spec = ModelCacheSpec.qwen3_next_80b_a3b()
    assert spec.is_hybrid and not spec.is_mla and not spec.is_dsv4
    full = [g for g, k in enumerate(spec.attention_kinds) if k is AttentionKind.FULL]
    assert full == list(range(3, 48, 4)) and len(spec.layers_with(CONV)) == 36
    # attention: 2 KV heads x 256, K and V, bf16: 24,576 bytes per token over 12 layers
    assert spec.row_shape(KV) == (2, 64, 2, 256)
    assert spec.page_bytes() == 12 * 2 * 64 * 2 * 256 * 2 and spec.page_bytes() // 64 == 24_576
    # conv: (2*16*128 + 32*128) channels x (kernel 4 - 1), bf16; recurrent: 32 x 128 x 128 fp32
    assert spec.row_shape(CONV) == (8192, 3) and spec.row_bytes(CONV) == 49_152
    assert spec.row_shape(REC) == (32, 128, 128) and spec.row_bytes(REC) == 2_097_152
    assert spec.row_dtype(REC).name == "float32" and spec.row_dtype(CONV).name == "bfloat16"
    assert spec.snapshot_bytes() == 36 * (49_152 + 2_097_152) == 77_266_944


def test_state_kinds_are_a_third_id_space_with_an_end_snapshot_hit_policy():
    for kind in (CONV, REC):
        assert kind.page_space is PageSpace.STATE
        assert kind.hit_policy is HitPolicy.END_SNAPSHOT
        assert kind.tp_sharding is TPSharding.HEADS and kind.tp_axis == 0
    assert KV.tp_axis == 2 and PoolKind.MLA_LATENT.tp_axis is None
    spec = ModelCacheSpec.tiny_hybrid()
    assert pool_partition_spec(spec, REC, tp=2) == P("pp", None, None, "tp", None, None)
    assert pool_partition_spec(spec, CONV, tp=2) == P("pp", None, None, "tp", None)
    with pytest.raises(ValueError, match="recurrent_state row axis 0 \\(4\\)"):
        pool_partition_spec(spec, REC, tp=8)


def test_linear_layers_have_their_own_index_space_under_pp():
    spec = ModelCacheSpec.qwen3_next_80b_a3b()
    maps = build_layer_maps(spec, 4)
    for m in maps:
        assert m.num_layers_of(CONV) == 9 and m.num_layers_of(KV) == 3
        assert list(m.subpool_to_global(KV)) == [m.start_layer + i for i in (3, 7, 11)]
        # the stage's state rows are its linear layers, by sub-pool id, not local id
        assert list(m.kind_local_ids(CONV)) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
        assert m.subpool_id(CONV, 4) == 3
        assert spec.snapshot_bytes(m) * 4 == spec.snapshot_bytes()
    uneven = build_layer_maps(spec, 2, [10, 38])
    assert [m.num_layers_of(CONV) for m in uneven] == [8, 28]


def test_layer_map_command_shows_state_bytes_per_snapshot(capsys):
    import json

    from jaxhicache.cli import main

    assert main(["layer-map", "--model", "qwen3-next-80b-a3b", "--pp", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["snapshot_bytes"] == 77_266_944 and info["kv_bytes_per_token"] == 24_576
    assert [s["snapshot_bytes"] for s in info["stages"]] == [77_266_944 // 4] * 4
    assert [s["kv_bytes_per_token"] for s in info["stages"]] == [24_576 // 4] * 4


def test_hybrid_spec_validation():
    base = ModelCacheSpec.tiny_hybrid()
    with pytest.raises(ValueError, match="needs its recurrent= geometry"):
        ModelCacheSpec(**{**base.__dict__, "recurrent": None})
    with pytest.raises(ValueError, match="needs layer_kinds with LINEAR"):
        ModelCacheSpec(**{**base.__dict__, "layer_kinds": None})
    with pytest.raises(ValueError, match="FLOAT rows"):
        ModelCacheSpec(**{**base.__dict__, "kv_format": KVFormat.FP8_MLA})
    mla = ModelCacheSpec.tiny_mla()
    with pytest.raises(ValueError, match="this is an MLA spec"):
        ModelCacheSpec(**{**mla.__dict__, "recurrent": base.recurrent})
    with pytest.raises(ValueError, match="LINEAR with FULL; got \\['FULL'\\]"):
        ModelCacheSpec(**{**base.__dict__, "layer_kinds": (AttentionKind.FULL,) * 8})
    with pytest.raises(ValueError, match="v_heads=6 must be a multiple of k_heads=4"):
        RecurrentGeometry(4, 6, 8, 8)
    with pytest.raises(ValueError, match="conv_kernel must be >= 2, got 1"):
        RecurrentGeometry(2, 4, 8, 8, conv_kernel=1)
    with pytest.raises(ValueError, match="full_attention_interval must be >= 2, got 1"):
        hybrid_layer_kinds(8, 1)
    assert ModelCacheSpec.tiny_dsv4().snapshot_bytes() == 0
