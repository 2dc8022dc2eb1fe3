"""``StorageConfig``: the knobs of the cache's L3 tier (validated; ``ValueError`` names
the field and the value), with the enums ``PrefetchPolicy`` and ``LookupWindows``."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import final

__all__ = ["LookupWindows", "PrefetchPolicy", "StorageConfig"]


class PrefetchPolicy(enum.Enum):
    """How long ``admit`` waits for a request's L3 prefetch."""

    BEST_EFFORT = "best_effort"  # take what has arrived, never wait
    WAIT_COMPLETE = "wait_complete"  # wait for the whole prefetch
    TIMEOUT = "timeout"  # wait up to base + per_1k_tokens * n / 1024, capped


class LookupWindows(enum.StrEnum):
    """Which SWA windows an L3 lookup's one batch of existence checks covers.

    A ``StrEnum``: ``StorageConfig(lookup_windows="end")`` is accepted and stored
    as ``LookupWindows.END``, and a member compares equal to its string.
    """

    AUTO = "auto"  # ALL unless the cost model says the extra checks cost more than a round trip
    ALL = "all"  # the window of every checkpoint: a hit ending anywhere costs one round trip
    END = "end"  # the last page's only: the hit end's window costs a second round trip


@final
@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Knobs of the L3 tier (the backend itself is passed to ``HiCache``).

    Attributes:
      model_id: the model's id in object keys (instances share objects only
        when their model id, cache format and stage layer ranges agree).
      prefetch_threshold: tokens an L3 hit must add to be fetched (default 256; at
        least 1: a hit adds whole pages, so 0 would mean the same as 1 and is
        refused with ``ValueError``).
      prefetch_policy: how long ``admit`` waits for a request's prefetch (see
        :meth:`wait_seconds`).
      timeout_base_s: ``TIMEOUT``'s wait for any prefetch, in seconds.
      timeout_per_1k_tokens_s: ``TIMEOUT``'s added wait per 1024 tokens.
      timeout_max_s: ``TIMEOUT``'s cap on the wait.
      swa_checkpoint_every: SWA-space objects (the window a hit ends on) are
        written for every k-th page boundary and the end of each backed-up
        sequence; an L3 hit ends at such a checkpoint. 1 = every page.
      backup: write host pages to L3 after their D2H backup lands.
      lookup_in_flight: existence checks in flight at once in one lookup (every
        check of a lookup is issued in one batch; ~``ceil(checks / this)`` round trips).
      fetch_in_flight: objects read at once by one prefetch, over all its stages and
        page spaces (cover the store's latency: a store answering in ``L`` seconds at
        ``B`` bytes/s wants about ``L * B / object bytes`` in flight).
      lookup_windows: a :class:`LookupWindows` (or its string value, converted):
        which SWA windows a lookup's one batch checks. ``ALL``: the window of every
        checkpoint (with ``swa_checkpoint_every=1``: every page), so a hit ending
        anywhere costs one round trip. ``END``: the last page's only; the hit end's
        window costs a second round trip (the checkpoints below it a third if that
        one is incomplete), for about half the requests. ``AUTO`` (default):
        ``ALL`` unless the cost model's estimates say the extra checks take the
        store longer than a round trip (a store serving requests one after
        another).
      lookup_timeout_s: the most a lookup may delay an admission; a lookup not back
        by then is a miss (a stalled store costs at most this).
      cost_model: fetch only the part of a hit that the running estimates say is
        cheaper to load than to recompute (``False``: fetch every hit).
      store_latency_s: the cost model's prior (until observed) for a store
        request's round trip.
      store_bytes_per_s: its prior for the store's read bandwidth.
      recompute_s_per_token: its prior for the prefill cost of one token (fed by
        the serving engine through ``StorageTier.observe_recompute``).
      write_nice: how much lower the write-back thread's CPU priority is than the
        serving thread's (Linux nice steps, 0 to 19; 0: the same), so writes to
        storage yield the cores to decode steps; writes are batched per drain.
      pages_per_object: full-space pages per storage object (``g``, default 1). On
        a store that charges per request (object stores: S3, GCS), ``g > 1``
        divides the requests of a lookup and of a fetch by ``g``: the group
        ``[g i, g i + g)`` of a prefix is one object, written once all its pages are
        backed up (a sequence's last ``< g`` pages stay out of L3 until it grows),
        and a hit fetches whole groups (the pages of a group before the tree's match
        or after the hit end go to scratch host slots). Part of the object keys:
        instances share objects only with the same ``g``. Aim for objects of about
        ``store latency x bandwidth`` bytes (a group's full-space bytes per stage);
        window and state objects stay one per page.

    Raises:
      ValueError: a field of the wrong type or out of range, naming the field and
        the value (``prefetch_policy`` needs the enum; ``lookup_windows`` takes
        the enum or one of ``"auto"``, ``"all"``, ``"end"``).
    """

    model_id: str
    prefetch_threshold: int = 256
    prefetch_policy: PrefetchPolicy = PrefetchPolicy.TIMEOUT
    timeout_base_s: float = 0.2
    timeout_per_1k_tokens_s: float = 0.1
    timeout_max_s: float = 5.0
    swa_checkpoint_every: int = 1
    backup: bool = True
    lookup_in_flight: int = 128
    fetch_in_flight: int = 32
    lookup_windows: LookupWindows = LookupWindows.AUTO
    lookup_timeout_s: float = 1.0
    cost_model: bool = True
    store_latency_s: float = 0.005
    store_bytes_per_s: float = 500e6
    recompute_s_per_token: float = 1e-4
    write_nice: int = 10
    pages_per_object: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(
                f"StorageConfig.model_id must be a non-empty str, got {self.model_id!r}"
            )
        for name, lo in (
            ("prefetch_threshold", 1),
            ("swa_checkpoint_every", 1),
            ("lookup_in_flight", 1),
            ("fetch_in_flight", 1),
            ("pages_per_object", 1),
        ):
            v = getattr(self, name)
            if type(v) is bool or not isinstance(v, int) or v < lo:
                raise ValueError(f"StorageConfig.{name} must be an int >= {lo}, got {v!r}")
        n = self.write_nice
        if type(n) is bool or not isinstance(n, int) or not 0 <= n <= 19:
            raise ValueError(f"StorageConfig.write_nice must be an int in [0, 19], got {n!r}")
        if not isinstance(self.prefetch_policy, PrefetchPolicy):
            raise ValueError(
                f"StorageConfig.prefetch_policy must be a PrefetchPolicy, got {self.prefetch_policy!r}"
            )
        for name, positive in (
            ("timeout_base_s", False),
            ("timeout_per_1k_tokens_s", False),
            ("timeout_max_s", False),
            ("lookup_timeout_s", True),
            ("store_latency_s", False),
            ("store_bytes_per_s", True),
            ("recompute_s_per_token", True),
        ):
            v = getattr(self, name)
            if (
                type(v) is bool
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
                or (positive and v == 0)
            ):
                raise ValueError(
                    f"StorageConfig.{name} must be a finite number {'>' if positive else '>='} 0, "
                    f"got {v!r}"
                )
        try:  # the plain strings stay accepted: stored as the enum member
            windows = LookupWindows(self.lookup_windows)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in LookupWindows)
            raise ValueError(
                f"StorageConfig.lookup_windows must be a LookupWindows or one of {choices}, "
                f"got {self.lookup_windows!r}"
            ) from None
        object.__setattr__(self, "lookup_windows", windows)
        for name in ("backup", "cost_model"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"StorageConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )

    def wait_seconds(self, tokens: int) -> float | None:
        """How long ``admit`` waits for a request's prefetch, by ``prefetch_policy``.

        Args:
          tokens: the tokens the prefetch brings.

        Returns:
          Seconds: 0 for ``BEST_EFFORT``; ``timeout_base_s + timeout_per_1k_tokens_s
          * tokens / 1024`` capped at ``timeout_max_s`` for ``TIMEOUT``; ``None``
          (until done) for ``WAIT_COMPLETE``.
        """
        if self.prefetch_policy is PrefetchPolicy.BEST_EFFORT:
            return 0.0
        if self.prefetch_policy is PrefetchPolicy.WAIT_COMPLETE:
            return None
        return min(
            self.timeout_max_s, self.timeout_base_s + self.timeout_per_1k_tokens_s * tokens / 1024
        )
