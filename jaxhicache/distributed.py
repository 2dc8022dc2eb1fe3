"""Multi-controller JAX: which stages a process owns, global inputs, and agreement.

With ``jax.distributed`` initialised, every process runs the same program over a
``('pp', 'tp')`` mesh whose ``'pp'`` axis spans processes. A process owns the
stages whose devices it holds (all of a stage's ``'tp'`` devices must be in one
process): it allocates host slabs and moves bytes only for them, and it takes
every control-plane decision (page ids, evictions, backups) itself, identically
to the others, from the same request stream::

    request stream ──> tree / allocators / policies      (every process, no messages)
                            │
          local facts ──────┤  a backup landed here? an L3 object present for my
                            │  stages' keys? (can differ between processes)
                            v
                      Agreement.min(counts)   one small all-reduce (MIN), so every
                            │                 process applies the same outcome
                            v
                      same tree everywhere    (checked by Agreement.digests_equal)

Single process (``jax.process_count() == 1``): every stage is local and
:class:`Agreement` is the identity, with no collective.

:func:`put_global` builds a global array from a value every process holds
(``jax.make_array_from_callback``: each process fills its own shards, nothing is
compared or sent); :func:`fetch` brings a replicated (or fully addressable)
result to the host.

:func:`initialize` starts the runtime from flags or the environment
(``JAXHICACHE_COORDINATOR``, ``JAXHICACHE_NUM_PROCESSES``,
``JAXHICACHE_PROCESS_ID``, ``JAXHICACHE_LOCAL_DEVICES``) with CPU collectives over
gloo and bounded timeouts, so a dead peer fails the others with an error instead
of a hang. :mod:`jaxhicache.launch` starts N local processes that way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Sequence
from typing import final

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.mesh import PP

__all__ = [
    "Agreement",
    "DistributedConfig",
    "DivergenceError",
    "PeerFailure",
    "fetch",
    "initialize",
    "local_stages",
    "put_global",
]

ENV_COORDINATOR = "JAXHICACHE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXHICACHE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXHICACHE_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXHICACHE_LOCAL_DEVICES"
ENV_HEARTBEAT = "JAXHICACHE_HEARTBEAT_TIMEOUT_S"


class PeerFailure(RuntimeError):
    """A collective between the processes failed: another process died or hung."""


class DivergenceError(RuntimeError):
    """Processes that must take identical decisions hold different cache states."""


# ----------------------------------------------------------------- stages


def local_stages(mesh: Mesh) -> tuple[int, ...]:
    """The ``'pp'`` ranks whose devices this process holds.

    Args:
      mesh: the ``('pp', 'tp')`` mesh.

    Returns:
      This process's stage ranks, ascending (every rank in a single process).

    Raises:
      ValueError: a stage's devices span processes (its host slabs and bytes would
        have no single owner), or this process holds no stage.
    """
    me = jax.process_index()
    grid = mesh.devices.reshape(mesh.shape[PP], -1)
    out = []
    for rank, row in enumerate(grid):
        owners = {d.process_index for d in row}
        if len(owners) != 1:
            raise ValueError(
                f"stage {rank}'s devices belong to processes {sorted(owners)}: each PP stage "
                "must live in one process (put the 'tp' axis inside a process)"
            )
        if owners == {me}:
            out.append(rank)
    if not out:
        raise ValueError(
            f"process {me} holds no stage of the mesh (pp={mesh.shape[PP]}): every process "
            "must own at least one stage"
        )
    return tuple(out)


# ---------------------------------------------------------------- arrays


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (a value every process holds in full) as a global array with ``sharding``.

    Each process fills only its addressable shards; nothing is compared or sent
    (unlike ``jax.device_put`` of host data to a multi-process sharding).

    Args:
      x: an array-like of the global shape, identical in every process.
      sharding: the global array's sharding.

    Returns:
      The global ``jax.Array``.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_global_tree(tree, sharding: NamedSharding):
    """:func:`put_global` over every leaf of a pytree."""
    return jax.tree.map(lambda a: put_global(a, sharding), tree)


def fetch(x: jax.Array) -> np.ndarray:
    """A replicated or fully addressable array as numpy on this process.

    Args:
      x: the array.

    Returns:
      Its value (for a replicated array, this process's first copy).

    Raises:
      ValueError: ``x`` is sharded across processes and not replicated.
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    raise ValueError(
        f"fetch needs a replicated or fully addressable array; this one is sharded "
        f"{x.sharding} across processes (gather it first)"
    )


# -------------------------------------------------------------- agreement


@final
class Agreement:
    """Element-wise MIN of small int vectors across all processes (one all-reduce).

    Every process must call :meth:`min` at the same point of the same control flow
    with a vector of the same length. Single process: returns the input, no
    collective; so is ``local_only=True`` (for tests that show what agreement
    prevents). ``calls`` and ``seconds`` count the collectives taken.

    Args:
      local_only: agree with no one (act as a single process even in a
        multi-process run).
    """

    def __init__(self, *, local_only: bool = False):
        self.processes = 1 if local_only else jax.process_count()
        self.process_index = 0 if local_only else jax.process_index()
        self.calls = 0
        self.seconds = 0.0
        self._fns: dict[int, object] = {}
        if self.processes > 1:
            devs = [None] * self.processes
            for d in jax.devices():
                if devs[d.process_index] is None or d.id < devs[d.process_index].id:
                    devs[d.process_index] = d
            self._mesh = Mesh(np.asarray(devs, dtype=object), ("process",))
            self._local = devs[jax.process_index()]

    @property
    def active(self) -> bool:
        """Whether there is more than one process to agree with."""
        return self.processes > 1

    def min(self, values: Sequence[int] | np.ndarray) -> np.ndarray:
        """The element-wise minimum over processes of ``values``.

        Args:
          values: a flat int vector, the same length in every process.

        Returns:
          An int64 vector of that length (``values`` itself, as int64, when there is
          no other process or the vector is empty).

        Raises:
          ValueError: a value does not fit int32.
          PeerFailure: the all-reduce failed: another process died or left.
        """
        v = np.asarray(values, np.int64).reshape(-1)
        if not self.active or v.size == 0:
            return v
        t0 = time.perf_counter()
        n = 1 << max(0, math.ceil(math.log2(v.size)))  # one compile per power of two
        padded = np.full((1, n), np.iinfo(np.int32).max, np.int32)
        if v.size and (v.max() > np.iinfo(np.int32).max or v.min() < np.iinfo(np.int32).min):
            raise ValueError(f"agreement values must fit int32, got {v.min()}..{v.max()}")
        padded[0, : v.size] = v
        sharding = NamedSharding(self._mesh, P("process"))
        local = jax.device_put(padded, self._local)
        arr = jax.make_array_from_single_device_arrays((self.processes, n), sharding, [local])
        try:
            out = fetch(self._fn(n)(arr))
        except jax.errors.JaxRuntimeError as e:
            raise PeerFailure(
                f"process {jax.process_index()}/{self.processes}: the agreement all-reduce "
                f"failed; another process died or left ({e})"
            ) from e
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out[: v.size].astype(np.int64)

    def _fn(self, n: int):
        if n not in self._fns:
            rep = NamedSharding(self._mesh, P())
            self._fns[n] = jax.jit(lambda a: jnp.min(a, axis=0), out_shardings=rep)
        return self._fns[n]

    def digests_equal(self, digest: bytes) -> bool:
        """Whether every process passed the same ``digest``.

        Args:
          digest: this process's bytes (e.g. a tree digest); 8 bytes of their
            BLAKE2b hash are compared, in one all-reduce.

        Returns:
          ``True`` when all processes agree (always, with one process).

        Raises:
          PeerFailure: as :meth:`min` raises it.
        """
        if not self.active:
            return True
        h = np.frombuffer(hashlib.blake2b(digest, digest_size=8).digest(), np.uint16)
        v = h.astype(np.int64)
        both = self.min(np.concatenate([v, -v]))  # MIN and -MAX in one all-reduce
        return bool(np.array_equal(both[:4], -both[4:]))


# ------------------------------------------------------------------ start


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in a multi-process run (see :func:`initialize`).

    Attributes:
      coordinator: ``HOST:PORT`` of process 0's coordination service.
      num_processes: processes in the run (``>= 1``).
      process_id: this process's index, in ``[0, num_processes)``.
      local_devices: fake CPU devices per process (CPU runs only; ``None``: JAX's
        default).
      heartbeat_timeout_s: a process that stops answering this long fails the
        others (seconds, ``>= 1``; also the shutdown timeout).
      init_timeout_s: how long start-up waits for every process (seconds, ``>= 1``).

    Raises:
      ValueError: a count or timeout that is not an int in range, ``process_id``
        not below ``num_processes``, or ``coordinator`` not ``HOST:PORT``.
    """

    coordinator: str
    num_processes: int
    process_id: int
    local_devices: int | None = None
    heartbeat_timeout_s: int = 10
    init_timeout_s: int = 60

    def __post_init__(self):
        for name, lo in (
            ("num_processes", 1),
            ("process_id", 0),
            ("heartbeat_timeout_s", 1),
            ("init_timeout_s", 1),
        ):
            v = getattr(self, name)
            if type(v) is not int or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.process_id >= self.num_processes:
            raise ValueError(
                f"process_id {self.process_id} is not below num_processes {self.num_processes}"
            )
        n = self.local_devices
        if n is not None and (type(n) is not int or n < 1):
            raise ValueError(f"local_devices must be an int >= 1, got {n!r}")
        host, _, port = str(self.coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")

    @classmethod
    def from_env(cls, environ=None) -> DistributedConfig | None:
        """The config the launcher put in the environment.

        Args:
          environ: the mapping to read (default ``os.environ``): the
            ``JAXHICACHE_COORDINATOR``, ``_NUM_PROCESSES``, ``_PROCESS_ID``,
            ``_LOCAL_DEVICES`` and ``_HEARTBEAT_TIMEOUT_S`` variables.

        Returns:
          The config, or ``None`` when ``JAXHICACHE_COORDINATOR`` is not set.

        Raises:
          ValueError: a required number is missing or not an int, or the values
            fail the config's checks.
        """
        env = os.environ if environ is None else environ
        if ENV_COORDINATOR not in env:
            return None

        def num(name):
            try:
                return int(env[name])
            except (KeyError, ValueError):
                raise ValueError(f"{name} must be set to an int, got {env.get(name)!r}") from None

        return cls(
            env[ENV_COORDINATOR],
            num(ENV_NUM_PROCESSES),
            num(ENV_PROCESS_ID),
            num(ENV_LOCAL_DEVICES) if ENV_LOCAL_DEVICES in env else None,
            num(ENV_HEARTBEAT) if ENV_HEARTBEAT in env else 10,
        )

    def env(self) -> dict[str, str]:
        """This config as environment variables, for a launched process.

        Returns:
          The variables :meth:`from_env` reads back into an equal config (except
          ``init_timeout_s``, which is not passed).
        """
        out = {
            ENV_COORDINATOR: self.coordinator,
            ENV_NUM_PROCESSES: str(self.num_processes),
            ENV_PROCESS_ID: str(self.process_id),
            ENV_HEARTBEAT: str(self.heartbeat_timeout_s),
        }
        if self.local_devices is not None:
            out[ENV_LOCAL_DEVICES] = str(self.local_devices)
        return out


def initialize(config: DistributedConfig | None = None, *, cpu: bool | None = None) -> bool:
    """Starts multi-controller JAX (``jax.distributed.initialize``). Must run before
    any other JAX call.

    Args:
      config: where this process sits; ``None``: :meth:`DistributedConfig.from_env`.
      cpu: run on CPU with ``local_devices`` fake devices and gloo collectives;
        ``None``: when ``JAX_PLATFORMS`` is ``cpu``.

    Returns:
      ``True`` once started; ``False`` (and nothing done) when there is no config.

    Raises:
      ValueError: from :meth:`DistributedConfig.from_env` (a malformed environment).
    """
    config = config if config is not None else DistributedConfig.from_env()
    if config is None:
        return False
    if cpu is None:
        cpu = os.environ.get("JAX_PLATFORMS", "") == "cpu"
    if cpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if config.local_devices is not None:
            jax.config.update("jax_num_cpu_devices", config.local_devices)
    jax.distributed.initialize(
        config.coordinator,
        config.num_processes,
        config.process_id,
        initialization_timeout=config.init_timeout_s,
        heartbeat_timeout_seconds=config.heartbeat_timeout_s,
        shutdown_timeout_seconds=config.heartbeat_timeout_s,
    )
    return True
