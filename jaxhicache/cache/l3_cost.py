"""``CostModel``: is loading a hit from L3 cheaper than recomputing it?

Running estimates (exponential moving averages, ``alpha`` the weight of a new
observation; the first observation replaces the configured prior):

* ``latency_s``: one object request's round trip, from lookups
  (``seconds / ceil(requests / in_flight)``: a lookup's checks carry no payload);
* ``bytes_per_s``: the store's read bandwidth, from fetches (the time left after
  the round trips, never less than a quarter of the fetch);
* ``recompute_s_per_token``: the prefill cost of one token, fed by the serving
  engine (:meth:`observe_recompute`).

A fetch of ``objects`` objects and ``nbytes`` bytes with ``in_flight`` requests at
once is modelled as ``latency_s * ceil(objects / in_flight) + nbytes /
bytes_per_s``; recomputing ``tokens`` as ``tokens * recompute_s_per_token``.
Thread-safe (the L3 worker threads observe, the controller decides).
"""

from __future__ import annotations

import math
import threading

__all__ = ["CostModel"]


def _positive(name: str, v, *, zero: bool = False) -> float:
    if (
        type(v) is bool
        or not isinstance(v, int | float)
        or not math.isfinite(v)
        or v < 0
        or (v == 0 and not zero)
    ):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {v!r}")
    return float(v)


class CostModel:
    """Estimates of the store's latency and bandwidth and of the recompute cost.

    Args:
      latency_s / bytes_per_s / recompute_s_per_token: the priors (until observed).
      alpha: weight of a new observation in ``(0, 1]``.
    """

    def __init__(
        self,
        latency_s: float,
        bytes_per_s: float,
        recompute_s_per_token: float,
        *,
        alpha: float = 0.3,
    ):
        self.latency_s = _positive("latency_s", latency_s, zero=True)
        self.bytes_per_s = _positive("bytes_per_s", bytes_per_s)
        self.recompute_s_per_token = _positive("recompute_s_per_token", recompute_s_per_token)
        self.alpha = _positive("alpha", alpha)
        if self.alpha > 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.observed = {"latency": 0, "bandwidth": 0, "recompute": 0}
        self._lock = threading.Lock()

    def _mix(self, name: str, attr: str, sample: float) -> None:
        with self._lock:
            old = getattr(self, attr)
            new = sample if not self.observed[name] else old + self.alpha * (sample - old)
            setattr(self, attr, new)
            self.observed[name] += 1

    # ------------------------------------------------------------ observations
    def observe_lookup(self, requests: int, in_flight: int, seconds: float) -> None:
        """A lookup of ``requests`` existence checks, ``in_flight`` at once, took ``seconds``."""
        if requests < 1 or in_flight < 1:
            return
        seconds = _positive("seconds", seconds, zero=True)
        self._mix("latency", "latency_s", seconds / math.ceil(requests / in_flight))

    def observe_fetch(self, objects: int, nbytes: int, in_flight: int, seconds: float) -> None:
        """A fetch of ``objects`` objects (``nbytes`` bytes), ``in_flight`` at once, took
        ``seconds``."""
        if objects < 1 or nbytes < 1 or in_flight < 1:
            return
        seconds = _positive("seconds", seconds, zero=True)
        transfer = max(seconds - self.latency_s * math.ceil(objects / in_flight), seconds / 4)
        self._mix("bandwidth", "bytes_per_s", nbytes / max(transfer, 1e-9))

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        """Prefilling ``tokens`` tokens took ``seconds`` (the serving engine's measurement)."""
        if type(tokens) is bool or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
        seconds = _positive("seconds", seconds)
        self._mix("recompute", "recompute_s_per_token", seconds / tokens)

    # ---------------------------------------------------------------- estimates
    def load_seconds(self, objects: int, nbytes: int, in_flight: int) -> float:
        """Modelled time to fetch ``objects`` objects of ``nbytes`` bytes in all."""
        if objects <= 0:
            return 0.0
        with self._lock:
            return self.latency_s * math.ceil(objects / max(in_flight, 1)) + (
                nbytes / self.bytes_per_s
            )

    def recompute_seconds(self, tokens: int) -> float:
        """Modelled time to prefill ``tokens`` tokens."""
        with self._lock:
            return max(tokens, 0) * self.recompute_s_per_token

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "latency_s": self.latency_s,
                "bytes_per_s": self.bytes_per_s,
                "recompute_s_per_token": self.recompute_s_per_token,
                **{f"{k}_observations": v for k, v in self.observed.items()},
            }
