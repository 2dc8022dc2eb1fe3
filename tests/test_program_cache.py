"""``jaxhicache.program_cache``: executables that a later process loads without tracing.

The toy program is a ``shard_map`` over two of the eight fake CPU devices with a donated
argument; the model test runs the tiny DSV4 model's prefill in two fresh processes
(``tests/program_cache_worker.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache import compile_cache as cc
from jaxhicache import program_cache as pc
from jaxhicache import program_key
from models.compile_counter import CompileCounter

WORKER = Path(__file__).parent / "program_cache_worker.py"


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:2]), ("x",))


def _body(scale: float):
    def body(a, b):
        return a * scale + jnp.sum(b), b + 1.0

    return body


def _step(scale: float, key: str = "toy step") -> pc.CachedJit:
    """A new function object each time, like a model's per-instance program."""
    mesh = _mesh()
    f = jax.shard_map(_body(scale), mesh=mesh, in_specs=(P("x"), P()), out_specs=(P("x"), P()))
    outs = (NamedSharding(mesh, P("x")), NamedSharding(mesh, P()))
    return pc.cached_jit(f, key=f"{key} scale={scale}", donate_argnums=(0,), out_shardings=outs)


def _args(n: int = 8):
    mesh = _mesh()
    a = jax.device_put(np.arange(n, dtype=np.float32), NamedSharding(mesh, P("x")))
    b = jax.device_put(np.ones(3, np.float32), NamedSharding(mesh, P()))
    return a, b


def _want(scale: float, n: int = 8):
    return np.arange(n, dtype=np.float32) * scale + 3.0, np.full(3, 2.0, np.float32)


def _delta(before: pc.ProgramCacheStats) -> dict:
    now = dataclasses.asdict(pc.program_cache_stats())
    old = dataclasses.asdict(before)
    return {k: now[k] - old[k] for k in ("loaded", "relinked", "compiled", "rejected")}


@pytest.fixture
def programs(tmp_path):
    """Both caches on in a fresh directory; the program cache's directory."""
    with cc.compile_cache(tmp_path / "cc") as d:
        yield Path(d) / "programs"


def _close(out, want) -> None:
    for got, w in zip(out, want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), w)


def test_a_new_instance_loads_the_executable_and_matches_plain_jit(programs):
    s = pc.program_cache_stats()
    a, b = _args()
    _close(_step(2.0)(a, b), _want(2.0))
    assert a.is_deleted()  # donated
    assert _delta(s) == {"loaded": 0, "relinked": 0, "compiled": 1, "rejected": 0}
    assert len(list(programs.glob("*.jxp"))) == 2  # a code entry and its program entry
    s = pc.program_cache_stats()
    a, b = _args()
    counter = CompileCounter()
    with counter.active():
        out = _step(2.0)(a, b)  # nothing traced: loaded from the directory
    counter.close()
    assert _delta(s) == {"loaded": 1, "relinked": 0, "compiled": 0, "rejected": 0}
    assert counter.count == 1 and "body" in counter.names[0]  # a load counts as a compile
    assert a.is_deleted()  # the loaded executable donates too
    a, b = _args()
    plain = jax.jit(_step(2.0).jit, donate_argnums=(0,))(a, b)
    _close(out, [np.asarray(x) for x in plain])


def test_an_executable_jax_had_cached_is_still_written_whole(programs):
    """JAX's persistent cache (same directory) already holds the program; what the
    program cache writes must still run in the next lookup (an executable JAX loaded
    from its cache re-serializes without its kernels on CPU)."""
    _close(_step(5.0).jit(*_args()), _want(5.0))  # plain jit: into JAX's cache
    _close(_step(5.0)(*_args()), _want(5.0))
    s = pc.program_cache_stats()
    _close(_step(5.0)(*_args()), _want(5.0))
    assert _delta(s) == {"loaded": 1, "relinked": 0, "compiled": 0, "rejected": 0}


def test_a_changed_key_or_shape_misses(programs):
    _step(2.0)(*_args())
    s = pc.program_cache_stats()
    _close(_step(3.0)(*_args()), _want(3.0))  # other closure value, other key
    _close(_step(2.0)(*_args(16)), _want(2.0, 16))  # other shape
    assert _delta(s) == {"loaded": 0, "relinked": 0, "compiled": 2, "rejected": 0}


def test_a_changed_tracing_context_misses(programs):
    """``jax.default_matmul_precision`` (and every other setting jax.jit keys on) is part
    of the key: a call under another precision traces its own program."""
    _step(2.0)(*_args())
    s = pc.program_cache_stats()
    with jax.default_matmul_precision("highest"):
        _close(_step(2.0)(*_args()), _want(2.0))
    assert _delta(s)["loaded"] == 0 and _delta(s)["compiled"] + _delta(s)["relinked"] == 1


def test_a_code_change_relinks_the_program_without_compiling(programs, monkeypatch):
    _step(2.0)(*_args())
    monkeypatch.setattr(program_key, "source_digest", lambda name: (f"edited {name}", ()))
    s = pc.program_cache_stats()
    _close(_step(2.0)(*_args()), _want(2.0))
    assert _delta(s) == {"loaded": 0, "relinked": 1, "compiled": 0, "rejected": 0}


def test_no_code_entry_when_a_source_changed_after_the_process_started(programs, monkeypatch):
    """The code that runs may not be the code on disk: only the program entry (keyed on
    what was traced) is written, and the next lookup relinks."""
    monkeypatch.setattr(program_key, "_STARTED_NS", 0)  # every file "newer" than us
    s = pc.program_cache_stats()
    _step(2.0)(*_args())
    assert _delta(s)["compiled"] == 1 and pc.program_cache_stats().write_errors > s.write_errors
    assert [p.name for p in programs.glob("*.jxp") if "-program-" not in p.name] == []
    monkeypatch.undo()
    s = pc.program_cache_stats()
    _step(2.0)(*_args())
    assert _delta(s) == {"loaded": 0, "relinked": 1, "compiled": 0, "rejected": 0}


def test_another_function_with_the_same_program_relinks_it(programs):
    """Programs are shared by their lowered text: another key that traces to the same
    program loads its executable instead of compiling it again."""
    _step(2.0)(*_args())
    s = pc.program_cache_stats()
    _close(_step(2.0, key="another model")(*_args()), _want(2.0))
    assert _delta(s) == {"loaded": 0, "relinked": 1, "compiled": 0, "rejected": 0}
    assert len(list(programs.glob("*-program-*.jxp"))) == 1


@pytest.mark.parametrize(("which", "rejects"), [("code", 1), ("program", 2)])
def test_a_damaged_entry_is_ignored_and_replaced(programs, which, rejects):
    """A damaged program entry is met twice: through the code entry, then by program."""
    _step(2.0)(*_args())
    (entry,) = [
        p for p in programs.glob("*.jxp") if ("-program-" in p.name) == (which == "program")
    ]
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    s = pc.program_cache_stats()
    with pytest.warns(RuntimeWarning, match="checksum"):
        _close(_step(2.0)(*_args()), _want(2.0))
    assert _delta(s)["rejected"] == rejects and _delta(s)["loaded"] == 0
    s = pc.program_cache_stats()
    _close(_step(2.0)(*_args()), _want(2.0))
    assert _delta(s) == {"loaded": 1, "relinked": 0, "compiled": 0, "rejected": 0}


def test_an_executable_for_other_inputs_is_refused(programs):
    """A code entry that names another program's executable (its key and checksum
    intact) is refused by the argument check, never called."""
    _step(2.0)(*_args())
    _step(2.0)(*_args(16))
    by_shape = {}
    for p in programs.glob("*.jxp"):
        if "-program-" not in p.name:
            by_shape["(16,)" in pc._read(str(p))["key"]] = p
    mine, other = by_shape[False], by_shape[True]
    entry = pc._read(str(mine))
    theirs = pc._read(str(other))
    pc._write(str(mine), {**entry, "exe": theirs["exe"], "exe_key": theirs["exe_key"]})
    s = pc.program_cache_stats()
    with pytest.warns(RuntimeWarning, match="float32\\[16\\]"):
        _close(_step(2.0)(*_args()), _want(2.0))
    assert _delta(s) == {"loaded": 0, "relinked": 1, "compiled": 0, "rejected": 1}


def test_off_is_plain_jit_and_the_block_restores_the_directory(tmp_path):
    before = pc.program_cache_dir()
    with cc.compile_cache(enabled=False):
        assert pc.program_cache_dir() is None
        s = pc.program_cache_stats()
        _close(_step(2.0)(*_args()), _want(2.0))
        assert _delta(s) == {"loaded": 0, "relinked": 0, "compiled": 0, "rejected": 0}
    assert pc.program_cache_dir() == before
    try:
        d = cc.enable_compile_cache(tmp_path / "p", programs=False)
        assert pc.program_cache_dir() is None and d == str(tmp_path / "p")
        d = cc.enable_compile_cache(tmp_path / "p")
        assert pc.program_cache_dir() == os.path.join(d, "programs")
    finally:
        cc.disable_compile_cache()
    assert pc.program_cache_dir() is None


@pytest.mark.filterwarnings("ignore:Some donated buffers")  # inside another jit
def test_calls_it_cannot_key_take_plain_jit(programs):
    s = pc.program_cache_stats()
    host = (np.arange(8, dtype=np.float32), np.ones(3, np.float32))
    _close(_step(2.0)(*host), _want(2.0))  # numpy: plain jit
    inner = _step(2.0)
    out = jax.jit(lambda a, b: inner(a, b))(*_args())  # tracers: plain jit inside
    _close(out, _want(2.0))
    assert _delta(s) == {"loaded": 0, "relinked": 0, "compiled": 0, "rejected": 0}
    assert not list(programs.glob("*.jxp"))


def _worker(where) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, str(WORKER), str(where)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_second_process_traces_nothing_and_gets_the_same_logits(tmp_path):
    """The model's forward program (PP 2 in shard_map, pools and scratch donated)."""
    first = _worker(tmp_path / "cc")
    assert first["traces"] == 1 and first["stats"]["compiled"] == 1
    second = _worker(tmp_path / "cc")
    assert second["traces"] == 0, second["stats"]
    assert second["stats"]["loaded"] == 1 and second["stats"]["compiled"] == 0
    assert second["logits"] == first["logits"]
