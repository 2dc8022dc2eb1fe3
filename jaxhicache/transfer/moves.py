"""What a transfer moves and what it hands back: page moves, bucketed ids, handles, counters.

Control-plane values only (numpy and Python): no program is built here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import final

import jax
import numpy as np

from jaxhicache.spec import PageSpace
from kernels_pallas.common import bucket_size, validate_page_ids

_EMPTY = np.zeros(0, np.int32)

__all__ = [
    "BackupHandle",
    "LoadHandle",
    "PageMove",
    "TransferStats",
    "bucketed_ids",
]


@final
@dataclasses.dataclass(frozen=True)
class PageMove:
    """Which pages move: device and host ids per id space, pairwise.

    One move may carry the pages of several requests (a batch of load-backs):
    the ids only need to be distinct where a write lands (device ids of a load,
    host ids of a backup). Build one with :meth:`of`.

    Attributes:
      full_device: int32 device full-page ids; ``full_device[i]`` pairs with
        ``full_host[i]``.
      full_host: int32 host full-page ids.
      swa_device: int32 device SWA-page ids; ``swa_device[j]`` pairs with
        ``swa_host[j]``.
      swa_host: int32 host SWA-page ids.
      state_device: int32 device snapshot-slot ids (recurrent states); pairs with
        ``state_host``.
      state_host: int32 host snapshot-slot ids.
    """

    full_device: np.ndarray
    full_host: np.ndarray
    swa_device: np.ndarray
    swa_host: np.ndarray
    state_device: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY)
    state_host: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY)

    @classmethod
    def of(
        cls,
        full_device=(),
        full_host=(),
        swa_device=(),
        swa_host=(),
        state_device=(),
        state_host=(),
    ) -> PageMove:
        """A move from id sequences.

        Args:
          full_device, full_host, swa_device, swa_host, state_device, state_host:
            page (or snapshot-slot) ids (any int array-likes, flattened and
            converted to int32); default empty.

        Returns:
          The move.

        Raises:
          ValueError: a space's device and host ids differ in count.
        """
        arrs = [
            np.asarray(x, np.int32).reshape(-1)
            for x in (full_device, full_host, swa_device, swa_host, state_device, state_host)
        ]
        for name, d, h in zip(("full", "SWA", "state"), arrs[0::2], arrs[1::2], strict=True):
            if d.size != h.size:
                raise ValueError(f"{d.size} {name} device ids but {h.size} {name} host ids")
        return cls(*arrs)

    def ids(self, space: PageSpace) -> tuple[np.ndarray, np.ndarray]:
        """The ids of one page space.

        Args:
          space: a page space (``STATE``: snapshot slots).

        Returns:
          ``(device_ids, host_ids)``, pairwise.
        """
        if space is PageSpace.FULL:
            return self.full_device, self.full_host
        if space is PageSpace.SWA:
            return self.swa_device, self.swa_host
        return self.state_device, self.state_host

    @property
    def empty(self) -> bool:
        """Whether the move copies no page."""
        return not (self.full_device.size or self.swa_device.size or self.state_device.size)


def bucketed_ids(ids: np.ndarray, num_pages: int, *, unique: bool, pad: int | None = None):
    """Validates ``ids`` against ``[0, num_pages)`` and pads them to ``bucket_size(n)``.

    The padding is ``pad`` (default: the sentinel ``num_pages``, which no kernel
    writes). Returns a host int32 array ``[bucket_size(n)]``; ``ValueError``
    names out-of-range (and, with ``unique``, duplicate) ids.
    """
    ids = validate_page_ids(ids, num_pages, unique=unique)
    nb = bucket_size(ids.size)
    fill = num_pages if pad is None else pad
    return np.concatenate([ids, np.full(nb - ids.size, fill, np.int32)]).astype(np.int32)


@dataclasses.dataclass
class TransferStats:
    """Cumulative transfer counters (bytes are real rows, padding excluded).

    Attributes:
      backup_bytes: bytes copied D2H (into the slabs).
      load_bytes: bytes copied H2D.
      backup_seconds: wall time of the backups, from issue to landing.
      load_seconds: wall time of issuing the loads.
      backups: backups landed.
      loads: loads issued.
      stale_rows_skipped: backup rows not written because their host page was
        freed or reallocated since the backup was issued.
    """

    backup_bytes: int = 0
    load_bytes: int = 0
    backup_seconds: float = 0.0
    load_seconds: float = 0.0
    backups: int = 0
    loads: int = 0
    stale_rows_skipped: int = 0


@final
class BackupHandle:
    """An in-flight D2H backup. ``wait()`` returns the bytes written into the slabs.

    Args:
      future: the future of the copy into the slabs (its result: bytes written).
    """

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        """Whether the backup finished (landed or failed); never blocks.

        Returns:
          ``True`` once :meth:`wait` would return or raise without blocking.
        """
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the backup finished.

        Args:
          timeout: seconds to wait at most (``None``: no limit).

        Returns:
          The bytes written into the slabs (stale rows skipped).

        Raises:
          TimeoutError: the backup did not finish within ``timeout``.
          Exception: the copy's own error, unchanged.
        """
        return self._future.result(timeout)


@final
class LoadHandle:
    """An issued H2D load; ``wait(layer)`` blocks until that stage-local layer landed.

    Args:
      tokens: maps a stage-local layer (or ``None``: every layer) to an output of
        the program that wrote it; an output is ready exactly when its program is.
    """

    def __init__(self, tokens: dict[int | None, jax.Array]):
        self._tokens = dict(tokens)

    def wait(self, layer: int | None = None) -> None:
        """Waits for one stage-local layer to land.

        Args:
          layer: the stage-local layer; ``None``: every layer of the load.

        Raises:
          ValueError: ``layer`` was not part of this load.
        """
        if layer is None:
            jax.block_until_ready(list(self._tokens.values()))
        elif layer in self._tokens:
            jax.block_until_ready(self._tokens[layer])
        elif None in self._tokens:  # an all-layer load covers every layer
            jax.block_until_ready(self._tokens[None])
        else:
            have = sorted(k for k in self._tokens if k is not None)
            raise ValueError(f"layer {layer} was not part of this load ({have})")
