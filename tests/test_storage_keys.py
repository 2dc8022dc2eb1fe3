"""L3 keys: page hash chains, salts, namespaces and object keys."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.spec import PAGE_SPACES, KVFormat, ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.storage import Namespace, object_key, page_hashes, stored_bytes_per_page

P = 16


def _reference_chain(tokens, page_size, root=b""):
    """The definition, written independently: sha256(prev digest || '<i' packed ids)."""
    out, prev = [], root
    for i in range(len(tokens) // page_size):
        page = tokens[i * page_size : (i + 1) * page_size]
        d = hashlib.sha256(prev + struct.pack(f"<{page_size}i", *page)).digest()
        out.append(d.hex())
        prev = d
    return out


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2**31 - 1, n).tolist()


def test_page_hashes_match_the_definition_and_ignore_a_partial_page():
    toks = _tokens(3 * P + 5)
    got = page_hashes(toks, P)
    assert got == _reference_chain(toks, P)
    assert len(got) == 3
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in got)
    assert page_hashes(np.asarray(toks, np.int64), P) == got  # dtype does not matter
    assert page_hashes(toks[: P - 1], P) == []


def test_page_hashes_chain_every_page_to_its_whole_prefix():
    toks = _tokens(4 * P)
    a = page_hashes(toks, P)
    other = list(toks)
    other[0] += 1  # change only the first page
    b = page_hashes(other, P)
    assert all(x != y for x, y in zip(a, b, strict=True))
    # continuing a chain from its parent equals hashing the whole prefix
    assert page_hashes(toks[2 * P :], P, parent=a[1]) == a[2:]


def test_salt_enters_the_first_page_and_separates_tenants_everywhere():
    toks = _tokens(3 * P)
    plain = page_hashes(toks, P)
    s1 = page_hashes(toks, P, salt="tenant-a")
    s2 = page_hashes(toks, P, salt="tenant-b")
    root = hashlib.sha256(b"jaxhicache/salt\x00tenant-a").digest()
    assert s1 == _reference_chain(toks, P, root)
    for a, b, c in zip(plain, s1, s2, strict=True):
        assert len({a, b, c}) == 3
    assert page_hashes(toks, P, salt=b"tenant-a") == s1
    assert page_hashes(toks, P, salt="") == plain  # empty salt = no salt
    # a salted chain continues like any chain: the salt is inside its first hash
    assert page_hashes(toks[P:], P, parent=s1[0]) == s1[1:]
    with pytest.raises(ValueError, match="salt"):
        page_hashes(toks, P, salt="x", parent=s1[0])


@pytest.mark.parametrize(
    ("tokens", "page_size", "match"),
    [
        ([2**31] * P, P, "int32"),
        ([-(2**31) - 1] * P, P, "int32"),
        ([1.5] * P, P, "integers"),
        ([[1] * P], P, "one-dimensional"),
        ([1] * P, 0, "page_size"),
        ([1] * P, True, "page_size"),
    ],
)
def test_page_hashes_reject_bad_input(tokens, page_size, match):
    with pytest.raises(ValueError, match=match):
        page_hashes(tokens, page_size)


def test_page_hashes_do_not_depend_on_the_process():
    """No Python hash(): two interpreters with different hash seeds agree."""
    code = "from jaxhicache.storage import page_hashes; print(page_hashes(list(range(64)), 16, salt='s')[-1])"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu")
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(r.stdout.strip())
    assert outs == {page_hashes(list(range(64)), 16, salt="s")[-1]}


H = "ab" * 32


def test_namespace_keys_carry_the_layer_range_not_the_rank():
    spec = ModelCacheSpec.deepseek_v4_flash()
    pp2, pp4 = build_layer_maps(spec, 2), build_layer_maps(spec, 4)
    k2 = object_key(Namespace.for_stage(spec, pp2[1]), PageSpace.FULL, H)
    k4 = object_key(Namespace.for_stage(spec, pp4[1]), PageSpace.FULL, H)
    assert "/layers-21-43/" in k2 and "/layers-10-21/" in k4
    assert k2 != k4
    assert k2.startswith("jaxhicache/v2/deepseek-v4-flash/fp8_dsv4-")
    assert k2.endswith(f"/full/ab/{H}")
    # same model and partition -> same key (two instances share objects)
    again = build_layer_maps(ModelCacheSpec.deepseek_v4_flash(), 2)
    assert object_key(Namespace.for_stage(spec, again[1]), PageSpace.FULL, H) == k2
    # an explicit partition with the same range shares too
    expl = build_layer_maps(spec, 2, partition=[21, 22])
    assert object_key(Namespace.for_stage(spec, expl[1]), PageSpace.FULL, H) == k2
    # DSV4's single KV head is replicated: no TP segment
    assert "/tp-" not in object_key(
        Namespace.for_stage(spec, pp2[1], tp_rank=1, tp_size=2), PageSpace.FULL, H
    )


def test_units_of_spaces_and_kinds_never_collide():
    spec = ModelCacheSpec.tiny_dsv4()
    ns = Namespace.for_stage(spec, build_layer_maps(spec, 1)[0])
    keys = {object_key(ns, u, H) for u in [*PageSpace, *spec.kinds()]}
    assert len(keys) == len(PageSpace) + len(spec.kinds())
    assert ns.stage_kinds == spec.kinds()


def test_format_and_model_id_separate_namespaces():
    a = ModelCacheSpec.tiny_dsv4()
    b = ModelCacheSpec.tiny_dsv4(kv_format=KVFormat.FP8_DSV4, name=a.name)
    c = ModelCacheSpec.tiny_dsv4(head_dim=64, name=a.name)
    keys = {
        object_key(Namespace.for_stage(s, build_layer_maps(s, 1)[0]), PageSpace.FULL, H)
        for s in (a, b, c)
    }
    assert len(keys) == 3
    m = build_layer_maps(a, 1)[0]
    k = object_key(Namespace.for_stage(a, m, model_id="org/model v2"), PageSpace.FULL, H)
    assert "/org%2Fmodel%20v2/" in k
    assert object_key(Namespace.for_stage(a, m, model_id="org%2Fmodel v2"), PageSpace.FULL, H) != k


def test_tp_rank_and_size_enter_keys_of_sharded_pools_only():
    spec = ModelCacheSpec.mha(2, num_kv_heads=4, head_dim=8, page_size=4, dtype="float32")
    m = build_layer_maps(spec, 1)[0]
    keys = {
        object_key(Namespace.for_stage(spec, m, tp_rank=r, tp_size=n), PageSpace.FULL, H)
        for r, n in [(0, 2), (1, 2), (0, 4)]
    }
    assert len(keys) == 3
    assert all("/tp-" in k for k in keys)
    assert "/tp-1-of-2/" in object_key(
        Namespace.for_stage(spec, m, tp_rank=1, tp_size=2), PoolKind.FULL_KV, H
    )
    assert "/tp-" not in object_key(Namespace.for_stage(spec, m, tp_size=1), PageSpace.FULL, H)
    with pytest.raises(ValueError, match="tp_rank"):
        Namespace.for_stage(spec, m, tp_size=2)


@pytest.mark.parametrize("bad", ["../" * 20 + "etc", "AB" * 32, "ab" * 31, 12])
def test_object_key_rejects_what_is_not_a_page_hash(bad):
    spec = ModelCacheSpec.tiny_dsv4()
    ns = Namespace.for_stage(spec, build_layer_maps(spec, 1)[0])
    with pytest.raises(ValueError, match="page hash"):
        object_key(ns, PageSpace.FULL, bad)


def test_flash_stored_bytes_per_page_by_space():
    spec = ModelCacheSpec.deepseek_v4_flash()
    full = stored_bytes_per_page(spec, None, PageSpace.FULL)
    swa = stored_bytes_per_page(spec, None, PageSpace.SWA)
    assert full == 21 * 37_440 + 21 * 8_448 + 20 * 1_728 == 998_208
    # the window: SWA KV of the last 127 tokens (584 B each), A halves of the last
    # 4 ring slots of the C4 state (4 x 2 x 512 fp32) and C4 indexer state (4 x 2 x 128)
    assert spec.fp8_token_bytes == 584
    assert swa == 43 * 127 * 584 + 21 * 4 * 2 * 512 * 4 + 21 * 4 * 2 * 128 * 4 == 3_619_304
    assert full + 43 * 149_760 + 21 * 65_536 + 21 * 16_384 == spec.page_bytes() == 9_158_208
    maps = build_layer_maps(spec, 4)
    assert sum(stored_bytes_per_page(spec, m, s) for m in maps for s in PAGE_SPACES) == full + swa
    # per million tokens (3906.25 pages): SWA objects at every page, every 16th page
    per_mtok = 1e6 / spec.page_size
    assert (full + swa) * per_mtok / 1e9 < 18.25  # the reference system, no checkpoints
    assert (full + swa / 16) * per_mtok / 1e9 <= 5.2
