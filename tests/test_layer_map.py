"""Stage-local layer maps: DSV4 numbers, properties, the reference bug, bad inputs."""

import functools
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxhicache.layer_map import (
    StageLayerMap,
    build_layer_maps,
    build_stage_layer_map,
    check_stage_layer_map,
    check_stage_view,
    pp_partition,
    stack_layer_maps,
)
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind

FLASH = ModelCacheSpec.deepseek_v4_flash()


def _counts(m: StageLayerMap):
    kinds = m.attention_kinds
    return (
        kinds.count(AttentionKind.CSA),
        kinds.count(AttentionKind.HCA),
        kinds.count(AttentionKind.SWA),
    )


@pytest.mark.parametrize(
    "pp,expected",
    [
        (1, [((0, 43), (21, 20, 2))]),
        (2, [((0, 21), (10, 9, 2)), ((21, 43), (11, 11, 0))]),
        (
            4,
            [
                ((0, 10), (4, 4, 2)),
                ((10, 21), (6, 5, 0)),
                ((21, 32), (5, 6, 0)),
                ((32, 43), (6, 5, 0)),
            ],
        ),
    ],
)
def test_flash_stage_counts(pp, expected):
    maps = build_layer_maps(FLASH, pp)
    got = [((m.start_layer, m.end_layer), _counts(m)) for m in maps]
    assert got == expected
    for m, (_, (c4, c128, _)) in zip(maps, expected, strict=True):
        assert m.num_layers_of(PoolKind.C4_KV) == c4 == m.num_layers_of(PoolKind.C4_STATE)
        assert m.num_layers_of(PoolKind.C128_KV) == c128
        assert m.num_layers_of(PoolKind.SWA_KV) == m.num_local_layers


def test_flash_pp2_rank1_c4_state_global_ids():
    m = build_stage_layer_map(FLASH, pp_rank=1, pp_size=2)
    np.testing.assert_array_equal(m.subpool_to_global(PoolKind.C4_STATE), np.arange(22, 43, 2))
    np.testing.assert_array_equal(m.kind_local_ids(PoolKind.C4_STATE), np.arange(1, 22, 2))
    assert m.local_to_subpool(PoolKind.C4_STATE)[:3].tolist() == [-1, 0, -1]


def test_reference_bug_scenario_global_list_with_local_ids():
    """Reproduce the reference bug: a global-length list of per-layer state pools
    indexed with a stage's local ids returns None / another layer's pool on stage > 0.
    Our API (global_id / subpool_to_global) gives the right pool on every stage."""
    spec = FLASH
    state_pools = [
        (f"c4_state_pool[{g}]" if spec.layer_has(PoolKind.C4_STATE, g) else None)
        for g in range(spec.num_layers)
    ]
    for pp in (2, 4):
        for m in build_layer_maps(spec, pp):
            local_ids = m.kind_local_ids(PoolKind.C4_STATE)
            buggy = [state_pools[lid] for lid in local_ids]
            ours = [state_pools[m.global_id(int(lid))] for lid in local_ids]
            assert ours == [f"c4_state_pool[{g}]" for g in m.subpool_to_global(PoolKind.C4_STATE)]
            assert None not in ours
            if m.pp_rank > 0:  # the bug shows on every stage after the first
                assert buggy != ours
    # a local id can never reach a sub-pool it does not belong to
    m = build_stage_layer_map(spec, 1, 2)
    with pytest.raises(ValueError, match="has no c4_state row"):
        m.subpool_id(PoolKind.C4_STATE, 0)  # global 21 is an HCA layer
    with pytest.raises(ValueError, match="not on stage 1"):
        m.global_to_local(3)


@pytest.mark.parametrize(
    "args,needle",
    [
        ((43, 0), "pp_size must be >= 1, got 0"),
        ((43, 44), "pp_size 44 exceeds num_layers 43"),
        ((0, 1), "num_layers must be >= 1, got 0"),
        ((43, 2, [20, 22]), "sums to 42"),
        ((43, 2, [43, 0]), "[43, 0]"),
        ((43, 3, [20, 23]), "pp_size is 3"),
    ],
)
def test_partition_bad_inputs(args, needle):
    with pytest.raises(ValueError) as e:
        pp_partition(*args)
    assert needle in str(e.value)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="pp_rank 2 not in"):
        build_stage_layer_map(FLASH, 2, 2)
    with pytest.raises(ValueError, match="pp_rank -1 not in"):
        build_stage_layer_map(FLASH, -1, 2)


def test_explicit_partition_overrides_rule():
    assert pp_partition(43, 4) == [(0, 10), (10, 21), (21, 32), (32, 43)]
    assert pp_partition(43, 4, [11, 11, 11, 10]) == [(0, 11), (11, 22), (22, 33), (33, 43)]
    assert pp_partition(7, 3) == [(0, 2), (2, 4), (4, 7)]  # remainder to the last stage


def test_builder_catches_inconsistent_map():
    m = build_stage_layer_map(FLASH, 1, 2)
    broken = dict(m._subpool_of_local)
    l2s = list(broken[PoolKind.C4_KV])
    l2s[1], l2s[3] = l2s[3], l2s[1]  # sub-pool ids no longer ascending in local order
    broken[PoolKind.C4_KV] = tuple(l2s)
    bad = StageLayerMap(m.spec, m.pp_rank, m.pp_size, m.start_layer, m.end_layer, broken)
    with pytest.raises(AssertionError):
        check_stage_layer_map(bad)


# ------------------------------------------------------------------ properties


@st.composite
def spec_and_partition(draw):
    num_layers = draw(st.integers(1, 128))
    mha = draw(st.booleans())
    if mha:
        spec = ModelCacheSpec.mha(num_layers, 2, 8, 4, dtype="float32")
    else:
        hca = draw(st.sampled_from([8, 16, 128]))
        spec = ModelCacheSpec.tiny_dsv4(num_layers, window=8, page_size=max(16, hca), hca_ratio=hca)
    pp = draw(st.integers(1, min(16, num_layers)))
    partition = None
    if draw(st.booleans()) and pp > 1:
        cuts = sorted(
            draw(
                st.lists(
                    st.integers(1, num_layers - 1), min_size=pp - 1, max_size=pp - 1, unique=True
                )
            )
        )
        bounds = [0, *cuts, num_layers]
        partition = [b - a for a, b in itertools.pairwise(bounds)]
    return spec, pp, partition


@settings(max_examples=150, deadline=None)
@given(spec_and_partition())
def test_layer_map_properties(args):
    spec, pp, partition = args
    maps = build_layer_maps(spec, pp, partition)
    owner = np.full(spec.num_layers, -1)
    for m in maps:
        assert (owner[m.local_to_global] == -1).all()  # every global layer in one stage
        owner[m.local_to_global] = m.pp_rank
        for lid in range(m.num_local_layers):
            assert m.global_to_local(m.global_id(lid)) == lid
        for kind in spec.kinds():
            l2s = m.local_to_subpool(kind)
            s2g = m.subpool_to_global(kind)
            n = m.num_layers_of(kind)
            assert sorted(l2s[l2s >= 0].tolist()) == list(range(n))  # dense
            np.testing.assert_array_equal(s2g, m.start_layer + m.kind_local_ids(kind))
            for k in range(n):
                assert m.subpool_id(kind, m.global_to_local(int(s2g[k]))) == k
    assert (owner >= 0).all()
    if partition is not None:
        assert [m.num_local_layers for m in maps] == partition

    stacked = stack_layer_maps(maps)
    for m in maps:
        v = jax.tree.map(np.asarray, stacked).stage_at(m.pp_rank)
        n = m.num_local_layers
        assert int(v.start_layer) == m.start_layer and int(v.num_local_layers) == n
        np.testing.assert_array_equal(np.asarray(v.local_to_global)[:n], m.local_to_global)
        assert (np.asarray(v.local_to_global)[n:] == -1).all()
        assert np.asarray(v.layer_valid).sum() == n
        np.testing.assert_array_equal(
            np.asarray(v.attention_kind)[:n], [int(a) for a in m.attention_kinds]
        )
        for kind in spec.kinds():
            np.testing.assert_array_equal(
                np.asarray(v.local_to_subpool[kind])[:n], m.local_to_subpool(kind)
            )
            k = m.num_layers_of(kind)
            np.testing.assert_array_equal(
                np.asarray(v.subpool_to_global[kind])[:k], m.subpool_to_global(kind)
            )
            assert np.asarray(v.subpool_valid[kind]).sum() == k


# ------------------------------------------------------- traced form in shard_map


@pytest.mark.parametrize("pp", [2, 4])
def test_traced_stage_view_inside_shard_map(pp):
    spec = FLASH
    maps = build_layer_maps(spec, pp)
    stacked = stack_layer_maps(maps)
    mesh = make_mesh(pp, 8 // pp)
    P = jax.sharding.PartitionSpec

    def body():
        v = stacked.stage("pp")
        s2g = v.subpool_to_global[PoolKind.C4_STATE]
        return v.start_layer[None], s2g[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=(), out_specs=(P("pp"), P("pp")), check_vma=False)
    starts, s2g = jax.jit(f)()
    assert np.asarray(starts).tolist() == [m.start_layer for m in maps]
    for m in maps:
        n = m.num_layers_of(PoolKind.C4_STATE)
        np.testing.assert_array_equal(
            np.asarray(s2g)[m.pp_rank, :n], m.subpool_to_global(PoolKind.C4_STATE)
        )


def test_chexified_stage_view_check():
    stacked = stack_layer_maps(build_layer_maps(FLASH, 4))

    @functools.partial(chex.chexify, async_check=False)
    @jax.jit
    def good(rank):
        v = stacked.stage_at(rank)
        check_stage_view(v)
        return v.start_layer

    assert int(good(jnp.int32(3))) == 32
    chex.block_until_chexify_assertions_complete()

    bad_stacked = stacked.replace(start_layer=stacked.start_layer + 1)  # off-by-one stage start

    @functools.partial(chex.chexify, async_check=False)
    @jax.jit
    def bad(rank):
        v = bad_stacked.stage_at(rank)
        check_stage_view(v)
        return v.start_layer

    with pytest.raises(AssertionError):
        bad(jnp.int32(2))
        chex.block_until_chexify_assertions_complete()


# ----------------------------------------------------- exact-integer inputs only

NOT_INTEGERS = [1.5, 11.0, True, False, np.bool_(True), "1", None, np.float32(1.0)]


def _bad_int(value):
    """The ``match`` pattern of the error for a rejected non-integer ``value``."""
    return rf"must be an integer.*got {re.escape(repr(value))} "


@pytest.mark.parametrize(
    "partition,bad",
    [
        ([10.7, 11, 11, 11], 10.7),  # the issue's example: int() would truncate it to 10
        ([11.0, 11, 11, 10], 11.0),  # integral floats are floats too
        (["11", 11, 11, 10], "11"),
        ([True, 14, 14, 14], True),
        ([11, 11, 11, None], None),
        ([11, 11, 11, np.float64(10)], np.float64(10)),
    ],
)
def test_partition_rejects_non_integer_counts(partition, bad):
    with pytest.raises(ValueError, match=_bad_int(bad)):
        pp_partition(43, 4, partition)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        build_layer_maps(FLASH, 4, partition)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        build_stage_layer_map(FLASH, 0, 4, partition)


@pytest.mark.parametrize("partition", ["11111111", b"\x0b\x0b", 43, 43.0])
def test_partition_must_be_a_sequence_of_counts(partition):
    with pytest.raises(ValueError, match=re.escape(repr(partition))):
        pp_partition(43, 4, partition)


@pytest.mark.parametrize("bad", NOT_INTEGERS)
def test_counts_and_ranks_reject_non_integers(bad):
    with pytest.raises(ValueError, match=_bad_int(bad)):
        pp_partition(bad, 1)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        pp_partition(43, bad)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        build_layer_maps(FLASH, bad)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        build_stage_layer_map(FLASH, bad, 2)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        build_stage_layer_map(FLASH, 0, bad)


def test_pp_rank_float_is_a_value_error():
    """The issue's example: ``pp_rank=1.5`` used to raise ``TypeError`` (list index)."""
    with pytest.raises(ValueError, match=r"pp_rank must be an integer.*got 1\.5 "):
        build_stage_layer_map(FLASH, pp_rank=1.5, pp_size=2)
    with pytest.raises(ValueError, match=r"pp_rank must be an integer.*got 1\.0 "):
        build_stage_layer_map(FLASH, pp_rank=1.0, pp_size=2)


@pytest.mark.parametrize("bad", NOT_INTEGERS)
def test_layer_ids_reject_non_integers(bad):
    """``global_id(1.5)`` / ``global_id(True)`` used to return an id."""
    m = build_stage_layer_map(FLASH, 1, 2)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        m.global_id(bad)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        m.subpool_id(PoolKind.SWA_KV, bad)
    with pytest.raises(ValueError, match=_bad_int(bad)):
        m.global_to_local(bad)
    stacked = stack_layer_maps(build_layer_maps(FLASH, 2))
    with pytest.raises(ValueError, match=_bad_int(bad)):
        stacked.stage_at(bad)


def test_issue_examples_global_id():
    m = build_stage_layer_map(FLASH, 0, 2)
    with pytest.raises(ValueError, match=r"local layer must be an integer.*got 1\.5 "):
        m.global_id(1.5)
    with pytest.raises(ValueError, match=r"local layer must be an integer.*got True "):
        m.global_id(True)


def test_numpy_integers_are_accepted():
    """numpy integer scalars and 0-d integer arrays are exact integers: accepted, same result."""
    want = build_layer_maps(FLASH, 4, [11, 11, 11, 10])
    for conv in (np.int32, np.int64, np.uint8, lambda x: np.array(x, np.int64)):
        got = build_layer_maps(FLASH, conv(4), [conv(c) for c in (11, 11, 11, 10)])
        assert [(m.start_layer, m.end_layer) for m in got] == [
            (m.start_layer, m.end_layer) for m in want
        ]
        assert all(type(m.pp_rank) is int and type(m.pp_size) is int for m in got)
        m = build_stage_layer_map(FLASH, conv(1), conv(2))
        assert m.start_layer == 21 and type(m.pp_rank) is int
        assert m.global_id(conv(3)) == 24 and type(m.global_id(conv(3))) is int
        assert m.global_to_local(conv(24)) == 3
        assert m.subpool_id(PoolKind.C4_STATE, conv(1)) == 0
        stacked = stack_layer_maps(build_layer_maps(FLASH, 2))
        assert int(stacked.stage_at(conv(1)).start_layer) == 21
    assert pp_partition(43, 4, np.array([11, 11, 11, 10])) == pp_partition(43, 4, [11, 11, 11, 10])
    # local_to_subpool / kind_local_ids give int32 arrays whose elements index back in
    m = build_stage_layer_map(FLASH, 1, 2)
    for lid in m.kind_local_ids(PoolKind.C4_STATE):
        assert m.subpool_id(PoolKind.C4_STATE, lid) == m.local_to_subpool(PoolKind.C4_STATE)[lid]


def test_stage_at_checks_rank():
    stacked = stack_layer_maps(build_layer_maps(FLASH, 2))
    with pytest.raises(ValueError, match=r"rank 2 not in \[0, 2\)"):
        stacked.stage_at(2)
    with pytest.raises(ValueError, match=r"rank -1 not in \[0, 2\)"):
        stacked.stage_at(-1)  # numpy would silently pick the last stage
    with pytest.raises(ValueError, match="integer scalar, got a float32"):
        stacked.stage_at(jnp.float32(1.0))
    with pytest.raises(ValueError, match="integer scalar, got a int32 array of shape"):
        stacked.stage_at(jnp.array([1], jnp.int32))
    assert int(jax.jit(lambda r: stacked.stage_at(r).start_layer)(jnp.int32(1))) == 21
