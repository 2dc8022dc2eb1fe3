"""Fast restarts: compiled programs that outlive the process.

A serving process compiles one program per transfer bucket, chunk shape and
batch size; on CPU the main job spends most of its warm-up compiling. Two caches
in one directory let a restarted process skip that work::

    import jaxhicache
    jaxhicache.enable_compile_cache()   # returns the directory; both caches are on

* JAX's persistent compilation cache (the directory itself): a program that is
  traced and lowered again finds its executable there instead of compiling.
* The program cache (its ``programs`` subdirectory,
  :mod:`jaxhicache.program_cache`): programs built with
  :func:`~jaxhicache.program_cache.cached_jit` (the forward programs of the
  models in ``models/``) are loaded as executables, keyed on their code,
  configuration, input shapes and shardings, versions and devices, so a restart
  does not trace or lower them either. CPU only; elsewhere they take the
  persistent cache. ``enable_compile_cache(programs=False)`` keeps it off.

The ``jaxhicache`` command line does this by default (``--no-compile-cache`` turns
both off, ``--compile-cache DIR`` picks the directory) and prints where.

Default directory: ``$JAXHICACHE_COMPILE_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxhicache/jax`` (``~/.cache/jaxhicache/jax``). JAX treats the
directory as trusted code (so does the program cache: its entries are pickled
executables): keep it private to the user (it is created ``0700``). JAX keys its
entries on the program, the jax/jaxlib version and the devices, the program cache
on everything listed in :mod:`jaxhicache.program_key`, so a changed program or an
upgraded jax compiles afresh and never loads a stale executable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, cast

import jax

from jaxhicache import program_cache

__all__ = [
    "add_cli_flags",
    "cli_cache",
    "compile_cache",
    "compile_cache_dir",
    "default_compile_cache_dir",
    "disable_compile_cache",
    "enable_compile_cache",
]

ENV = "JAXHICACHE_COMPILE_CACHE_DIR"
_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def default_compile_cache_dir() -> str:
    """The directory :func:`enable_compile_cache` uses when given none.

    Returns:
      ``$JAXHICACHE_COMPILE_CACHE_DIR`` if set and non-empty, else
      ``$XDG_CACHE_HOME/jaxhicache/jax`` (``~/.cache/jaxhicache/jax`` without
      ``XDG_CACHE_HOME``). Nothing is created.
    """
    env = os.environ.get(ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxhicache", "jax")


def compile_cache_dir() -> str | None:
    """The persistent compilation cache directory JAX is configured with now.

    Returns:
      The directory, or ``None`` when the cache is off.
    """
    return cast(Any, jax.config).jax_compilation_cache_dir or None  # not in its stubs


def _reset() -> None:
    # JAX binds its cache to a directory at the first cached compile; forget that
    # binding so a directory set later (or none) takes effect
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def _directory(path: str | os.PathLike | None) -> str:
    """``path`` (default :func:`default_compile_cache_dir`) made absolute and created
    (``0700``); ``ValueError`` naming it if that fails."""
    raw = default_compile_cache_dir() if path is None else os.fspath(path)
    if not raw:
        raise ValueError("the compile cache path is empty")
    d = os.path.abspath(os.path.expanduser(raw))
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"compile cache path {d!r} exists and is not a directory")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the compile cache directory {d!r}: {e}") from None
    return d


def enable_compile_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_time_s: float = 0.0,
    programs: bool = True,
) -> str:
    """Turns JAX's persistent compilation cache on in ``path``, and the program cache.

    Args:
      path: the cache directory (``~`` expanded, created ``0700`` if missing);
        ``None``: :func:`default_compile_cache_dir`.
      min_compile_time_s: programs that compile faster are not written (JAX's own
        default is 1 s, which would skip most of jaxhicache's small programs on
        CPU). Every entry size is written.
      programs: also keep :func:`~jaxhicache.program_cache.cached_jit` executables
        in ``path/programs`` (:mod:`jaxhicache.program_cache`); ``False`` turns
        that cache off.

    Returns:
      The absolute directory.

    Raises:
      ValueError: ``min_compile_time_s`` negative, NaN or a ``bool``;
        ``path`` empty, an existing non-directory, or not creatable.
    """
    if isinstance(min_compile_time_s, bool) or not float(min_compile_time_s) >= 0:
        raise ValueError(f"min_compile_time_s must be a number >= 0, got {min_compile_time_s!r}")
    d = _directory(path)
    program_cache.set_program_cache_dir(os.path.join(d, "programs") if programs else None)
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every size
    _reset()
    return d


def disable_compile_cache() -> None:
    """Turns both caches off (programs are traced and compiled in memory only)."""
    program_cache.set_program_cache_dir(None)
    jax.config.update("jax_compilation_cache_dir", None)
    _reset()


@contextlib.contextmanager
def compile_cache(
    path: str | os.PathLike | None = None, *, enabled: bool = True
) -> Iterator[str | None]:
    """A block within which both caches are on in ``path`` (or off).

    JAX's previous cache settings (directory, minimum compile time, minimum entry
    size) and the previous program cache directory come back when the block ends,
    also on an exception.

    Args:
      path: as for :func:`enable_compile_cache`.
      enabled: ``False`` turns the cache off inside the block instead.

    Yields:
      The absolute directory, or ``None`` when ``enabled`` is false.

    Raises:
      ValueError: on entry, as :func:`enable_compile_cache` raises it.
    """
    before = {name: getattr(jax.config, name) for name in _SETTINGS}
    programs_before = program_cache.program_cache_dir()
    try:
        if enabled:
            yield enable_compile_cache(path)
        else:
            disable_compile_cache()
            yield None
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        program_cache.set_program_cache_dir(programs_before)
        _reset()


# ------------------------------------------------------------ the command line
def add_cli_flags(parser) -> None:
    """Adds ``--compile-cache DIR`` and ``--no-compile-cache`` to a command line.

    Args:
      parser: an ``argparse.ArgumentParser`` (or argument group); the two flags go
        in a mutually exclusive group. Read them back with :func:`cli_cache`.
    """
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache and the program cache in DIR/programs "
        "(default $JAXHICACHE_COMPILE_CACHE_DIR, else ~/.cache/jaxhicache/jax): a second "
        "run loads its programs instead of tracing and compiling them",
    )
    g.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="trace and compile every program afresh (both caches off)",
    )


def cli_cache(args) -> contextlib.AbstractContextManager[str | None]:
    """The cache the :func:`add_cli_flags` flags ask for, as a ``with`` block.

    The directory is checked (and made) now, before the command starts any work.

    Args:
      args: the parsed ``argparse.Namespace`` (``compile_cache``,
        ``no_compile_cache``).

    Returns:
      A context manager that prints where the cache is (or that it is off),
      yields the directory (``None`` when off) and restores JAX's settings at
      its end.

    Raises:
      ValueError: the directory cannot be used; the message starts with
        ``--compile-cache:`` and names it.
    """
    if args.no_compile_cache:
        return _announced(None)
    try:
        return _announced(_directory(args.compile_cache))
    except ValueError as e:
        raise ValueError(f"--compile-cache: {e}") from None


@contextlib.contextmanager
def _announced(d: str | None) -> Iterator[str | None]:
    with compile_cache(d, enabled=d is not None) as got:
        if got is None:
            print("compile cache: off (--no-compile-cache)", flush=True)
        else:
            print(f"compile cache: {got} (reruns load their programs from it)", flush=True)
        yield got
