"""Shared fixtures of the MLA + DSA model tests: one model per layout for the whole
session (its compiled programs are reused by every test file that asks for it)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jaxhicache.mesh import make_mesh
from models.mla import init_mla_params, mla_reference_with_margins
from models.mla_config import TinyMLAConfig
from models.mla_paged import PagedMLAModel

CFG = TinyMLAConfig.shared()  # 4 layers, indexers on layers 0 and 2, page 16, top-8
PAGE = CFG.page_size
TOL = 1e-4  # max |Δlogit| paged vs dense / cached vs uncached (observed ~1e-5)
MIN_MARGIN = 1e-4  # indexer top-k gaps below this could flip on fp32 noise
LAYOUTS = {"pp1": (1, 1, None), "pp2": (2, 1, [1, 3]), "pp2tp2": (2, 2, [1, 3])}


@functools.cache
def params():
    return init_mla_params(CFG, seed=0)


@functools.cache
def model(layout: str) -> PagedMLAModel:
    pp, tp, partition = LAYOUTS[layout]
    if len(jax.devices()) < pp * tp:
        pytest.skip(f"needs {pp * tp} devices")
    return PagedMLAModel(CFG, params(), mesh=make_mesh(pp, tp), partition=partition)


def reference(tokens):
    """``(logits, margins, keys)`` of the dense reference, as numpy."""
    return tuple(np.asarray(x) for x in mla_reference_with_margins(CFG, params(), tokens))


def tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab, n).astype(np.int32)


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
