"""A small single-controller serving loop: :class:`PagedModel` driven by a :class:`HiCache`.

One request (a prompt and ``max_new_tokens``) goes through::

    match_prefix(prompt[:-1])     page-aligned cached prefix P (device | host | miss);
       |                          the last prompt token is always computed (its logits)
    load_back(match)              device pages for host-only pages, H2D layer by layer
       |                          (page table of the prefix; SWA -1 = tombstone)
    allocate(n, n)                fresh full + SWA pages for [P, end of prompt + decode)
       |
    prefill(prompt[P:], start=P)  chunked; pools donated, handed back to the cache
    decode_step x (max_new - 1)   greedy, into the same pages
       |
    insert(computed tokens, own pages)  the tree takes the whole pages after P; a
       |                                trailing partial page is freed here, and the
       |                                pages insert refuses (duplicates, tombstones)
       |                                are freed by insert itself
    release(prefix node)

Only tokens whose KV was written are inserted: the prompt and every generated
token but the last (the last one was never fed back). The core library
(``jaxhicache``) never imports ``models``; this module is the glue.

The core is the only owner of page ids. Every id this loop allocates ends in
exactly one of: the tree (via ``insert``), ``insert``'s own frees, or
:meth:`HiCache.free` for the trailing partial page (or on an error).

Page tables are padded with ``-1`` to power-of-two buckets (at least
``min_table_pages``), so each ``(chunk length, bucket)`` compiles once.

Layer-wise load overlap: :meth:`LoadBack.wait` takes a stage-local layer id.
A runner whose forward is split per layer (or a GPU runner that makes each
layer's kernel depend on the load's per-layer token) would wait for layer
``l`` right before computing it, overlapping the H2D copy of later layers with
compute. The forward here is one jitted program over all layers, so a wait
cannot be placed inside it; the loop calls ``wait()`` for all layers before the
prefill (on CPU the copy is synchronous anyway, and the data dependency on the
returned pools already orders the reads after the writes).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxhicache.cache import HiCache
from jaxhicache.pools.device import DevicePools
from jaxhicache.tree import MatchResult
from models.paged import PagedModel

__all__ = ["RequestReport", "ServingLoop", "bucket_pages"]


def bucket_pages(n: int, minimum: int = 8) -> int:
    """The page-table length for ``n`` pages: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class RequestReport:
    """What one request did. Token counts are per tier of the cached prefix.

    ``cached_tokens = device_cached_tokens + host_cached_tokens +
    storage_cached_tokens`` (storage is always 0: this loop has no L3), and
    ``cached_tokens + prefill_tokens == prompt_len``.

    ``step_logits[i]`` is the distribution ``generated[i]`` was picked from
    (row 0: the last prompt position; row ``i``: decode step ``i``), so cached
    and uncached runs compare row by row. ``prefill_logits`` are the logits of
    the computed prompt positions ``[cached_tokens, prompt_len)``.
    """

    prompt_len: int
    cached_tokens: int
    device_cached_tokens: int
    host_cached_tokens: int
    storage_cached_tokens: int
    prefill_tokens: int
    generated: np.ndarray  # int32 [max_new_tokens]
    ttft_s: float  # request start -> first token known on the host
    total_s: float
    loaded_pages: int  # full pages brought back from host
    inserted_tokens: int  # page-aligned tokens the tree holds for this request afterwards
    used_cache: bool
    full_page_ids: np.ndarray  # the request's page table (unpadded), prefix then own pages
    swa_page_ids: np.ndarray
    prefill_logits: np.ndarray  # [prefill_tokens, vocab]
    step_logits: np.ndarray  # [max_new_tokens, vocab]


class ServingLoop:
    """Drives ``model`` with prefix caching through ``cache`` (one request at a time).

    Args:
      model: the paged, pipeline-parallel model.
      cache: a :class:`HiCache` over the same spec, mesh and layer partition
        (see :meth:`for_model`).
      chunk_size: prefill chunk length (default: the page size).
      min_table_pages: smallest page-table bucket.
    """

    def __init__(
        self,
        model: PagedModel,
        cache: HiCache,
        *,
        chunk_size: int | None = None,
        min_table_pages: int = 8,
    ):
        _check_compatible(model, cache)
        self.model = model
        self.cache = cache
        self.page = model.config.page_size
        self.chunk_size = chunk_size or self.page
        self.min_table_pages = min_table_pages
        self._oracle_pools: DevicePools | None = None

    @classmethod
    def for_model(
        cls,
        model: PagedModel,
        *,
        device_pages: int,
        chunk_size: int | None = None,
        min_table_pages: int = 8,
        **cache_kwargs,
    ) -> ServingLoop:
        """A loop with a fresh :class:`HiCache` matching ``model`` (spec, mesh, partition).

        ``cache_kwargs`` go to :class:`HiCache` (``device_swa_pages``,
        ``host_pages``, ``write_policy``, ...).
        """
        partition = [m.num_local_layers for m in model.layer_maps]
        cache = HiCache(
            model.spec, model.mesh, device_pages=device_pages, partition=partition, **cache_kwargs
        )
        return cls(model, cache, chunk_size=chunk_size, min_table_pages=min_table_pages)

    # ------------------------------------------------------------- requests
    def serve(
        self,
        tokens: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        *,
        before_load: Callable[[MatchResult], None] | None = None,
    ) -> RequestReport:
        """Runs one request with prefix caching; inserts its computed pages afterwards.

        ``before_load(match)`` is called between the match and the load-back
        (tests use it to inspect or corrupt the host copy being restored).
        """
        tokens = _prompt(tokens, max_new_tokens)
        t0 = time.perf_counter()
        cache, page = self.cache, self.page
        n_prompt = tokens.size
        match = cache.match_prefix(tokens[:-1])  # keep >= 1 token to compute
        if before_load is not None:
            before_load(match)
        lb = cache.load_back(match)
        p = match.matched_len
        new_full = new_swa = np.zeros(0, np.int32)
        try:
            # KV is written for positions [0, written_end): prompt + all generated but the last.
            written_end = n_prompt + max_new_tokens - 1
            n_new = math.ceil(written_end / page) - p // page
            new_full, new_swa = cache.allocate(n_new, n_new)
            full = np.concatenate([lb.full_page_ids, new_full]).astype(np.int32)
            swa = np.concatenate([lb.swa_page_ids, new_swa]).astype(np.int32)
            lb.wait()  # all layers; see the module docstring for per-layer waiting
            _, prefill_logits, step_logits, generated, ttft = self._generate(
                cache.pools, tokens, p, full, swa, max_new_tokens, t0, cache=True
            )
        except BaseException:
            cache.free(new_full, new_swa)
            cache.release(lb.node)
            raise
        # Insert the whole pages after P that this request wrote; free the partial tail.
        own = written_end // page - p // page
        computed = np.concatenate([tokens, generated[:-1]])
        cache.insert(computed[: written_end // page * page], new_full[:own], new_swa[:own])
        cache.free(new_full[own:], new_swa[own:])
        cache.release(lb.node)
        return RequestReport(
            prompt_len=n_prompt,
            cached_tokens=p,
            device_cached_tokens=match.device_len,
            host_cached_tokens=match.host_len,
            storage_cached_tokens=0,
            prefill_tokens=n_prompt - p,
            generated=generated,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            loaded_pages=int(match.host_full_ids.size),
            inserted_tokens=written_end // page * page,
            used_cache=True,
            full_page_ids=full,
            swa_page_ids=swa,
            prefill_logits=prefill_logits,
            step_logits=step_logits,
        )

    def serve_uncached(
        self, tokens: Sequence[int] | np.ndarray, max_new_tokens: int
    ) -> RequestReport:
        """The oracle: the same request recomputed from position 0 in fresh pages.

        Uses a private set of pools with the cache's shapes (so it reuses the
        same compilations) and never touches the cache or its tree.
        """
        tokens = _prompt(tokens, max_new_tokens)
        t0 = time.perf_counter()
        n_pages = math.ceil((tokens.size + max_new_tokens - 1) / self.page)
        shape = self.cache.pools
        if n_pages > min(shape.num_pages, shape.num_swa_pages):
            raise ValueError(
                f"the request needs {n_pages} pages; the oracle pools hold {shape.num_pages}"
            )
        if self._oracle_pools is None:
            self._oracle_pools = self.model.init_pools(shape.num_pages, shape.num_swa_pages)
        ids = np.arange(n_pages, dtype=np.int32)
        pools, prefill_logits, step_logits, generated, ttft = self._generate(
            self._oracle_pools, tokens, 0, ids, ids, max_new_tokens, t0, cache=False
        )
        self._oracle_pools = pools
        return RequestReport(
            prompt_len=tokens.size,
            cached_tokens=0,
            device_cached_tokens=0,
            host_cached_tokens=0,
            storage_cached_tokens=0,
            prefill_tokens=tokens.size,
            generated=generated,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            loaded_pages=0,
            inserted_tokens=0,
            used_cache=False,
            full_page_ids=ids,
            swa_page_ids=ids,
            prefill_logits=prefill_logits,
            step_logits=step_logits,
        )

    def _generate(self, pools, tokens, start, full, swa, max_new_tokens, t0, *, cache: bool):
        """Prefill ``tokens[start:]`` then greedy-decode; returns pools, logits, tokens, TTFT."""
        n = bucket_pages(full.size, self.min_table_pages)
        full_t, swa_t = _pad(full, n), _pad(swa, n)
        model = self.model
        logits, pools, scratch = model.prefill(
            pools, tokens[start:], start, full_t, swa_t, chunk_size=self.chunk_size
        )
        if cache:
            self.cache.pools = pools  # donated: the old arrays are gone from here on
        last = logits[-1]
        tok = int(jnp.argmax(last))
        ttft = time.perf_counter() - t0
        generated, steps = [tok], [last]
        for i in range(1, max_new_tokens):
            last, pools, scratch = model.decode_step(
                pools, tok, tokens.size + i - 1, full_t, swa_t, scratch
            )
            if cache:
                self.cache.pools = pools
            tok = int(jnp.argmax(last))
            generated.append(tok)
            steps.append(last)
        return (
            pools,
            np.asarray(logits),
            np.asarray(jnp.stack(steps)),
            np.asarray(generated, np.int32),
            ttft,
        )

    # ----------------------------------------------------------- passthroughs
    def evict_device(self, num_pages: int) -> int:
        """Frees ``num_pages`` device pages (LRU); backed-up nodes are demoted to host."""
        return self.cache.evict(num_pages)

    def evict_host(self, num_pages: int) -> int:
        """Frees ``num_pages`` host pages (host-only leaves, LRU)."""
        return self.cache.evict_host(num_pages)

    def close(self) -> None:
        self.cache.close()


def _prompt(tokens, max_new_tokens: int) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if tokens.size < 1:
        raise ValueError("a request needs at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return tokens


def _pad(ids: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -1, np.int32)
    out[: ids.size] = ids
    return out


def _check_compatible(model: PagedModel, cache: HiCache) -> None:
    if cache.spec != model.spec:
        raise ValueError(f"cache spec {cache.spec.name!r} is not the model's {model.spec.name!r}")
    if cache.mesh.shape != model.mesh.shape:
        raise ValueError(
            f"cache mesh {dict(cache.mesh.shape)} != model mesh {dict(model.mesh.shape)}"
        )
    ranges = [(m.start_layer, m.end_layer) for m in cache.layer_maps]
    want = [(m.start_layer, m.end_layer) for m in model.layer_maps]
    if ranges != want:
        raise ValueError(f"cache stage layer ranges {ranges} != model's {want}")
