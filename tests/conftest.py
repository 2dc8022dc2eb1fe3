"""Test configuration: jax on CPU with 8 fake devices unless a GPU run asks otherwise.

Set ``JAXHICACHE_TEST_PLATFORM=gpu`` (``scripts/gpu_check.sh`` does) to keep the
real accelerator; ``gpu``-marked tests skip when no GPU backend is present.
"""

from __future__ import annotations

import os
import tempfile

_GPU_RUN = os.environ.get("JAXHICACHE_TEST_PLATFORM", "cpu") == "gpu"
# Commands run in-process (bench multiturn) keep their persistent compile cache out
# of the user's home directory.
os.environ.setdefault(
    "JAXHICACHE_COMPILE_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "jaxhicache-tests-compile-cache"),
)
if not _GPU_RUN:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

if not _GPU_RUN:
    jax.config.update("jax_num_cpu_devices", 8)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _GPU_RUN and _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
