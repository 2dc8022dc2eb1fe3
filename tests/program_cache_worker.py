"""One process of ``tests/test_program_cache.py``: the tiny DSV4 model's prefill with the
compile cache (and so the program cache) in DIR, or with both off.

    python tests/program_cache_worker.py DIR|off

Prints one JSON line: how many times the forward program was traced, the program
cache's counters, and the logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 8)

from jaxhicache import compile_cache  # noqa: E402
from jaxhicache.program_cache import program_cache_stats  # noqa: E402
from models import PagedModel, TinyDSV4Config, init_params  # noqa: E402


def main(where: str) -> None:
    """Runs one prefill on a PP 2 mesh (two of the eight devices) and prints the line."""
    with compile_cache.compile_cache(None if where == "off" else where, enabled=where != "off"):
        cfg = TinyDSV4Config.mini()
        model = PagedModel(cfg, init_params(cfg, seed=0), pp=2)
        pools = model.init_pools(8, 8)
        tokens = np.arange(20, dtype=np.int32) * 7 % cfg.vocab
        table = np.array([0, 1, -1, -1], np.int32)
        logits, _pools, _scratch = model.prefill(pools, tokens, 0, table, table, chunk_size=32)
        stats = dataclasses.asdict(program_cache_stats())
    print(json.dumps({"traces": model.traces, "stats": stats, "logits": logits.tolist()}))


if __name__ == "__main__":
    main(sys.argv[1])
