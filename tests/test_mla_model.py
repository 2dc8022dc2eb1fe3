"""The tiny MLA + DSA model: paged (PP 1, PP 2 split [1, 3], PP 2 x TP 2) equals the dense
reference; the DSA_INDEXER bytes decode to the keys the indexer used; a prefix copied
into new pages continues exactly like the uninterrupted run.

The config has indexers on layers 0 and 2 of 4 only, so on stage 1 of the [1, 3] split
layer 2 is stage-local layer 1 but DSA_INDEXER sub-pool row 0.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from mla_common import CFG, MIN_MARGIN, PAGE, TOL, diff, model, reference, tokens

from jaxhicache.spec import AttentionKind, PoolKind
from models.mla_config import TinyMLAConfig
from models.restore import restore_prefix

LAT, IDX = PoolKind.MLA_LATENT, PoolKind.DSA_INDEXER
NUM_PAGES = 16
TABLE = np.array([11, 3, 14, 6, -1, -1, -1, -1], np.int32)  # scattered page ids, bucket 8
PROMPT, NEW = 40, 13  # prefill in chunks 16 + 16 + 8 (padded), then 12 decode steps
SEED = 2  # reference top-k margins >= 1.1e-3 (the smallest over 30 seeds: 5e-6)


def _greedy(m, prompt, n_new, table):
    """Chunked prefill, then greedy decode: ``(logits of every fed token, prompt + generated,
    pools)``."""
    pools = m.init_pools(NUM_PAGES, 0)
    logits, pools, scratch = m.prefill(pools, prompt, 0, table, table)
    rows, seq = [logits], [int(t) for t in prompt]
    tok = int(np.argmax(logits[-1]))
    for _ in range(n_new - 1):
        seq.append(tok)
        last, pools, scratch = m.decode_step(pools, tok, len(seq) - 1, table, table, scratch)
        rows.append(last[None])
        tok = int(np.argmax(last))
    seq.append(tok)
    return np.concatenate(rows), np.asarray(seq, np.int32), pools


def test_config_validation():
    assert CFG.attention_kinds == (
        AttentionKind.MLA_DSA,
        AttentionKind.MLA,
        AttentionKind.MLA_DSA,
        AttentionKind.MLA,
    )
    assert CFG.cache_spec() is CFG.cache_spec()
    assert CFG.cache_spec().kv_lora_rank == CFG.kv_lora_rank
    with pytest.raises(ValueError, match="layer 0 must own"):
        TinyMLAConfig.mini(indexer_layers=(1, 2))
    with pytest.raises(ValueError, match="indexer layer 7"):
        TinyMLAConfig.mini(indexer_layers=(0, 7))
    with pytest.raises(ValueError, match="rope_dim"):
        TinyMLAConfig.mini(rope_dim=3)


@pytest.mark.parametrize("layout", ["pp1", "pp2", "pp2tp2"])
def test_paged_matches_dense_reference(layout):
    m = model(layout)
    if layout == "pp2":  # the index spaces differ on stage 1: local 1 is indexer row 0
        stage1 = m.layer_maps[1]
        assert stage1.global_id(1) == 2 and stage1.subpool_id(IDX, 1) == 0
    logits, seq, _ = _greedy(m, tokens(SEED, PROMPT), NEW, TABLE)
    ref, margins, _ = reference(seq[:-1])
    d, margin = diff(logits, ref), float(np.min(margins))
    assert d <= TOL, f"max |Δlogit| {d:.3g} (smallest top-k margin {margin:.3g})"
    np.testing.assert_array_equal(np.argmax(ref[PROMPT - 1 :], axis=-1), seq[PROMPT:])
    assert margin > MIN_MARGIN  # no near-tie in any selection: the comparison was fair


def test_indexer_bytes_decode_to_the_keys_used():
    """Row layout: a page's fp8 key bytes token-major, then its fp32 scales (little-endian);
    the decoded keys equal the reference's dequantized keys, slots not yet written are 0."""
    m = model("pp2")
    prompt = tokens(SEED, PROMPT)
    pools = m.init_pools(NUM_PAGES, 0)
    _, pools, _ = m.prefill(pools, prompt, 0, TABLE, TABLE)
    _, _, ref_keys = reference(prompt)
    rows = m.global_layer_rows(pools, IDX)
    dim = CFG.index_head_dim
    assert [g for g, r in enumerate(rows) if r is not None] == list(CFG.owner_layers)
    n_pages = -(-PROMPT // PAGE)
    for o, g in enumerate(CFG.owner_layers):
        r = rows[g][TABLE[:n_pages]]  # [pages, page * (dim + 4)] uint8
        assert r.dtype == np.uint8 and r.shape[1] == PAGE * (dim + 4)
        k8 = r[:, : PAGE * dim].reshape(-1, dim).view(ml_dtypes.float8_e4m3fn)
        scale = np.ascontiguousarray(r[:, PAGE * dim :]).view("<f4").reshape(-1)
        keys = k8.astype(np.float32) * scale[:, None]
        assert np.all(np.log2(scale[:PROMPT]) == np.round(np.log2(scale[:PROMPT])))
        assert np.abs(k8[:PROMPT].astype(np.float32)).max() <= 448
        np.testing.assert_array_equal(keys[:PROMPT], ref_keys[o], err_msg=f"layer {g}")
        assert not r[-1, (PROMPT % PAGE) * dim : PAGE * dim].any()  # unwritten key slots
        assert not scale[PROMPT:].any()
        assert np.abs(keys[:PROMPT]).max() > 0


def _poison(spec, arrays, pages):
    """The source pages made unreadable: NaN latents, 0xFF (fp8 NaN) indexer bytes."""
    import jax

    out = {}
    for kind, arr in arrays.items():
        host = np.array(arr)
        host[:, :, pages] = np.nan if kind is LAT else 0xFF
        out[kind] = jax.device_put(host, arr.sharding)
    return out


@pytest.mark.parametrize(
    "skip", [None, {IDX: [1]}, {LAT: [0]}], ids=["restore", "control-indexer", "control-latent"]
)
def test_restored_prefix_continues_exactly(skip):
    """Pages [0, 32) copied into new page ids (the source wiped), the rest prefilled from
    32: the logits equal the uninterrupted run's bit for bit. Controls: one indexer page or
    one latent page left out of the copy changes them."""
    m = model("pp2")
    prompt = tokens(11, 56)
    src = np.array([2, 9, 4, 12, -1, -1, -1, -1], np.int32)
    dst = np.array([7, 0, 15, 5, -1, -1, -1, -1], np.int32)
    pools = m.init_pools(NUM_PAGES, 0)
    whole, pools, _ = m.prefill(pools, prompt, 0, src, src)
    arrays, (full, _) = restore_prefix(m.spec, dict(pools.arrays), 32, src, src, dst, dst, skip)
    pools = pools.replace(arrays=_poison(m.spec, arrays, src[:4]))
    rest, pools, _ = m.prefill(pools, prompt[32:], 32, full, full)
    if skip is None:
        np.testing.assert_array_equal(rest, whole[32:])
    else:
        assert diff(rest, whole[32:]) > TOL
