"""What a :mod:`jaxhicache.program_cache` entry is keyed on, as text.

The keys of a cached executable are built from the parts :func:`call_parts`
returns: everything that decides which program a call of a jitted function traces
to and whether an executable built for it runs here. Any part without a stable text
(an object address in a ``repr``, a sharding type it does not know, a package
without source files) makes the call uncacheable instead: :func:`call_parts` then
says why, and the caller takes plain ``jax.jit``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import platform
import sys
import time
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

__all__ = [
    "call_parts",
    "context_text",
    "devices_of",
    "host_cpu",
    "sharding_text",
    "source_digest",
    "sources_unchanged",
]


def _process_start() -> float:
    """When this process started (wall clock, Linux: ``/proc/self/stat`` against
    ``/proc/uptime``, to a clock tick), plus one tick: no module is imported that
    early. Elsewhere: now (this module is imported with the package)."""
    now = time.time()
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        return min(now, now - uptime + (started + 1) * tick)
    except (OSError, ValueError, IndexError):
        return now


_STARTED_NS = int(_process_start() * 1e9)


def _package_files(name: str) -> list[str] | None:
    mod = sys.modules.get(name) or importlib.import_module(name)
    roots = list(getattr(mod, "__path__", []) or [])
    if not roots:
        f = getattr(mod, "__file__", None)
        return [os.path.abspath(f)] if f and f.endswith(".py") else None
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@functools.cache
def source_digest(name: str) -> tuple[str, tuple[tuple[str, tuple[int, int]], ...]] | None:
    """SHA-256 of a package's (or module's) ``.py`` files, hashed once per process.

    Args:
      name: a top-level package or module name (imported if it is not yet).

    Returns:
      ``(hex digest, ((path, (mtime_ns, size)), ...))`` with each file's stat when
      it was hashed, or ``None`` when ``name`` cannot be imported or has no source
      files.
    """
    try:
        files = _package_files(name)
    except Exception:  # not importable: no key
        return None
    if not files:
        return None
    h = hashlib.sha256()
    stats = []
    for path in files:
        stats.append((path, _stat(path)))
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{os.path.relpath(path, os.path.dirname(files[0]))}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest(), tuple(stats)


def sources_unchanged(names) -> bool:
    """Whether the files :func:`source_digest` hashed are what this process imported.

    A program traced in this process ran the code that was imported; if a file
    changed after the process started, an entry keyed on its digest could carry the
    old code's program under the new code's key.

    Args:
      names: the package names.

    Returns:
      ``True`` when every file was last modified before this process started and
      still has the size and mtime it had when it was hashed.
    """
    for name in names:
        got = source_digest(name)
        if got is None:
            return False
        try:
            if any(st[0] >= _STARTED_NS or _stat(f) != st for f, st in got[1]):
                return False
        except OSError:
            return False
    return True


@functools.cache
def host_cpu() -> str:
    """A digest of the host CPU's model and feature flags (an XLA:CPU executable is
    built for them).

    Returns:
      A hex SHA-256.
    """
    text = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += "\n" + " ".join(line.split())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()


def sharding_text(s) -> str | None:
    """A stable text of a sharding: mesh axes, shape, device ids, axis types, spec, memory.

    Args:
      s: a sharding.

    Returns:
      The text, or ``None`` for a sharding other than ``NamedSharding`` /
      ``SingleDeviceSharding``.
    """
    if isinstance(s, NamedSharding):
        m = s.mesh
        ids = ",".join(str(d.id) for d in m.devices.flat)
        axis_types = getattr(m, "axis_types", None)
        return f"N{m.axis_names}{m.devices.shape}[{ids}]{axis_types}{s.spec}{s.memory_kind}"
    if isinstance(s, SingleDeviceSharding):
        (d,) = s.device_set
        return f"S{cast(Any, d).id}{s.memory_kind}"
    return None


def devices_of(s) -> tuple | None:
    """The ordered devices of a sharding (a mesh's devices, flattened).

    Args:
      s: a sharding.

    Returns:
      The devices, or ``None`` for a sharding type :func:`sharding_text` does not know.
    """
    if isinstance(s, NamedSharding):
        return tuple(s.mesh.devices.flat)
    if isinstance(s, SingleDeviceSharding):
        return tuple(s.device_set)
    return None


def context_text(ctx: tuple) -> str | None:
    """JAX's tracing context (what ``jax.jit`` keys its own cache on) as text.

    Args:
      ctx: ``jax._src.config.trace_context()``.

    Returns:
      The text, or ``None`` when a part has no stable text (an object address in its
      ``repr``; an empty ``AxisEnv``, the top level's, is written ``AxisEnv()``).
    """
    parts = []
    for x in ctx:
        r = repr(x)
        if " at 0x" in r:
            names = ("axis_sizes", "spmd_axis_names", "explicit_mesh_axis_names")
            if type(x).__name__ != "AxisEnv" or any(getattr(x, f, None) for f in names):
                return None
            r = "AxisEnv()"
        parts.append(r)
    return "(" + ", ".join(parts) + ")"


def _versions() -> str:
    import jaxlib

    return (
        f"python={sys.version} numpy={np.__version__} "
        f"jax={jax.__version__} jaxlib={jaxlib.__version__}"
    )


def call_parts(packages, leaves, tree, ctx, platforms) -> tuple[dict[str, str] | None, str]:
    """The key parts of one call of a cached program, or why it has none.

    Args:
      packages: the packages whose source the program depends on.
      leaves: the call's flattened arguments (concrete ``jax.Array`` s).
      tree: their tree.
      ctx: JAX's tracing context at the call.
      platforms: the platforms allowed.

    Returns:
      ``({"code", "env", "context", "tree", "args": text}, "")``, or ``(None,
      reason)`` with reason one of ``processes``, ``sharding``, ``platform``,
      ``code``, ``context``, ``tree``. ``env`` is everything about the machine and
      the versions: Python, numpy, jax, jaxlib, the backend, the program's devices,
      the device count, the host CPU and ``XLA_FLAGS``.
    """
    if jax.process_count() > 1:
        return None, "processes"
    devices = devices_of(leaves[0].sharding) if leaves else None
    if devices is None:
        return None, "sharding"
    if devices[0].platform not in platforms:
        return None, "platform"
    code = []
    for p in packages:
        g = source_digest(p)
        if g is None:
            return None, "code"
        code.append(f"{p}:{g[0]}")
    ctx_text = context_text(ctx)
    if ctx_text is None:
        return None, "context"
    args = []
    for x in leaves:
        s = sharding_text(x.sharding)
        if s is None or devices_of(x.sharding) != devices:  # one device assignment
            return None, "sharding"
        args.append(f"{x.shape}{x.dtype}w{int(x.weak_type)}c{getattr(x, '_committed', '')}{s}")
    tree_text = str(tree)
    if " at 0x" in tree_text:
        return None, "tree"
    client = devices[0].client
    device_text = [f"{d.id}:{d.platform}:{d.device_kind}:{d.process_index}" for d in devices]
    env = "\n".join(
        [
            _versions(),
            f"backend={client.platform} {client.platform_version} devices={device_text}",
            f"all_devices={jax.device_count()} cpu={host_cpu()}",
            f"xla_flags={os.environ.get('XLA_FLAGS', '')}",
        ]
    )
    parts = {
        "code": " ".join(code),
        "env": env,
        "context": ctx_text,
        "tree": tree_text,
        "args": ";".join(args),
    }
    return parts, ""
