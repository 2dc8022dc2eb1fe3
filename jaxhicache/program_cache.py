"""Program cache: compiled executables that a restarted process loads without tracing.

JAX's persistent compilation cache (:mod:`jaxhicache.compile_cache`) skips only the
XLA compile of a program: every new process still traces the Python code and
lowers it to StableHLO before it can look the executable up, and for a model's
forward programs that is most of a warm-up once compiling is cached.
:func:`cached_jit` is ``jax.jit`` with a cache one level up, in
``<compile cache>/programs``::

    import jaxhicache
    from jaxhicache.program_cache import cached_jit

    jaxhicache.enable_compile_cache()  # the program cache is its "programs" subdirectory
    step = cached_jit(forward, key=f"my-model {config!r}", donate_argnums=(1,))

Per call signature (argument tree, shapes, dtypes, shardings) a process looks up
two entries:

1. **by code**: the caller's ``key`` plus everything else that decides what the
   function traces to (list below). A hit loads the executable and calls it:
   nothing is traced or lowered.
2. **by program**: on a miss the function is traced and lowered, and the module's
   text (no source locations) with its arguments and environment is the key. A hit
   (the code changed but not the program, or another function with the same
   program) loads the executable; a miss compiles it. Both record a code entry
   pointing at it, with the argument and output trees, for the next process.

Executables are compiled here without JAX's persistent cache (an executable that
JAX loaded from its cache does not serialize whole on CPU); JAX's cache keeps
serving every other program.

It is on exactly when :func:`jaxhicache.enable_compile_cache` turned it on
(``programs=True``, the default; ``--no-compile-cache`` turns off both). Otherwise
a :class:`CachedJit` is its ``jax.jit`` and nothing else.

**The code key** (an entry is used only when all of it is equal, after its checksum
and its inputs are checked): the caller's ``key`` (everything the function closes
over: its config, layer maps, chunk length, ...), the function's qualified name,
the ``jax.jit`` arguments, a SHA-256 of the source files of the packages the code
can come from (``jaxhicache``, ``kernels_pallas``, the function's own top-level
package and ``code=``), the versions of Python, numpy, jax and jaxlib, the backend
(platform and version), each device's id, kind and process, the host CPU (model and
flags), ``XLA_FLAGS``, JAX's tracing context (``jax.default_matmul_precision`` and
the other settings ``jax.jit`` keys its own cache on) and the arguments' tree,
shapes, dtypes, weak types, commitment and shardings (:mod:`jaxhicache.program_key`).
A loaded executable must take exactly the call's avals, shardings and donations.
An entry that fails any check (damaged, unreadable, refused by XLA, other inputs) is
ignored with a warning and replaced. A source file modified after this process
started stops code entries from being written (the code it runs may not be the
code on disk).

**Where it is off** (a :class:`CachedJit` then calls its ``jax.jit``): platforms other
than :data:`PLATFORMS` (CPU; GPU programs with Triton calls have not been verified
through it), several processes, arguments that are not concrete ``jax.Array`` s
(inside another trace, numpy or Python scalars), shardings other than
``NamedSharding`` / ``SingleDeviceSharding``, a tracing context or key with an
object address in it, and a function not defined in a source file.

The files are pickled executables: like JAX's own cache directory this one is
trusted code, private to the user (``0700``). Entries are never evicted; any file
can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import jax
from jax.core import Tracer

from jaxhicache.program_key import call_parts, devices_of, sharding_text, sources_unchanged

__all__ = [
    "FORMAT",
    "LOAD_EVENT",
    "PLATFORMS",
    "CachedJit",
    "ProgramCacheStats",
    "cached_jit",
    "program_cache_dir",
    "program_cache_stats",
    "set_program_cache_dir",
]

FORMAT = 1
"""Version of the entry layout; part of every key (a new layout never reads an old file)."""

PLATFORMS = ("cpu",)
"""Platforms whose programs go through the cache (elsewhere: plain ``jax.jit``)."""

LOAD_EVENT = "/jaxhicache/program_cache/load_duration"
"""``jax.monitoring`` duration event of each executable loaded from the cache (with
``fun_name``): a compilation this process did not have to do."""

_MAGIC = b"jaxhicache-program\n"
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ProgramCacheStats:
    """Counts of this process's cached programs (:func:`program_cache_stats`).

    Attributes:
      loaded: executables loaded by their code entry (nothing traced).
      relinked: executables loaded by their program entry (traced and lowered, the
        code had changed but not the program; not compiled).
      compiled: programs compiled (both entries written).
      rejected: entries found but not used (damaged, unreadable, or their inputs
        differ from the call's); each was replaced.
      bypassed: calls of a new signature that took plain ``jax.jit`` (see the module
        docstring), by reason.
      write_errors: entries that could not be written (or were not, because a
        source file changed since it was hashed).
    """

    loaded: int = 0
    relinked: int = 0
    compiled: int = 0
    rejected: int = 0
    bypassed: dict[str, int] = dataclasses.field(default_factory=dict)
    write_errors: int = 0


_lock = threading.Lock()
_dir: str | None = None
_stats = ProgramCacheStats()


def set_program_cache_dir(path: str | os.PathLike | None) -> str | None:
    """Points the cache at ``path`` (created ``0700``), or turns it off (``None``).

    :func:`jaxhicache.enable_compile_cache` calls this with its ``programs``
    subdirectory; call it directly only to keep programs elsewhere.

    Args:
      path: the directory, or ``None``.

    Returns:
      The absolute directory, or ``None``.

    Raises:
      ValueError: the directory cannot be created.
    """
    global _dir
    if path is None:
        _dir = None
        return None
    d = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the program cache directory {d!r}: {e}") from None
    _dir = d
    return d


def program_cache_dir() -> str | None:
    """The program cache directory now in use.

    Returns:
      The directory, or ``None`` when the program cache is off.
    """
    return _dir


def program_cache_stats() -> ProgramCacheStats:
    """What the program cache did in this process so far.

    Returns:
      A copy of the counters (see :class:`ProgramCacheStats`).
    """
    with _lock:
        return dataclasses.replace(_stats, bypassed=dict(_stats.bypassed))


def cached_jit(
    fun: Callable,
    *,
    key: str,
    donate_argnums: int | Sequence[int] = (),
    out_shardings: Any = None,
    compiler_options: dict[str, Any] | None = None,
    code: Sequence[str] = (),
) -> CachedJit:
    """``jax.jit(fun, ...)`` whose executables outlive the process (module docstring).

    Args:
      fun: the function, positional arguments only (pytrees of arrays).
      key: every value ``fun`` closes over that shapes its program (a config's
        ``repr``, a chunk length, ...): two functions with equal keys, names and
        code must trace to the same program for the same inputs.
      donate_argnums: as for ``jax.jit``.
      out_shardings: as for ``jax.jit`` (``None``: unspecified).
      compiler_options: as for ``jax.jit``.
      code: top-level packages or modules whose source the program depends on,
        besides ``jaxhicache``, ``kernels_pallas`` and ``fun``'s own package.

    Returns:
      The :class:`CachedJit`.

    Raises:
      TypeError: ``key`` is not a string.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return CachedJit(
        fun,
        key=key,
        donate_argnums=donate_argnums,
        out_shardings=out_shardings,
        compiler_options=compiler_options,
        code=code,
    )


def _count(field: str) -> None:
    with _lock:
        setattr(_stats, field, getattr(_stats, field) + 1)


def _trace_context() -> tuple:
    from jax._src import config as jax_config  # what jax.jit keys its own cache on

    return jax_config.trace_context()


@contextlib.contextmanager
def _fresh_compiles() -> Iterator[None]:
    """Compiles inside skip JAX's persistent cache (its executables re-serialize
    incompletely on CPU)."""
    from jax.experimental.compilation_cache import compilation_cache

    before = cast(Any, jax.config).jax_enable_compilation_cache  # not in its stubs
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def _donated_leaves(args: tuple, donate: tuple[int, ...]) -> list[bool]:
    out: list[bool] = []
    for i, a in enumerate(args):
        out += [i in donate] * len(jax.tree.leaves(a))
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: str) -> dict | None:
    """The entry at ``path``; ``None`` if there is none; raises if it is damaged."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return None
    head = len(_MAGIC)
    if blob[:head] != _MAGIC:
        raise ValueError("not a program cache entry")
    want, payload = blob[head : head + 32], blob[head + 32 :]
    if hashlib.sha256(payload).digest() != want:
        raise ValueError("checksum mismatch")
    entry = pickle.loads(payload)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ValueError("another entry format")
    return entry


def _write(path: str, entry: dict) -> None:
    """Writes ``entry`` atomically (readers see the whole file or none)."""
    payload = pickle.dumps({"format": FORMAT, **entry}, protocol=pickle.HIGHEST_PROTOCOL)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclasses.dataclass
class _Miss:
    """Why a signature takes plain ``jax.jit`` (memoized per signature)."""

    reason: str


class CachedJit:
    """A ``jax.jit`` whose executables are cached on disk per input signature.

    Build it with :func:`cached_jit` (its arguments are this constructor's). Call
    it like the jitted function; :meth:`trace` and :meth:`lower` are ``jax.jit``'s.

    Args:
      fun: see :func:`cached_jit`.
      key: see :func:`cached_jit`.
      donate_argnums: see :func:`cached_jit`.
      out_shardings: see :func:`cached_jit`.
      compiler_options: see :func:`cached_jit`.
      code: see :func:`cached_jit`.
    """

    def __init__(
        self,
        fun: Callable,
        *,
        key: str,
        donate_argnums: int | Sequence[int] = (),
        out_shardings: Any = None,
        compiler_options: dict[str, Any] | None = None,
        code: Sequence[str] = (),
    ):
        donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
        self._donate = tuple(sorted(donate))
        self._out_shardings = out_shardings
        kw: dict[str, Any] = {"donate_argnums": self._donate}
        if out_shardings is not None:
            kw["out_shardings"] = out_shardings
        if compiler_options:
            kw["compiler_options"] = compiler_options
        self.jit = jax.jit(fun, **kw)
        """The plain ``jax.jit`` of the function."""
        self.name = getattr(fun, "__qualname__", type(fun).__name__)
        """The function's qualified name (the file names of its entries start with it)."""
        module = getattr(fun, "__module__", None) or "?"
        self._packages = tuple(
            sorted({"jaxhicache", "kernels_pallas", module.split(".")[0], *code})
        )
        self._jit_text = self._jit_options_text(compiler_options)
        self._key = None if " at 0x" in key else f"fun={module}.{self.name}\nkey={key}"
        self._stem = "".join(c for c in self.name if c.isalnum() or c in "._")
        self._mem: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def _jit_options_text(self, options: dict | None) -> str | None:
        outs = "unspecified"
        if self._out_shardings is not None:
            leaves, tree = jax.tree.flatten(self._out_shardings)
            texts = [sharding_text(s) for s in leaves]
            if any(t is None for t in texts):
                return None
            outs = f"{tree} {texts}"
        return f"jit=donate{self._donate} out={outs} options={sorted((options or {}).items())}"

    # ---------------------------------------------------------------- calls
    def trace(self, *args):
        """``jax.jit(...).trace``: the traced program of these arguments (nothing cached).

        Args:
          *args: the function's arguments.

        Returns:
          A ``jax.stages.Traced``.
        """
        return self.jit.trace(*args)

    def lower(self, *args):
        """``jax.jit(...).lower``: the lowered program of these arguments (nothing cached).

        Args:
          *args: the function's arguments.

        Returns:
          A ``jax.stages.Lowered``.
        """
        return self.jit.lower(*args)

    def __call__(self, *args):
        """Runs the program: from memory, the cache directory, or compiled (and written).

        Args:
          *args: the function's arguments.

        Returns:
          The function's outputs.
        """
        d = _dir
        if d is None:
            return self.jit(*args)
        leaves, tree = jax.tree.flatten(args)
        # numpy, Python scalars and tracers (a call inside another trace): plain jit
        if not all(isinstance(x, jax.Array) and not isinstance(x, Tracer) for x in leaves):
            return self.jit(*args)
        sig = (
            d,
            tree,
            _trace_context(),
            tuple(
                (x.shape, x.dtype, x.weak_type, getattr(x, "_committed", None), x.sharding)
                for x in leaves
            ),
        )
        entry = self._mem.get(sig)
        if entry is None:
            with self._lock:
                entry = self._mem.get(sig)
                if entry is None:
                    entry = self._mem[sig] = self._resolve(d, args, leaves, tree, sig[2])
        if isinstance(entry, _Miss):
            return self.jit(*args)
        return entry(*args)

    # ---------------------------------------------------------------- misses
    def _bypass(self, reason: str) -> _Miss:
        with _lock:
            _stats.bypassed[reason] = _stats.bypassed.get(reason, 0) + 1
        return _Miss(reason)

    def _resolve(self, d: str, args, leaves, tree, ctx):
        """The callable for a new signature: a loaded or compiled executable, or a _Miss."""
        if self._key is None or self._jit_text is None:
            return self._bypass("key")
        parts, why = call_parts(self._packages, leaves, tree, ctx, PLATFORMS)
        if parts is None:
            return self._bypass(why)
        code_text = "\n".join([self._key, self._jit_text, *(f"{k}={v}" for k, v in parts.items())])
        code_path = os.path.join(d, f"{self._stem}-{_sha(code_text)[:40]}.jxp")
        t0 = time.perf_counter()
        found = self._load(code_path, code_text, args, leaves)
        if found is not None:
            _count("loaded")
            jax.monitoring.record_event_duration_secs(
                LOAD_EVENT, time.perf_counter() - t0, fun_name=self.name
            )
            return found
        lowered = self.jit.trace(*args).lower()
        # the flat program only: functions that differ in their argument or output trees
        # alone share it (the trees come with the code entry, or from this lowering)
        program_text = "\n".join(
            [
                f"program={_sha(lowered.as_text())}",
                self._jit_text,
                f"env={parts['env']}",
                f"args={parts['args']}",
            ]
        )
        exe_name = f"{self._stem}-program-{_sha(program_text)[:40]}.jxp"
        exe_path = os.path.join(d, exe_name)
        trees = {"in_tree": lowered.in_tree, "out_tree": lowered.out_tree}
        t0 = time.perf_counter()
        compiled = self._load(exe_path, program_text, args, leaves, trees=trees)
        if compiled is not None:
            _count("relinked")
            jax.monitoring.record_event_duration_secs(
                LOAD_EVENT, time.perf_counter() - t0, fun_name=self.name
            )
        else:
            with _fresh_compiles():
                compiled = lowered.compile()
            _count("compiled")
            self._save(exe_path, lambda: self._exe_entry(program_text, compiled))
        if sources_unchanged(self._packages):  # else it would carry the old code's program
            pointer = {"key": code_text, "exe": exe_name, "exe_key": _sha(program_text), **trees}
            self._save(code_path, lambda: pointer)
        else:
            _count("write_errors")
        return compiled

    @staticmethod
    def _exe_entry(program_text: str, compiled) -> dict:
        from jax.experimental import serialize_executable

        exe, _in_tree, _out_tree = serialize_executable.serialize(compiled)
        return {"key": program_text, "exe": exe}

    def _save(self, path: str, entry: Callable[[], dict]) -> None:
        try:
            _write(path, entry())
        except Exception as e:  # the program still runs; only the next process misses
            _count("write_errors")
            _log.warning("jaxhicache program cache: not writing %s (%s)", path, e)

    def _load(self, path: str, text: str, args, leaves, *, trees: dict | None = None):
        """The executable of the entry at ``path``, or ``None`` (missing, or rejected
        with a warning). Without ``trees`` it is a code entry: it names the program
        entry that holds the executable and carries the trees."""
        try:
            entry = _read(path)
            if entry is None:
                return None
            if entry.get("key") != text:
                raise ValueError("its key text differs")
            if trees is None:
                trees = {"in_tree": entry["in_tree"], "out_tree": entry["out_tree"]}
                exe_key = entry["exe_key"]
                target = os.path.join(os.path.dirname(path), entry["exe"])
                entry = _read(target)
                if entry is None:
                    raise ValueError(f"its executable {target} is gone")
                if _sha(entry.get("key", "")) != exe_key:
                    raise ValueError("its executable's key differs")
            from jax.experimental import serialize_executable

            devices = devices_of(leaves[0].sharding) or ()
            compiled = serialize_executable.deserialize_and_load(
                entry["exe"],
                trees["in_tree"],
                trees["out_tree"],
                backend=devices[0].client,
                execution_devices=list(devices),
            )
            self._check(compiled, args, leaves)
        except Exception as e:  # damaged or foreign: trace (and compile) afresh, replace it
            _count("rejected")
            warnings.warn(
                f"jaxhicache program cache: ignoring {path} ({type(e).__name__}: {e})",
                RuntimeWarning,
                stacklevel=5,
            )
            return None
        return compiled

    def _check(self, compiled, args, leaves) -> None:
        """``ValueError`` unless ``compiled`` takes exactly these arguments."""
        if compiled.in_tree != jax.tree.structure((tuple(args), {})):
            raise ValueError("its argument tree differs")
        infos = jax.tree.leaves(compiled.args_info)
        # None: an argument the program does not use (pruned by jax.jit)
        shardings = jax.tree.leaves(compiled.input_shardings[0], is_leaf=lambda s: s is None)
        donated = _donated_leaves(args, self._donate)
        if not len(infos) == len(shardings) == len(leaves):
            raise ValueError("its argument count differs")
        for x, info, s, don in zip(leaves, infos, shardings, donated, strict=True):
            aval = info._aval
            if (aval.shape, aval.dtype, aval.weak_type) != (x.shape, x.dtype, x.weak_type):
                raise ValueError(f"an argument is {aval}, the call passes {x.aval}")
            if info.donated != don:
                raise ValueError("its donations differ")
            if s is not None and not s.is_equivalent_to(x.sharding, x.ndim):
                raise ValueError(f"an argument's sharding is {s}, the call's {x.sharding}")
        if self._out_shardings is not None:
            want = jax.tree.leaves(self._out_shardings)
            got = jax.tree.leaves(compiled.output_shardings)
            outs = jax.tree.leaves(compiled.out_info)
            if len(want) != len(got) or not all(
                w.is_equivalent_to(g, o.ndim) for w, g, o in zip(want, got, outs, strict=True)
            ):
                raise ValueError("its output shardings differ")
