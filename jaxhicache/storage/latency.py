"""``LatencyBackend``: another backend behind a fixed latency per object request.

An object store answers each request after a round trip (10-50 ms for S3 or GCS
from a serving host) however small the object, and serves many requests at once.
This wrapper models that over any backend (a directory, tensorstore's
``memory://``): every object operation is started on the inner backend at once
and its result is handed out ``latency_s`` after the request was issued, with up
to ``max_in_flight`` requests in flight per call. For tests and benchmarks of
the L3 tier at object-store latency on one machine.

It also counts **sequential round trips**: a request issued by a thread after
that thread saw the result of another request is one round trip deeper than it
(depth 1: issued with nothing seen). :meth:`LatencyBackend.round_trips` is the
deepest request since :meth:`LatencyBackend.reset_round_trips`, per thread of
control, so a lookup that issues all its checks at once counts 1 however many
checks it has, and a loop of one check per call counts one per call. The count
follows the code's data dependencies, not the wall clock, so it is the same on
a loaded machine.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

from .backend import StorageBackend
from .ops import Done, Raised

__all__ = ["LatencyBackend"]


class _RoundTrips:
    """Request depths per thread, reset by epochs (results of an older epoch count 0)."""

    def __init__(self):
        self._tls = threading.local()
        self._lock = threading.Lock()
        self.epoch = 0
        self.deepest: Counter[str] = Counter()  # per request kind
        self.requests: Counter[str] = Counter()

    def _seen(self) -> int:
        epoch, depth = getattr(self._tls, "state", (-1, 0))
        return depth if epoch == self.epoch else 0

    def issue(self, kind: str) -> tuple[int, int]:
        depth = self._seen() + 1
        with self._lock:
            self.deepest[kind] = max(self.deepest[kind], depth)
            self.requests[kind] += 1
            return self.epoch, depth

    def saw(self, epoch: int, depth: int) -> None:
        if epoch == self.epoch:
            self._tls.state = (epoch, max(self._seen(), depth))

    def reset(self) -> None:
        with self._lock:
            self.epoch += 1
            self.deepest = Counter()
            self.requests = Counter()


class _Delayed:
    """An inner operation's result, available ``latency`` after it was issued."""

    __slots__ = ("depth", "due", "epoch", "inner", "trips")

    def __init__(self, inner, due: float, trips: _RoundTrips, epoch: int, depth: int):
        self.inner, self.due, self.trips, self.epoch, self.depth = inner, due, trips, epoch, depth

    def result(self, timeout: float | None = None):
        wait = self.due - time.monotonic()
        if wait > 0:
            if timeout is not None and wait > timeout:
                time.sleep(max(timeout, 0.0))
                raise TimeoutError(f"no answer within {timeout} s")
            time.sleep(wait)
        self.trips.saw(self.epoch, self.depth)
        return self.inner.result()


class LatencyBackend(StorageBackend):
    """``inner`` with ``latency_s`` added to every object request.

    Args:
      inner: the backend whose store holds the objects (its checks and counters
        are not used: this wrapper's own are).
      latency_s: seconds from issuing a request to its answer (``>= 0``).
      max_in_flight: requests in flight per call (a store serves them concurrently).
      request_s: the store's own time per request, one request after another (a
        server that serves requests one at a time, such as moto on loopback: the
        ``n``-th of ``n`` requests issued at once answers after ``latency_s + n *
        request_s``); 0 (default): every request in flight is served at once.

    Raises:
      ValueError: ``inner`` is not a ``StorageBackend``, or ``latency_s`` is not a
        finite number ``>= 0``; the message names the value.
    """

    def __init__(
        self,
        inner: StorageBackend,
        latency_s: float,
        *,
        max_in_flight: int = 64,
        request_s: float = 0.0,
    ):
        if not isinstance(inner, StorageBackend):
            raise ValueError(f"inner must be a StorageBackend, got {type(inner).__name__}")
        for name, v in (("latency_s", latency_s), ("request_s", request_s)):
            if type(v) is bool or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        super().__init__(max_in_flight=max_in_flight, object_layout=inner.object_layout)
        self.inner = inner
        self.latency_s = float(latency_s)
        self.request_s = float(request_s)
        self._busy_until = 0.0  # when the store is through with the requests it has
        self._busy = threading.Lock()
        self._reads_into = inner._reads_into
        self._trips = _RoundTrips()

    def __repr__(self) -> str:
        return f"LatencyBackend({self.inner!r}, latency_s={self.latency_s})"

    # ----------------------------------------------------------- round trips
    def round_trips(self, kind: str | None = None) -> int:
        """The deepest chain of dependent requests since :meth:`reset_round_trips`.

        Args:
          kind: only requests of this kind: ``"stat"`` (lookups), ``"read"``
            (fetches), ``"write"`` or ``"delete"``; ``None``: any.

        Returns:
          The depth: 1 when every request was issued without waiting for another,
          one more per answer a request waited for; 0 when none was issued.
        """
        deepest = self._trips.deepest
        return max(deepest.values(), default=0) if kind is None else deepest[kind]

    def requests(self) -> dict[str, int]:
        """Requests issued since :meth:`reset_round_trips`.

        Returns:
          ``{kind: count}`` for the kinds issued (``read``, ``stat``, ``write``,
          ``delete``).
        """
        return dict(self._trips.requests)

    def reset_round_trips(self) -> None:
        """Starts counting round trips and requests afresh (answers to requests issued
        before count as depth 0)."""
        self._trips.reset()

    # ------------------------------------------------------------ primitives
    def _delay(self, kind: str, start):
        epoch, depth = self._trips.issue(kind)
        now = time.monotonic()
        with self._busy:  # served one after another, request_s each
            self._busy_until = max(now, self._busy_until) + self.request_s
            due = self._busy_until + self.latency_s
        try:
            inner = start()
        except Exception as e:  # a failure to start is still answered after the latency
            inner = Raised(e)
        return _Delayed(inner, due, self._trips, epoch, depth)

    def _start_read(self, key):
        return self._delay("read", lambda: self.inner._start_read(key))

    def _start_read_into(self, key, header, views):
        return self._delay("read", lambda: self.inner._start_read_into(key, header, views))

    def _start_stat(self, key):
        return self._delay("stat", lambda: self.inner._start_stat(key))

    def _start_write(self, key, parts):
        return self._delay("write", lambda: self.inner._start_write(key, parts))

    def _start_delete(self, key, generation=None):
        return self._delay("delete", lambda: self.inner._start_delete(key, generation))

    def _clear(self, prefix):
        self._delay("delete", lambda: Done(self.inner._clear(prefix))).result()

    def close(self) -> None:
        self.inner.close()
