"""``FaultInjectionBackend``: wraps a backend and fails chosen object operations.

For tests of the fault paths (and of the cache on top): every primitive of the
inner backend is passed through unless its predicate selects the key, in which
case the operation fails with an ``OSError`` (``errno`` configurable, e.g.
``ENOSPC`` for a full disk). The page logic, checks and counters are the
wrapper's own (it is a :class:`StorageBackend`), so it behaves exactly like the
inner backend on a faulty store.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable

from .backend import StorageBackend, _Failed

__all__ = ["FaultInjectionBackend"]

KeyPredicate = Callable[[str], bool] | bool | None


def _hits(pred: KeyPredicate, key: str) -> bool:
    if pred is None or pred is False:
        return False
    return True if pred is True else bool(pred(key))


class FaultInjectionBackend(StorageBackend):
    """``inner`` with injected failures.

    Args:
      inner: the backend whose store is used.
      fail_read, fail_stat, fail_write, fail_delete: ``True`` (every key), a
        predicate on the object key, or ``None``; selected operations fail.
      errno: the ``OSError`` errno of injected failures (``EIO`` by default).
    """

    def __init__(
        self,
        inner: StorageBackend,
        *,
        fail_read: KeyPredicate = None,
        fail_stat: KeyPredicate = None,
        fail_write: KeyPredicate = None,
        fail_delete: KeyPredicate = None,
        errno: int = _errno.EIO,
    ):
        super().__init__(max_in_flight=inner.max_in_flight, object_layout=inner.object_layout)
        self.inner = inner
        self.fail_read, self.fail_stat = fail_read, fail_stat
        self.fail_write, self.fail_delete = fail_write, fail_delete
        self.errno = errno
        self.injected = 0
        self._reads_into = inner._reads_into

    def _fail(self, key: str):
        self.injected += 1
        return _Failed(OSError(self.errno, os.strerror(self.errno), key))

    def _start_read(self, key):
        return self._fail(key) if _hits(self.fail_read, key) else self.inner._start_read(key)

    def _start_read_into(self, key, header, views):
        if _hits(self.fail_read, key):
            return self._fail(key)
        return self.inner._start_read_into(key, header, views)

    def _read_into_sync(self, key, header, views):
        if _hits(self.fail_read, key):
            return self._fail(key).result()
        return self.inner._read_into_sync(key, header, views)

    def _window(self):
        return self.inner._window()

    def _start_stat(self, key):
        return self._fail(key) if _hits(self.fail_stat, key) else self.inner._start_stat(key)

    def _start_write(self, key, parts):
        if _hits(self.fail_write, key):
            return self._fail(key)
        return self.inner._start_write(key, parts)

    def _start_delete(self, key, generation=None):
        if _hits(self.fail_delete, key):
            return self._fail(key)
        return self.inner._start_delete(key, generation)

    def _clear(self, prefix):
        if _hits(self.fail_delete, prefix):
            raise OSError(self.errno, os.strerror(self.errno), prefix)
        self.inner._clear(prefix)
