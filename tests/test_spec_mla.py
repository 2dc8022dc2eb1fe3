"""MLA + DSA cache specs: the presets' bytes from the public configs, the indexer's
kind-local index space under PP, the replicated-over-TP rule, and validation."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import pool_partition_spec
from jaxhicache.spec import (
    AttentionKind,
    KVFormat,
    ModelCacheSpec,
    PageSpace,
    PoolKind,
    TPSharding,
    shared_indexer_layers,
)
from jaxhicache.storage import Namespace, object_key, stored_bytes_per_page
from jaxhicache.storage.keys import cache_format, tp_sharded_kinds

H = "ab" * 32
LATENT, INDEXER = PoolKind.MLA_LATENT, PoolKind.DSA_INDEXER


def test_deepseek_v3_2_bytes_per_page_match_the_public_config():
    bf16 = ModelCacheSpec.deepseek_v3_2()
    fp8 = ModelCacheSpec.deepseek_v3_2(KVFormat.FP8_MLA)
    assert bf16.page_size == 64 and bf16.kv_lora_rank == 512 and bf16.rope_dim == 64
    assert bf16.attention_kinds == (AttentionKind.MLA_DSA,) * 61
    # bf16 latent: (512 + 64) x 2 B per token; fp8: 512 fp8 + 4 fp32 scales + 64 bf16
    assert bf16.row_shape(LATENT) == (64, 576) and bf16.row_bytes(LATENT) == 73_728
    assert fp8.fp8_mla_token_bytes == 656 and fp8.row_bytes(LATENT) == 64 * 656 == 41_984
    # the indexer page: 64 x 128 fp8 keys followed by 64 fp32 scales
    assert fp8.row_shape(INDEXER) == (8_448,) and fp8.row_dtype(INDEXER) == np.uint8
    assert bf16.page_bytes() == 61 * (73_728 + 8_448) == 5_012_736
    assert fp8.page_bytes() == 61 * (41_984 + 8_448) == 3_076_352


def test_glm5_and_glm5_2_differ_only_in_which_layers_own_an_indexer():
    glm5, glm52 = ModelCacheSpec.glm5(KVFormat.FP8_MLA), ModelCacheSpec.glm5_2(KVFormat.FP8_MLA)
    assert glm5.layers_with(INDEXER) == tuple(range(78))
    owners = shared_indexer_layers(78, freq=4, offset=3)
    assert owners == (0, 1, 2, *range(6, 78, 4)) and len(owners) == 21
    assert glm52.layers_with(INDEXER) == owners
    assert glm52.layers_with(LATENT) == tuple(range(78))
    assert glm5.page_bytes() == 78 * (41_984 + 8_448) == 3_933_696
    assert glm52.page_bytes() == 78 * 41_984 + 21 * 8_448 == 3_452_160
    assert cache_format(glm5) != cache_format(glm52)


def test_indexer_layers_have_their_own_index_space_on_every_stage():
    spec = ModelCacheSpec.glm5_2()
    maps = build_layer_maps(spec, 4)
    seen = []
    for m in maps:
        ids = m.subpool_to_global(INDEXER)
        assert list(ids) == [
            g for g in spec.layers_with(INDEXER) if m.start_layer <= g < m.end_layer
        ]
        assert m.num_layers_of(INDEXER) == len(ids) < m.num_local_layers
        seen += list(ids)
    assert tuple(seen) == spec.layers_with(INDEXER)
    # stage 1 (layers 19..37): global 22 is the stage's first indexer row, local id 3
    m1 = maps[1]
    assert m1.global_to_local(22) == 3 and m1.subpool_id(INDEXER, 3) == 0
    assert list(m1.kind_local_ids(INDEXER)) == [3, 7, 11, 15]
    # the other layers of the stage have no indexer row
    assert m1.local_to_subpool(INDEXER)[0] == -1


def test_mla_pools_are_replicated_over_tp_and_their_objects_carry_no_tp_rank():
    spec = ModelCacheSpec.tiny_mla(indexer_layers=(0, 2))
    assert LATENT.tp_sharding is INDEXER.tp_sharding is TPSharding.REPLICATED
    assert PoolKind.FULL_KV.tp_sharding is TPSharding.HEADS
    for kind in (LATENT, INDEXER):
        assert pool_partition_spec(spec, kind, tp=4) == P(
            "pp", None, None, *[None] * len(spec.row_shape(kind))
        )
    assert tp_sharded_kinds(spec, 4) == ()
    m = build_layer_maps(spec, 1)[0]
    keys = {
        object_key(Namespace.for_stage(spec, m, tp_rank=r, tp_size=n), PageSpace.FULL, H)
        for r, n in [(0, 1), (0, 2), (1, 2), (3, 4)]
    }
    assert len(keys) == 1 and "/tp-" not in keys.pop()
    # one full-space object per page holds the latent and the indexer rows
    assert stored_bytes_per_page(spec, m, PageSpace.FULL) == spec.page_bytes()


def test_tiny_mla_rows():
    spec = ModelCacheSpec.tiny_mla()
    assert spec.kinds() == (LATENT, INDEXER) and spec.is_mla and not spec.is_dsv4
    assert spec.row_shape(LATENT) == (16, 40) and spec.row_dtype(LATENT) == np.float32
    assert spec.row_shape(INDEXER) == (16 * 20,) and spec.swa_trailing_pages == 0
    only_mla = ModelCacheSpec.tiny_mla(indexer_layers=())
    assert only_mla.kinds() == (LATENT,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indexer_layers": (0, 4)}, "indexer layer 4"),
        ({"indexer_layers": (True,)}, "indexer layer True"),
        ({"kv_format": KVFormat.FP8_MLA}, "multiple of 128"),
        ({"kv_format": KVFormat.FP8_DSV4}, "FP8_DSV4"),
        ({"rope_dim": 3}, "rope_dim"),
        ({"indexer_head_dim": 0}, "indexer_head_dim"),
    ],
)
def test_tiny_mla_rejects_bad_geometry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCacheSpec.tiny_mla(**kwargs)


def test_mla_spec_rejects_inconsistent_fields():
    base = ModelCacheSpec.tiny_mla()
    kinds = base.layer_kinds
    with pytest.raises(ValueError, match="3 entries"):
        ModelCacheSpec(**{**base.__dict__, "layer_kinds": kinds[:3]})
    with pytest.raises(ValueError, match=r"MLA / MLA_DSA, or LINEAR with FULL; got \['CSA'"):
        ModelCacheSpec(**{**base.__dict__, "layer_kinds": (AttentionKind.CSA, *kinds[1:])})
    with pytest.raises(ValueError, match="num_kv_heads=1"):
        ModelCacheSpec(**{**base.__dict__, "num_kv_heads": 2})
    with pytest.raises(ValueError, match="not both"):
        ModelCacheSpec(**{**base.__dict__, "compress_ratios": (0, 0, 0, 0, 0)})
    with pytest.raises(ValueError, match="layer_kinds: 9"):
        ModelCacheSpec(**{**base.__dict__, "layer_kinds": (9, 9, 9, 9)})
    with pytest.raises(ValueError, match="not an MLA spec"):
        _ = ModelCacheSpec.tiny_dsv4().kv_lora_rank
    with pytest.raises(ValueError, match="freq"):
        shared_indexer_layers(8, freq=0, offset=1)


def test_layer_map_command_shows_glm5_2_stage_bytes_and_indexer_rows(capsys):
    import json

    from jaxhicache.cli import main

    assert main(["layer-map", "--model", "glm5.2-fp8", "--pp", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["page_bytes"] == 3_452_160 and info["swa_pages"] == 0
    stages = info["stages"]
    assert [s["layer_counts"]["dsa_indexer"] for s in stages] == [7, 4, 5, 5]
    assert stages[1]["subpool_global_ids"] == {"dsa_indexer": [22, 26, 30, 34]}
    assert [s["page_bytes"] for s in stages] == [
        19 * 41_984 + 7 * 8_448,
        19 * 41_984 + 4 * 8_448,
        20 * 41_984 + 5 * 8_448,
        20 * 41_984 + 5 * 8_448,
    ]
    assert sum(s["page_bytes"] for s in stages) == info["page_bytes"]
