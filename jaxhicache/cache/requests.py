"""What :meth:`HiCache.admit` hands a serving engine: requests and their batch page tables.

A :class:`Request` is the only way to name pages to the cache. It holds the
request's prompt, the locked prefix node, and its page table: the cached
prefix's device pages (shared, owned by the tree) followed by the request's
own pages (allocated by ``admit`` and ``extend``, owned by the request until
:meth:`HiCache.insert` hands whole pages to the tree or :meth:`HiCache.release`
frees them). Its lifecycle is ``OPEN`` (inserted any number of times, each time
with more tokens, extended any number of times) ``→ RELEASED`` (by ``release``,
``retract`` or an abort); any other order raises.

After an insert the request's table holds the tree's ids for its inserted pages
(where another request had inserted the same pages first, those) and ``-1`` for
SWA pages before its lock's window: the pages it may still read are exactly the
ones its lock protects plus its own.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, final

import numpy as np

from jaxhicache.transfer import PageMove

if TYPE_CHECKING:
    from jaxhicache.transfer import LayerwiseLoad, LoadHandle
    from jaxhicache.tree import TreeNode

__all__ = ["Batch", "LoadParts", "Request", "RequestState", "check_tokens", "page_tables"]

_NONE = np.zeros(0, np.int32)


class RequestState(enum.Enum):
    """Lifecycle of a :class:`Request`: ``OPEN`` from admission until ``release`` (or
    ``retract``), ``RELEASED`` after."""

    OPEN = "open"  # admitted: may be inserted, extended, released, retracted
    RELEASED = "released"  # ended: its own pages freed or the tree's, its lock dropped


@final
@dataclasses.dataclass(eq=False)
class Request:
    """One admitted request (read its fields; change it only through the cache).

    Attributes:
      cache_id: the cache's id for the request.
      prompt: int32 token ids given to ``admit``.
      max_new_tokens: tokens the request may generate (its pages at admission).
      node: the locked end of what the tree holds for it (the matched prefix,
        then its last insert).
      cached_tokens: ``device_hit_tokens + host_hit_tokens + storage_hit_tokens``,
        the page-aligned prefix the forward starts after.
      device_hit_tokens: the part of the prefix found on device.
      host_hit_tokens: the part found on host (loaded back).
      storage_hit_tokens: the prefix prefetched from L3 into host slots and
        loaded into the request's own pages (the tree gets them at insert).
      salt: the request's ``cache_salt`` (``None``: unsalted).
      full_page_ids: int32 page table covering every page the request may write
        KV into: positions ``[0, capacity)``, at admission enough for
        ``prompt_len + max_new_tokens - 1`` and grown by :meth:`HiCache.extend`.
      swa_page_ids: the SWA page ids of the same pages; those of the prefix are
        ``-1`` outside its trailing window.
      page_size: tokens per page.
      own_from: page index of the request's first own page.
      l3_host_full: host full-page slots of its claimed L3 prefetch (``None``:
        none).
      l3_host_swa: host SWA-page slots of that prefetch.
      l3_host_state: recurrent hybrids: the host snapshot slot of that prefetch
        (the state at its end; ``None``: none).
      state: :class:`RequestState`.
      inserted_pages: own pages handed to the tree by insert.
      inserted_len: tokens given to the last insert (each must give more).
      tokens: the longest token sequence the request was given (``None``: the
        prompt).
      state_pos: recurrent hybrids: the position of the request's state.
      state_read: the slot holding that state (``-1``: the zero state); the tree's
        snapshot right after admission, read only.
      state_owned: the device snapshot slots the request owns.
      pending_states: positions → owned slots holding snapshots the next insert
        that covers them hands to the tree.
      snapshot_at: the branch point (a grid position past the hit inside the tree's
        longer KV match) to snapshot during the prefill; 0: none.
    """

    cache_id: int
    prompt: np.ndarray  # int32
    max_new_tokens: int
    node: TreeNode
    cached_tokens: int
    device_hit_tokens: int
    host_hit_tokens: int
    storage_hit_tokens: int
    salt: str | bytes | None
    full_page_ids: np.ndarray
    swa_page_ids: np.ndarray
    page_size: int
    own_from: int  # page index of the request's first own page
    l3_host_full: np.ndarray | None = None  # host slots of its claimed L3 prefetch
    l3_host_swa: np.ndarray | None = None
    l3_host_state: np.ndarray | None = None  # hybrids: its snapshot slot
    state: RequestState = RequestState.OPEN
    inserted_pages: int = 0  # own pages handed to the tree by insert
    inserted_len: int = 0  # tokens given to the last insert (each must give more)
    tokens: np.ndarray | None = None  # the longest token sequence the request was given
    state_pos: int = 0
    state_read: int = -1
    state_owned: list[int] = dataclasses.field(default_factory=list)
    pending_states: dict[int, int] = dataclasses.field(default_factory=dict)
    snapshot_at: int = 0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the forward computes (the last one always is)."""
        return self.prompt.size - self.cached_tokens

    @property
    def capacity(self) -> int:
        """Positions whose KV the request may write: its pages times the page size."""
        return self.full_page_ids.size * self.page_size

    @property
    def known_tokens(self) -> np.ndarray:
        """The prompt, or the longer sequence a later insert gave (prompt + generated)."""
        return self.prompt if self.tokens is None else self.tokens

    @property
    def num_pages(self) -> int:
        """Full pages in the request's page table (prefix and own)."""
        return self.full_page_ids.size

    @property
    def own_start(self) -> int:
        """Index of the request's first own page in its page table (before
        ``cached_tokens`` when the request's own pages were filled from L3)."""
        return self.own_from


@final
@dataclasses.dataclass(eq=False)
class Batch:
    """The admitted requests of one :meth:`HiCache.admit` call, with padded page tables.

    Attributes:
      requests: the admitted requests, in prompt order.
      deferred: indices (into the prompts given to ``admit``) of requests that
        did not fit now and were not admitted; nothing was taken for them.
      full_table: ``int32[B, max_pages]`` padded with ``-1``; row ``i`` is
        ``requests[i]``'s full page table.
      swa_table: the same for the SWA page tables.
      num_pages: ``num_pages[i]``: the length of row ``i``.
      cached_tokens: ``cached_tokens[i]``: where request ``i``'s forward starts.
      handle: the prefix load of all requests as one dispatch (``None``: nothing
        to load, or ``layerwise``).
      layerwise: with ``admit(..., layerwise=True)``, a
        :class:`~jaxhicache.transfer.LayerwiseLoad` the first forward chunk
        applies layer by layer.
    """

    requests: tuple[Request, ...]
    deferred: tuple[int, ...]
    full_table: np.ndarray
    swa_table: np.ndarray
    num_pages: np.ndarray
    cached_tokens: np.ndarray
    handle: LoadHandle | None = None
    layerwise: LayerwiseLoad | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def wait(self, layer: int | None = None) -> None:
        """Blocks until a stage-local layer of the prefix load landed (no load: returns).

        Args:
          layer: the stage-local layer; ``None``: all layers.

        Raises:
          ValueError: ``layer`` was not part of the load.
        """
        if self.handle is not None:
            self.handle.wait(layer)

    def tables(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The requests' current page tables (after any ``extend``).

        Args:
          width: pages per row, at least the longest table.

        Returns:
          ``(full, swa)``, each ``int32[B, width]`` padded with ``-1``.

        Raises:
          ValueError: ``width`` is shorter than the longest table.
        """
        return page_tables(self.requests, width)


def page_tables(requests, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``int32[B, width]`` full and SWA page tables of ``requests``, padded with ``-1``
    (``width``: at least the longest table; default: exactly that)."""
    longest = max((r.num_pages for r in requests), default=0)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"width {width} is shorter than the longest page table ({longest} pages)")
    full = np.full((len(requests), width), -1, np.int32)
    swa = np.full((len(requests), width), -1, np.int32)
    for i, r in enumerate(requests):
        full[i, : r.num_pages] = r.full_page_ids
        swa[i, : r.num_pages] = r.swa_page_ids
    return full, swa


@dataclasses.dataclass
class LoadParts:
    """The host→device page moves of one batch, merged into one ``PageMove``."""

    full_device: list = dataclasses.field(default_factory=list)
    full_host: list = dataclasses.field(default_factory=list)
    swa_device: list = dataclasses.field(default_factory=list)
    swa_host: list = dataclasses.field(default_factory=list)
    state_device: list = dataclasses.field(default_factory=list)
    state_host: list = dataclasses.field(default_factory=list)

    def move(self) -> PageMove:
        cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else _NONE  # noqa: E731
        return PageMove.of(
            cat(self.full_device),
            cat(self.full_host),
            cat(self.swa_device),
            cat(self.swa_host),
            cat(self.state_device),
            cat(self.state_host),
        )


def check_tokens(x, what: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D int32 token array; ``ValueError`` naming ``what`` otherwise."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if not arr.size and not allow_empty:
        raise ValueError(f"{what} is empty: a request needs at least one token")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} has token ids outside [0, 2**31 - 1]")
    return arr.astype(np.int32)
