"""Tests of kernels_pallas.common: default backend, bucket sizes, page-id checks,
PagedCopyTuning validation, and the kernel word (packing) selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.common import (
    Backend,
    PagedCopyTuning,
    _kernel_word,
    bucket_size,
    default_backend,
    validate_page_ids,
)


def test_default_backend_and_bucket_size():
    assert default_backend() == (Backend.TRITON if jax.default_backend() == "gpu" else Backend.XLA)
    assert [bucket_size(n) for n in (0, 1, 2, 3, 5, 8, 9, 1000)] == [
        1, 1, 2, 4, 8, 8, 16, 1024,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="-1"):
        bucket_size(-1)


def test_validate_page_ids():
    out = validate_page_ids([4, 0, 4], 5, unique=False)
    assert out.dtype == np.int32 and out.tolist() == [4, 0, 4]
    with pytest.raises(ValueError, match=r"\[4\]"):
        validate_page_ids([4, 0, 4], 5, unique=True)
    with pytest.raises(ValueError, match=r"\[5\]"):
        validate_page_ids(np.array([5]), 5, unique=False)
    with pytest.raises(ValueError, match="1-D"):
        validate_page_ids([[1]], 5, unique=False)
    with pytest.raises(ValueError, match="integers"):
        validate_page_ids([1.0], 5, unique=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_warps": 3}, "num_warps=3"),
        ({"num_warps": 64}, "num_warps=64"),
        ({"num_warps": 0}, "num_warps=0"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"num_stages": 9}, "num_stages=9"),
        ({"chunk_elems": 1000}, "chunk_elems=1000"),
        ({"chunk_elems": 8}, "chunk_elems=8"),
        ({"chunk_elems": 1 << 17}, "chunk_elems=131072"),
        ({"num_warps": 4.0}, "4.0"),
        ({"num_stages": True}, "True"),
        ({"pack_words": 1}, "pack_words"),
    ],
)
def test_bad_tuning_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedCopyTuning(**kwargs)


def test_tuning_is_frozen_and_hashable():
    t = PagedCopyTuning(num_warps=8, num_stages=2, chunk_elems=1024)
    assert hash(t) == hash(PagedCopyTuning(num_warps=8, num_stages=2, chunk_elems=1024))
    with pytest.raises(AttributeError):
        t.num_warps = 2  # type: ignore[misc]


def test_kernel_word_selection():
    u8 = np.dtype(jnp.uint8)
    assert _kernel_word(u8, 149_760, 1 << 20, False) == u8
    assert _kernel_word(u8, 149_760, 1 << 20, True) == np.uint32
    assert _kernel_word(u8, 149_760, 3 << 30, False) == np.uint32  # > 2 GiB: packed
    assert _kernel_word(u8, 6, 3 << 30, False) == np.uint16
    with pytest.raises(ValueError, match="149759"):
        _kernel_word(u8, 149_759, 3 << 30, False)
    fp8 = np.dtype(jnp.float8_e4m3fn)
    assert _kernel_word(fp8, 7, 100, False) == np.uint8  # fp8 copied as bytes
    assert _kernel_word(np.dtype(jnp.bfloat16), 7, 100, False) == jnp.bfloat16
    assert _kernel_word(np.dtype(jnp.bfloat16), 8, 100, True) == np.uint32
