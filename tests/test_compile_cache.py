"""``jaxhicache.enable_compile_cache``: JAX's persistent compilation cache for restarts."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxhicache
from jaxhicache import compile_cache as cc


def _compile_something_new(seed: float):
    """A program no earlier test compiled (its constant is new), compiled and run."""
    f = jax.jit(lambda x: jnp.sin(x) * seed + seed)
    return np.asarray(f(jnp.arange(7, dtype=jnp.float32)))


def _entries(d) -> list[str]:
    return [n for n in os.listdir(d) if not n.startswith(".")] if os.path.isdir(d) else []


def test_the_one_liner_writes_programs_and_the_block_restores_jax_settings(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with cc.compile_cache(tmp_path / "cc") as d:
        assert d == str(tmp_path / "cc") == cc.compile_cache_dir()
        assert (os.stat(d).st_mode & 0o777) == 0o700  # trusted code: private
        _compile_something_new(1.2345)
        assert _entries(d), "no executable was written"
    assert jax.config.jax_compilation_cache_dir == before
    # the documented one-liner, at package level
    try:
        d2 = jaxhicache.enable_compile_cache(tmp_path / "one")
        _compile_something_new(2.3456)
        assert _entries(d2)
    finally:
        jaxhicache.disable_compile_cache()
    assert cc.compile_cache_dir() is None
    jax.config.update("jax_compilation_cache_dir", before)


def test_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(cc.ENV, str(tmp_path / "default"))
    with cc.compile_cache(enabled=False) as d:
        assert d is None and cc.compile_cache_dir() is None
        _compile_something_new(3.4567)
    assert not (tmp_path / "default").exists()


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_compile_cache_dir() == str(tmp_path / "xdg" / "jaxhicache" / "jax")
    monkeypatch.setenv(cc.ENV, str(tmp_path / "mine"))
    assert cc.default_compile_cache_dir() == str(tmp_path / "mine")


def test_bad_arguments_raise_value_error_naming_them(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(ValueError, match=str(a_file)):
        cc.enable_compile_cache(a_file)
    with pytest.raises(ValueError, match="-1"):
        cc.enable_compile_cache(tmp_path / "d", min_compile_time_s=-1)
    assert jax.config.jax_compilation_cache_dir == before  # nothing changed


def test_a_new_directory_takes_effect_after_programs_were_cached(tmp_path):
    """JAX binds its cache to a directory at the first cached compile; enabling another
    directory later must move the writes there (the binding is reset)."""
    before = jax.config.jax_compilation_cache_dir
    try:
        a = cc.enable_compile_cache(tmp_path / "a")
        _compile_something_new(4.5678)
        n_a = len(_entries(a))
        assert n_a
        b = cc.enable_compile_cache(tmp_path / "b")
        _compile_something_new(5.6789)
        assert _entries(b), "the second directory got nothing"
        assert len(_entries(a)) == n_a
    finally:
        cc.disable_compile_cache()
        jax.config.update("jax_compilation_cache_dir", before)
