"""``HiCacheConfig``: the frozen, validated knobs of a :class:`~jaxhicache.cache.HiCache`.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError``
naming the field and the value. Enums are required where a field takes one of
a few choices (no strings rewritten into enums behind the caller's back).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import final

from jaxhicache.cache.l3 import StorageConfig
from jaxhicache.pools.host import DEFAULT_RESERVE_BYTES
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.transfer import CopyPath
from jaxhicache.tree import WritePolicy
from kernels_pallas.common import Backend, Layout, PagedCopyTuning

__all__ = ["HiCacheConfig"]


def _positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if type(value) is bool or not isinstance(value, int) or value < 1:
        raise ValueError(f"HiCacheConfig.{name} must be a positive int, got {value!r}")


def _enum(name: str, value, cls, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, cls):
        choices = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
        raise ValueError(f"HiCacheConfig.{name} must be one of {choices}; got {value!r}")


@final
@dataclasses.dataclass(frozen=True)
class HiCacheConfig:
    """Capacities, policies and transfer settings of one cache.

    Attributes:
      device_pages: device (L1) capacity of the full-page space, in pages.
      device_swa_pages: device capacity of the SWA-page space (default:
        ``device_pages``; ignored for models without an SWA component).
      host_pages: host (L2) capacity of the full-page space (default:
        ``host_ratio`` × the device capacity).
      host_swa_pages: host capacity of the SWA-page space (default: ``host_ratio``
        × the device SWA capacity).
      host_ratio: host capacity relative to device when ``host_pages`` is unset.
      write_policy: when device pages are backed up to host.
      host_layout: host slab layout (``PAGE_FIRST``: storage friendly, default).
      backend: paged-copy kernel backend (``None``: Triton on GPU, XLA on CPU).
      tuning: Pallas launch parameters (``None``: the default tuning).
      copy_path: ``STAGED`` (gather kernel → pinned-host staging; GPUs) or
        ``DIRECT`` (rows copied between pool buffers and slabs; CPU meshes only).
        ``None`` follows the mesh's device platform.
      host_reserve_bytes: host memory the host slabs must leave available to
        everything else; building the cache raises ``ValueError`` when
        ``MemAvailable`` minus this is smaller than the slabs (default 2 GiB;
        0: only the slabs must fit).
      partition: explicit per-stage layer counts, any sequence of positive ints
        (stored as a tuple; default: the reference split).
      storage: the L3 tier's knobs (``None``: no L3); the backend is passed to
        ``HiCache`` itself.
      check_every: debug (multi-process): every ``check_every`` control-plane steps
        (admit / insert) compare a digest of the cache state across processes and
        raise ``DivergenceError`` if they differ (one all-reduce); 0 = off.
      state_interval: recurrent hybrids: tokens between snapshot positions, a
        multiple of the page size (default: 64 rounded up to the page size). A hit
        ends on this grid.
      device_state_slots: recurrent hybrids: device snapshot slots (default: one per
        grid step of the device pages, plus 8 for requests in flight).
      host_state_slots: recurrent hybrids: host snapshot slots (default: one per grid
        step of the host pages). Sizing rule: at least ``device_state_slots``, so
        every device snapshot can be backed up (fewer is refused when the cache is
        built: the reference system's host state pool could not hold the snapshots
        of the host KV it anchors).

    Raises:
      ValueError: a field of the wrong type or out of range, naming the field
        and the value (enum fields need the enum, not its string).
    """

    device_pages: int
    device_swa_pages: int | None = None
    host_pages: int | None = None
    host_swa_pages: int | None = None
    host_ratio: float = 2.0
    write_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    host_layout: Layout = Layout.PAGE_FIRST
    backend: Backend | None = None
    tuning: PagedCopyTuning | None = None
    copy_path: CopyPath | None = None
    host_reserve_bytes: int = DEFAULT_RESERVE_BYTES
    partition: tuple[int, ...] | None = None
    storage: StorageConfig | None = None
    check_every: int = 0
    state_interval: int | None = None
    device_state_slots: int | None = None
    host_state_slots: int | None = None

    def __post_init__(self) -> None:
        _positive_int("device_pages", self.device_pages)
        for name in (
            "device_swa_pages",
            "host_pages",
            "host_swa_pages",
            "state_interval",
            "device_state_slots",
            "host_state_slots",
        ):
            _positive_int(name, getattr(self, name), allow_none=True)
        r = self.host_ratio
        if type(r) is bool or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"HiCacheConfig.host_ratio must be a finite number > 0, got {r!r}")
        _enum("write_policy", self.write_policy, WritePolicy)
        _enum("host_layout", self.host_layout, Layout)
        _enum("backend", self.backend, Backend, allow_none=True)
        _enum("copy_path", self.copy_path, CopyPath, allow_none=True)
        if self.tuning is not None and not isinstance(self.tuning, PagedCopyTuning):
            raise ValueError(f"HiCacheConfig.tuning must be a PagedCopyTuning, got {self.tuning!r}")
        if self.storage is not None and not isinstance(self.storage, StorageConfig):
            raise ValueError(f"HiCacheConfig.storage must be a StorageConfig, got {self.storage!r}")
        c = self.check_every
        if type(c) is not int or c < 0:
            raise ValueError(f"HiCacheConfig.check_every must be an int >= 0, got {c!r}")
        b = self.host_reserve_bytes
        if type(b) is not int or b < 0:
            raise ValueError(f"HiCacheConfig.host_reserve_bytes must be an int >= 0, got {b!r}")
        if self.partition is not None:
            if isinstance(self.partition, str | bytes) or not isinstance(self.partition, Sequence):
                raise ValueError(
                    "HiCacheConfig.partition must be a sequence of ints (list or tuple), "
                    f"got {self.partition!r}"
                )
            for c in self.partition:
                _positive_int("partition entry", c)
            # A list is accepted as PagedModel accepts it; stored as a tuple (hashable).
            object.__setattr__(self, "partition", tuple(int(c) for c in self.partition))

    # ------------------------------------------------------------- capacities
    def device_swa_capacity(self, spec: ModelCacheSpec) -> int:
        """Device capacity of the SWA-page space.

        Args:
          spec: the model's cache spec.

        Returns:
          ``device_swa_pages`` (default ``device_pages``); 0 for a model without
          an SWA component.
        """
        if not spec.swa_trailing_pages:
            return 0
        return self.device_swa_pages or self.device_pages

    def host_capacity(self) -> int:
        """Host capacity of the full-page space.

        Returns:
          ``host_pages``, else ``host_ratio × device_pages`` (at least 1).
        """
        return self.host_pages or max(1, int(self.device_pages * self.host_ratio))

    def host_swa_capacity(self, spec: ModelCacheSpec) -> int:
        """Host capacity of the SWA-page space.

        Args:
          spec: the model's cache spec.

        Returns:
          ``host_swa_pages``, else ``host_ratio ×`` the device SWA capacity (at
          least 1); 0 for a model without an SWA component.
        """
        if not spec.swa_trailing_pages:
            return 0
        return self.host_swa_pages or max(1, int(self.device_swa_capacity(spec) * self.host_ratio))

    # ------------------------------------------------------------- recurrent states
    def state_grid(self, spec: ModelCacheSpec) -> int:
        """Tokens between snapshot positions (0 for a spec without recurrent states).

        Args:
          spec: the model's cache spec.

        Returns:
          ``state_interval``, else 64 rounded up to a multiple of the page size.

        Raises:
          ValueError: ``state_interval`` is not a multiple of the page size.
        """
        if not spec.is_hybrid:
            return 0
        ps = spec.page_size
        grid = self.state_interval or -(-64 // ps) * ps
        if grid % ps:
            raise ValueError(
                f"HiCacheConfig.state_interval={grid} must be a multiple of the page size {ps}"
            )
        return grid

    def state_slots(self, spec: ModelCacheSpec) -> tuple[int, int]:
        """Device and host snapshot slots (both 0 for a spec without recurrent states).

        Args:
          spec: the model's cache spec.

        Returns:
          ``(device, host)``; see the class attributes for the defaults.

        Raises:
          ValueError: fewer host slots than device slots (the sizing rule).
        """
        grid = self.state_grid(spec)
        if not grid:
            return 0, 0
        steps = grid // spec.page_size
        dev = self.device_state_slots or self.device_pages // steps + 8
        host = self.host_state_slots or max(dev, self.host_capacity() // steps)
        if host < dev:
            raise ValueError(
                f"HiCacheConfig.host_state_slots={host} is below device_state_slots={dev}: "
                "every device snapshot must be able to reach host (raise host_state_slots)"
            )
        return dev, host
