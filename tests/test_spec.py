"""ModelCacheSpec: DSV4-Flash geometry, presets, validation."""

import numpy as np
import pytest

from jaxhicache.spec import (
    AttentionKind,
    HitPolicy,
    KVFormat,
    ModelCacheSpec,
    PageSpace,
    PoolKind,
    dsv4_ratios,
)

FLASH_ROW_BYTES = {
    PoolKind.SWA_KV: 149_760,
    PoolKind.C4_KV: 37_440,
    PoolKind.C4_INDEXER: 8_448,
    PoolKind.C128_KV: 1_728,
    PoolKind.C4_STATE: 65_536,
    PoolKind.C4_INDEXER_STATE: 16_384,
}


def test_flash_layer_pattern():
    s = ModelCacheSpec.deepseek_v4_flash()
    assert s.num_layers == 43
    assert len(s.compress_ratios) == 44 and s.compress_ratios[-1] == 0
    kinds = s.attention_kinds
    assert len(kinds) == 43  # the MTP slot is not a layer
    assert kinds[:2] == (AttentionKind.SWA, AttentionKind.SWA)
    assert [g for g, k in enumerate(kinds) if k is AttentionKind.CSA] == list(range(2, 43, 2))
    assert [g for g, k in enumerate(kinds) if k is AttentionKind.HCA] == list(range(3, 42, 2))
    assert s.hca_ratio == 128 and s.swa_trailing_pages == 1


@pytest.mark.parametrize("kind", list(FLASH_ROW_BYTES))
def test_flash_row_bytes(kind):
    s = ModelCacheSpec.deepseek_v4_flash()
    assert s.row_bytes(kind) == FLASH_ROW_BYTES[kind]


def test_flash_page_bytes():
    s = ModelCacheSpec.deepseek_v4_flash()
    assert s.page_bytes() == 9_158_208
    assert s.kinds() == tuple(FLASH_ROW_BYTES)  # no FULL_KV, no C128 state
    layers = {k: len(s.layers_with(k)) for k in s.kinds()}
    assert layers == {
        PoolKind.SWA_KV: 43,
        PoolKind.C4_KV: 21,
        PoolKind.C4_INDEXER: 21,
        PoolKind.C128_KV: 20,
        PoolKind.C4_STATE: 21,
        PoolKind.C4_INDEXER_STATE: 21,
    }


def test_pool_kind_spaces_and_policies():
    swa_space = {PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE}
    for k in PoolKind:
        assert (k.page_space is PageSpace.SWA) == (k in swa_space)
        assert (k.hit_policy is HitPolicy.TRAILING_PAGES) == (k in swa_space)


def test_tiny_presets_rows():
    mini = ModelCacheSpec.tiny_dsv4()
    assert mini.compress_ratios == (0, 0, 4, 8, 4, 8, 0)
    assert mini.row_shape(PoolKind.SWA_KV) == (16, 32)
    assert mini.row_shape(PoolKind.C4_KV) == (4, 32)
    assert mini.row_shape(PoolKind.C4_INDEXER) == (4, 16)
    assert mini.row_shape(PoolKind.C128_KV) == (2, 32)
    assert mini.row_shape(PoolKind.C4_STATE) == (8, 128)
    assert mini.row_shape(PoolKind.C4_INDEXER_STATE) == (8, 64)
    assert mini.row_bytes(PoolKind.SWA_KV) == 16 * 32 * 4
    faithful = ModelCacheSpec.tiny_dsv4(window=128, page_size=256, hca_ratio=128)
    assert faithful.row_shape(PoolKind.C128_KV) == (2, 32)
    assert faithful.row_shape(PoolKind.C4_KV) == (64, 32)


def test_page_bytes_is_sum_of_rows():
    s = ModelCacheSpec.tiny_dsv4(num_layers=9)
    want = sum(len(s.layers_with(k)) * s.row_bytes(k) for k in s.kinds())
    assert s.page_bytes() == want


def test_mha_spec():
    s = ModelCacheSpec.mha(
        num_layers=4, num_kv_heads=8, head_dim=64, page_size=16, dtype="bfloat16"
    )
    assert s.kinds() == (PoolKind.FULL_KV,)
    assert s.row_shape(PoolKind.FULL_KV) == (2, 16, 8, 64)
    assert s.row_bytes(PoolKind.FULL_KV) == 2 * 16 * 8 * 64 * 2
    assert s.page_bytes() == 4 * s.row_bytes(PoolKind.FULL_KV)
    assert s.attention_kinds == (AttentionKind.FULL,) * 4


@pytest.mark.parametrize(
    "dtype,itemsize", [("float32", 4), ("float16", 2), ("float8_e4m3fn", 1), ("uint8", 1)]
)
def test_mha_dtypes(dtype, itemsize):
    s = ModelCacheSpec.mha(2, 2, 8, 4, dtype=dtype)
    assert s.row_dtype(PoolKind.FULL_KV).itemsize == itemsize


def _dsv4(**kw):
    base = dict(
        name="t",
        num_layers=6,
        compress_ratios=dsv4_ratios(6, hca_ratio=8),
        page_size=16,
        window=8,
        head_dim=32,
        rope_dim=8,
        indexer_head_dim=16,
    )
    base.update(kw)
    return ModelCacheSpec(**base)


@pytest.mark.parametrize(
    "kw,match",
    [
        # each pattern names the field and the bad value, so a message about another
        # field (or one that drops the value) cannot satisfy it
        (
            dict(compress_ratios=(0, 0, 4, 8, 4, 8)),  # missing MTP slot
            r"compress_ratios must have num_layers \+ 1 = 7 entries .*got 6$",
        ),
        (
            dict(compress_ratios=(0, 0, 4, 8, 4, 8, 4)),
            r"trailing MTP entry of compress_ratios must be 0, got 4$",
        ),
        (
            dict(compress_ratios=(0, 0, 2, 8, 4, 8, 0)),
            r"compress ratios must be 0, 4 or one HCA ratio > 4; got \[2\]$",
        ),
        (
            dict(compress_ratios=(0, 0, 4, 8, 4, 16, 0), page_size=32),
            r"at most one HCA ratio, got \[8, 16\]$",
        ),
        (dict(page_size=18), r"page_size must be a multiple of 4, got 18$"),
        (
            dict(page_size=12, compress_ratios=dsv4_ratios(6, hca_ratio=12), window=8),
            r"page_size 12 must be a multiple of the C4 ring 8$",
        ),
        (dict(window=32), r"window must be in \[4, page_size=16\], got 32$"),
        (
            dict(page_size=24, compress_ratios=dsv4_ratios(6, hca_ratio=16)),
            r"page_size 24 must be a multiple of the HCA ratio 16$",
        ),
        (dict(num_layers=0, compress_ratios=(0,)), r"num_layers must be >= 1, got 0$"),
        (dict(rope_dim=32), r"rope_dim must be even and in \(0, head_dim=32\), got 32$"),
        (dict(rope_dim=7), r"rope_dim must be even .*got 7$"),
        (dict(num_kv_heads=2), r"\(num_kv_heads=1\), got 2$"),
        (dict(page_size=0), r"page_size must be >= 1, got 0$"),
        (dict(head_dim=0), r"head_dim must be >= 1, got 0$"),
        (dict(indexer_head_dim=0), r"indexer_head_dim must be >= 1, got 0$"),
        (dict(dtype="notadtype"), r"unknown dtype 'notadtype'$"),
    ],
)
def test_invalid_specs_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        _dsv4(**kw)


def test_unknown_pool_kind_for_spec():
    mha = ModelCacheSpec.mha(2, 2, 8, 4)
    with pytest.raises(ValueError, match=r"pool kind 'c4_state' is not cached by spec 'mha-"):
        mha.row_bytes(PoolKind.C4_STATE)
    with pytest.raises(ValueError, match=r"pool kind 'full_kv' is not cached by spec 'tiny-dsv4"):
        ModelCacheSpec.tiny_dsv4().row_shape(PoolKind.FULL_KV)
    with pytest.raises(ValueError, match=r"not a PoolKind: 'swa_kv_typo'"):
        ModelCacheSpec.tiny_dsv4().row_shape("swa_kv_typo")


def test_fp8_format_tiny_is_bytes():
    s = ModelCacheSpec.tiny_dsv4(kv_format=KVFormat.FP8_DSV4)
    assert s.row_dtype(PoolKind.SWA_KV) == np.uint8
    assert s.row_bytes(PoolKind.SWA_KV) % 576 == 0
    assert s.row_dtype(PoolKind.C4_STATE) == np.float32


def test_tiny_preset_with_explicit_layer_ratios():
    s = ModelCacheSpec.tiny_dsv4(3, compress_ratios=(0, 0, 4))
    assert s.compress_ratios == (0, 0, 4, 0)  # the MTP slot is appended
    assert s.hca_ratio is None and PoolKind.C128_KV not in s.kinds()
    assert ModelCacheSpec.tiny_dsv4(6, compress_ratios=dsv4_ratios(6, hca_ratio=8)[:-1]) == (
        ModelCacheSpec.tiny_dsv4(6)
    )
    with pytest.raises(
        ValueError, match=r"compress_ratios \(0, 0, 4, 0\) has 4 layers, num_layers is 3"
    ):
        ModelCacheSpec.tiny_dsv4(3, compress_ratios=(0, 0, 4, 0))
    with pytest.raises(ValueError, match=r"compress_ratios has HCA ratios \[16\], hca_ratio is 8"):
        ModelCacheSpec.tiny_dsv4(4, compress_ratios=(0, 0, 4, 16))
