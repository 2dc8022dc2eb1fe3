"""``CostModel``: is a lookup, or loading a hit from L3, cheaper than recomputing it?

A store is modelled by three figures, so that both kinds of store are priced right:
an object store far away (every request waits ``latency_s``, many are served at
once) and a store that serves requests one after another (every request costs
``request_s`` of the store's time, however many are in flight):

* ``latency_s``: one request's round trip;
* ``request_s``: the store's time per request beyond that (0 for a store that
  serves everything in flight at once);
* ``bytes_per_s``: its read bandwidth.

``n`` requests with ``c`` in flight and ``b`` bytes take
``latency_s * ceil(n / c) + request_s * n + b / bytes_per_s``; recomputing ``t``
tokens takes ``t * recompute_s_per_token``. Running estimates (the median of the
last ``window`` observations, so one stall or scheduling hiccup does not swing a
decision; the first observation replaces the configured prior): ``latency_s`` from the first answer of a lookup,
``request_s`` from the spread of its other answers (both taken from existence
checks, which carry no payload), ``bytes_per_s`` from fetches (the time left after
the requests, never less than a quarter of the fetch), ``recompute_s_per_token``
from the serving engine (:meth:`observe_recompute`). Thread-safe.

``recompute_s_per_token`` is the *marginal* cost of a token, the time a hit of
``t`` tokens saves: a prefill of ``n`` tokens costs a fixed part (dispatch, the
first token out) plus ``n`` times that. It is the median slope between pairs of
observed prefills of clearly different lengths (Theil-Sen), at most their median
time per token; with no such pair yet, the median time per token. Dividing each
prefill's time by its tokens instead would price a short continuation's tokens
several times too high, and the model would fetch hits slower than their recompute.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

__all__ = ["CostModel"]


def _number(name: str, v, *, zero: bool = False) -> float:
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
    """Estimates of the store's latency, per-request time and bandwidth, and of the
    recompute cost per token.

    Args:
      latency_s / bytes_per_s / recompute_s_per_token: the priors (until observed).
      request_s: the prior per-request time (default 0).
      window: observations of each figure the estimate is the median of (``>= 1``).
    """

    def __init__(
        self,
        latency_s: float,
        bytes_per_s: float,
        recompute_s_per_token: float,
        *,
        request_s: float = 0.0,
        window: int = 9,
    ):
        self.latency_s = _number("latency_s", latency_s, zero=True)
        self.request_s = _number("request_s", request_s, zero=True)
        self.bytes_per_s = _number("bytes_per_s", bytes_per_s)
        self.recompute_s_per_token = _number("recompute_s_per_token", recompute_s_per_token)
        if type(window) is bool or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.observed = {"latency": 0, "request": 0, "bandwidth": 0, "recompute": 0}
        self._samples: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.observed}
        self._prefills: deque[tuple[int, float]] = deque(maxlen=2 * window)
        self._lock = threading.Lock()

    def _mix(self, name: str, attr: str, sample: float) -> None:
        self._samples[name].append(sample)
        setattr(self, attr, statistics.median(self._samples[name]))
        self.observed[name] += 1

    # ------------------------------------------------------------ observations
    def observe_lookup(
        self, requests: int, in_flight: int, seconds: float, first_s: float | None = None
    ) -> None:
        """A lookup of ``requests`` existence checks, ``in_flight`` at once, took
        ``seconds``; its first answer came after ``first_s`` (default: ``seconds``)."""
        if requests < 1 or in_flight < 1:
            return
        seconds = _number("seconds", seconds, zero=True)
        first = seconds if first_s is None else min(_number("first_s", first_s, zero=True), seconds)
        rounds = math.ceil(requests / in_flight)
        with self._lock:
            self._mix("latency", "latency_s", first)
            if requests > 1:
                rest = max(seconds - first * rounds, 0.0) / (requests - 1)
                self._mix("request", "request_s", rest)

    def observe_fetch(self, objects: int, nbytes: int, in_flight: int, seconds: float) -> None:
        """A fetch of ``objects`` objects (``nbytes`` bytes), ``in_flight`` at once, took
        ``seconds``."""
        if objects < 1 or nbytes < 1 or in_flight < 1:
            return
        seconds = _number("seconds", seconds, zero=True)
        with self._lock:
            requests = self.latency_s * math.ceil(objects / in_flight) + self.request_s * objects
            transfer = max(seconds - requests, seconds / 4)
            self._mix("bandwidth", "bytes_per_s", nbytes / max(transfer, 1e-9))

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        """Prefilling ``tokens`` tokens took ``seconds`` (the serving engine's measurement
        of the forward, not of the admission before it)."""
        if type(tokens) is bool or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
        seconds = _number("seconds", seconds)
        with self._lock:
            self._prefills.append((tokens, seconds))
            self.recompute_s_per_token = _marginal(self._prefills)
            self.observed["recompute"] += 1

    # ---------------------------------------------------------------- estimates
    def load_seconds(self, objects: int, nbytes: int, in_flight: int) -> float:
        """Modelled time of ``objects`` requests (``nbytes`` bytes in all), ``in_flight``
        at once (a lookup: ``nbytes = 0``)."""
        if objects <= 0:
            return 0.0
        with self._lock:
            return (
                self.latency_s * math.ceil(objects / max(in_flight, 1))
                + self.request_s * objects
                + nbytes / self.bytes_per_s
            )

    def recompute_seconds(self, tokens: int) -> float:
        """Modelled time to prefill ``tokens`` tokens."""
        with self._lock:
            return max(tokens, 0) * self.recompute_s_per_token

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "latency_s": self.latency_s,
                "request_s": self.request_s,
                "bytes_per_s": self.bytes_per_s,
                "recompute_s_per_token": self.recompute_s_per_token,
                **{f"{k}_observations": v for k, v in self.observed.items()},
            }


def _marginal(prefills) -> float:
    """Seconds per token of ``(tokens, seconds)`` prefills: the median slope over pairs
    whose lengths differ by at least a quarter of the longer (at least 3 such pairs),
    at most the median time per token; else that median."""
    per_token = statistics.median(s / t for t, s in prefills)
    slopes = [
        (s2 - s1) / (t2 - t1)
        for i, (t1, s1) in enumerate(prefills)
        for t2, s2 in list(prefills)[i + 1 :]
        if abs(t2 - t1) >= max(t1, t2) / 4
    ]
    if len(slopes) < 3:
        return per_token
    slope = statistics.median(slopes)
    return min(slope, per_token) if slope > 0 else per_token
