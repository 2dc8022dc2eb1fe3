"""``TensorStoreBackend``: L3 on any tensorstore kvstore (file, memory, s3, gcs, ...).

Writes are whole-object and atomic for a reader: the ``file`` driver writes a
temporary file and renames it, object stores replace objects atomically. By
default the file driver does not ``fsync`` (``sync=False``): a cache loses
nothing it cannot recompute, and an object torn by a crash fails its checksum
and is read as a miss. Remote drivers get a short retry budget so an unreachable
store fails fast (every failure is a miss or a failed put, counted).
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorstore as ts

from .backend import ObjectRead, StorageBackend
from .file_backend import default_cache_dir
from .layout import ObjectLayout

__all__ = ["TensorStoreBackend", "default_cache_dir", "parse_kvstore_spec"]


def parse_kvstore_spec(spec_or_url: dict | str | os.PathLike | None) -> dict | str:
    """A tensorstore kvstore spec from what a user gives.

    Args:
      spec_or_url: ``None``: the file driver at :func:`default_cache_dir`; a
        ``dict`` or a JSON object string: that spec; a string with ``://``: a
        tensorstore kvstore URL (``file:///dir/``, ``memory://``,
        ``s3://bucket/prefix``, ``gs://bucket/prefix``); any other string or
        path: the file driver at that directory.

    Returns:
      The spec (a copy of a given ``dict``) or the URL string.

    Raises:
      ValueError: an empty string, invalid JSON, or JSON that is not an object.
    """
    if spec_or_url is None:
        return {"driver": "file", "path": default_cache_dir()}
    if isinstance(spec_or_url, dict):
        return dict(spec_or_url)
    s = os.fspath(spec_or_url)
    if not isinstance(s, str) or not s:
        raise ValueError(f"not a kvstore spec, URL or path: {spec_or_url!r}")
    if s.lstrip().startswith("{"):
        try:
            spec = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"kvstore spec is not valid JSON: {e}") from e
        if not isinstance(spec, dict):
            raise ValueError(f"kvstore JSON spec must be an object, got {spec!r}")
        return spec
    if "://" in s:
        return s
    return {"driver": "file", "path": s}


class _Mapped:
    """A tensorstore future with a result mapping and a timeout."""

    __slots__ = ("fn", "fut", "timeout")

    def __init__(self, fut, fn, timeout: float | None):
        self.fut, self.fn, self.timeout = fut, fn, timeout

    def result(self):
        try:
            return self.fn(self.fut.result(timeout=self.timeout))
        except TimeoutError:
            self.fut.cancel()
            raise


def _read_result(r) -> ObjectRead:
    if r.state == "value":
        return ObjectRead(r.value, r.stamp.generation)
    if r.state == "missing":
        return ObjectRead(None)
    raise OSError(f"unexpected kvstore read state {r.state!r}")


def _exists(r) -> bool:
    return r.state == "value"


def _none(_r) -> None:
    return None


def _deleted(stamp) -> bool:
    return stamp.generation != b""  # an empty generation: the condition did not hold


class TensorStoreBackend(StorageBackend):
    """L3 backend over a tensorstore kvstore.

    Args:
      spec_or_url: kvstore spec (dict / JSON string), URL, or directory; see
        :func:`parse_kvstore_spec`. Default: files under :func:`default_cache_dir`.
      max_in_flight: objects in flight per call (futures), at most.
      object_layout: ``PER_SPACE`` (default) or ``PER_SUBPOOL``.
      sync: ``fsync`` file writes (tensorstore ``file_io_sync``).
      io_threads: tensorstore ``file_io_concurrency`` limit (``None``: its default).
      request_retries: retries of a remote request (s3 / gcs / http) before it fails.
      request_concurrency: remote requests (s3 / gcs) in flight at once for this store
        (``None``: tensorstore's default). An L3 lookup issues all its existence
        checks at once (``StorageConfig.lookup_in_flight``); this caps them per store.
      timeout_s: per-object wait, after which the operation counts as an I/O error.
      context: extra tensorstore context resources (override the above).

    Raises:
      ValueError: ``request_concurrency`` not an int ``>= 1``, a bad
        ``spec_or_url``, or as the base class raises it; tensorstore's own error
        when the store cannot be opened.
    """

    def __init__(
        self,
        spec_or_url: dict | str | os.PathLike | None = None,
        *,
        max_in_flight: int = 16,
        object_layout: ObjectLayout = ObjectLayout.PER_SPACE,
        sync: bool = False,
        io_threads: int | None = None,
        request_retries: int = 2,
        request_concurrency: int | None = None,
        timeout_s: float | None = 60.0,
        context: dict[str, Any] | None = None,
    ):
        super().__init__(max_in_flight=max_in_flight, object_layout=object_layout)
        spec = parse_kvstore_spec(spec_or_url)
        retries = {
            "max_retries": int(request_retries),
            "initial_delay": "20ms",
            "max_delay": "500ms",
        }
        ctx: dict[str, Any] = {
            "file_io_sync": bool(sync),
            "s3_request_retries": retries,
            "gcs_request_retries": retries,
        }
        if io_threads is not None:
            ctx["file_io_concurrency"] = {"limit": int(io_threads)}
        if request_concurrency is not None:
            if (
                type(request_concurrency) is bool
                or not isinstance(request_concurrency, int)
                or (request_concurrency < 1)
            ):
                raise ValueError(
                    f"request_concurrency must be an int >= 1, got {request_concurrency!r}"
                )
            for name in ("s3_request_concurrency", "gcs_request_concurrency"):
                ctx[name] = {"limit": request_concurrency}
        ctx.update(context or {})
        self.timeout_s = timeout_s
        self.context = ts.Context(ctx)
        self.kvstore = ts.KvStore.open(spec, context=self.context).result()
        # tensorstore appends keys to the store path without a separator
        path = self.kvstore.path
        self._sep = "/" if path and not path.endswith("/") else ""

    @property
    def spec(self) -> dict:
        """The opened kvstore spec as JSON."""
        return self.kvstore.spec().to_json()

    def __repr__(self) -> str:
        return f"TensorStoreBackend({self.spec!r}, layout={self.object_layout.value})"

    def _k(self, key: str) -> str:
        return self._sep + key

    def _start_read(self, key: str):
        return _Mapped(self.kvstore.read(self._k(key)), _read_result, self.timeout_s)

    def _start_stat(self, key: str):
        return _Mapped(
            self.kvstore.read(self._k(key), byte_range=slice(0, 0)), _exists, self.timeout_s
        )

    def _start_write(self, key: str, parts):
        # the kvstore API takes one bytes object: the one copy of the payload
        blob = b"".join(parts)
        return _Mapped(self.kvstore.write(self._k(key), blob), _none, self.timeout_s)

    def _start_delete(self, key: str, generation: bytes | None = None):
        if generation:
            fut = self.kvstore.write(self._k(key), None, if_equal=generation)
        else:
            fut = self.kvstore.write(self._k(key), None)
        return _Mapped(fut, _deleted, self.timeout_s)

    def _clear(self, prefix: str) -> None:
        lo = self._k(prefix)
        hi = lo[:-1] + chr(ord(lo[-1]) + 1)
        self.kvstore.delete_range(ts.KvStore.KeyRange(lo, hi)).result(timeout=self.timeout_s)
