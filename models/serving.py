"""A small single-controller serving loop: a paged model
(:class:`~models.protocol.ServableModel`: ``PagedModel``, ``PagedMLAModel``) driven by a
:class:`HiCache`.

A batch of requests (prompts and ``max_new_tokens``) goes through::

    admit(pools, prompts)        per request: the cached prefix of prompt[:-1] (device |
       |                         host | miss), locked; device pages for host-only prefix
       |                         pages, window SWA pages and its own new tokens; all
       |                         requests' host→device moves merged into ONE dispatch
       |                         (or, layerwise, applied by the first forward chunk
       |                         layer by layer, overlapping copy and compute)
    per request:
      prefill(prompt[P:], start=P)   chunked; the loop owns the pools and threads them
      decode_step x (max_new - 1)    greedy, into the same pages
      insert(pools, request, computed tokens)   whole pages to the tree; backups
      release(request)                          the partial tail page freed, prefix unlocked

Only tokens whose KV was written are inserted: the prompt and every generated
token but the last (the last one was never fed back). The core library
(``jaxhicache``) never imports ``models``; this module is the glue.

Requests the cache defers (no device pages now) are admitted again after the
admitted ones have finished. Page tables are padded with ``-1`` to power-of-two
buckets (at least ``min_table_pages``), so each ``(chunk length, bucket)``
compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxhicache.cache import HiCache, HiCacheConfig, Request
from jaxhicache.pools.device import DevicePools
from jaxhicache.storage.backend import StorageBackend
from models.protocol import ServableModel

__all__ = ["RequestReport", "ServingLoop", "bucket_pages"]


def bucket_pages(n: int, minimum: int = 8) -> int:
    """The page-table length for ``n`` pages: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class RequestReport:
    """What one request did. Token counts are per tier of the cached prefix.

    ``cached_tokens = device_cached_tokens + host_cached_tokens +
    storage_cached_tokens`` and ``cached_tokens + prefill_tokens == prompt_len``.

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
    ttft_s: float  # batch start -> first token known on the host
    decode_s: float  # first token -> last token known on the host (the decode steps only)
    total_s: float
    loaded_pages: int  # full pages copied host -> device: host hits and L3 (storage) hits
    inserted_tokens: int  # page-aligned tokens the tree holds for this request afterwards
    used_cache: bool
    full_page_ids: np.ndarray  # the request's page table (unpadded), prefix then own pages
    swa_page_ids: np.ndarray
    prefill_logits: np.ndarray  # [prefill_tokens, vocab]
    step_logits: np.ndarray  # [max_new_tokens, vocab]


class ServingLoop:
    """Drives ``model`` with prefix caching through ``cache``; the loop owns the device pools.

    Args:
      model: the paged, pipeline-parallel model.
      cache: a :class:`HiCache` over the same spec, mesh and layer partition
        (see :meth:`for_model`).
      chunk_size: prefill chunk length (default: the page size).
      min_table_pages: smallest page-table bucket.
      layerwise: apply the prefix load inside the first prefill chunk, layer by
        layer, instead of one separate load dispatch before it (default ``False``,
        as :meth:`HiCache.admit`: a load is dispatched unless the caller opts in
        to applying it in its forward).
    """

    def __init__(
        self,
        model: ServableModel,
        cache: HiCache,
        *,
        chunk_size: int | None = None,
        min_table_pages: int = 8,
        layerwise: bool = False,
    ):
        _check_compatible(model, cache)
        self.model = model
        self.cache = cache
        self.page = model.config.page_size
        self.chunk_size = chunk_size or self.page
        self.min_table_pages = min_table_pages
        self.layerwise = bool(layerwise)
        self.pools: DevicePools = cache.new_device_pools()
        self._oracle_pools: DevicePools | None = None
        self._consumed = True  # whether the last prefill ran (and applied its load)

    @classmethod
    def for_model(
        cls,
        model: ServableModel,
        config: HiCacheConfig | None = None,
        *,
        chunk_size: int | None = None,
        min_table_pages: int = 8,
        layerwise: bool = False,
        store: StorageBackend | None = None,
        **config_fields,
    ) -> ServingLoop:
        """A loop with a fresh :class:`HiCache` matching ``model`` (spec, mesh, partition).

        Either a ``config`` or its fields (``device_pages=...``, ``write_policy=...``);
        the partition is always the model's. ``store``: the L3 backend (with
        ``config.storage`` or ``storage=StorageConfig(...)`` among the fields).
        """
        partition = tuple(m.num_local_layers for m in model.layer_maps)
        if config is None:
            config = HiCacheConfig(partition=partition, **config_fields)
        elif config_fields:
            raise ValueError(f"pass a config or its fields, not both ({sorted(config_fields)})")
        else:
            config = dataclasses.replace(config, partition=partition)
        cache = HiCache(model.spec, model.mesh, config, store=store)
        return cls(
            model,
            cache,
            chunk_size=chunk_size,
            min_table_pages=min_table_pages,
            layerwise=layerwise,
        )

    # ------------------------------------------------------------- requests
    def serve(
        self, tokens: Sequence[int] | np.ndarray, max_new_tokens: int, *, salt=None
    ) -> RequestReport:
        """Runs one request with prefix caching; inserts its computed pages afterwards."""
        return self.serve_batch([tokens], [max_new_tokens], [salt])[0]

    def serve_batch(
        self,
        prompts: Sequence,
        max_new_tokens: int | Sequence[int],
        salts: Sequence | None = None,
    ) -> list[RequestReport]:
        """Runs a batch: one admission (merged prefix loads), then each request in order.

        ``max_new_tokens``: one per request, or one int for all (as :meth:`HiCache.admit`).

        Requests the cache defers are admitted again once the others finished;
        ``OutOfPages`` only when a request cannot fit on its own.
        """
        if isinstance(max_new_tokens, int | np.integer):
            max_new_tokens = [int(max_new_tokens)] * len(prompts)
        prompts = [_prompt(p, n) for p, n in zip(prompts, max_new_tokens, strict=True)]
        new = [int(n) for n in max_new_tokens]
        salts = [None] * len(prompts) if salts is None else list(salts)
        reports: dict[int, RequestReport] = {}
        todo = list(range(len(prompts)))
        while todo:
            t0 = time.perf_counter()
            self.pools, batch = self.cache.admit(
                self.pools,
                [prompts[i] for i in todo],
                [new[i] for i in todo],
                salts=[salts[i] for i in todo],
                layerwise=self.layerwise,
            )
            admitted = todo[: len(batch.requests)]
            assert admitted, "admit raises OutOfPages rather than admitting nothing"
            load = batch.layerwise
            for j, (i, req) in enumerate(zip(admitted, batch.requests, strict=True)):
                try:
                    reports[i] = self._run(req, load, t0)
                except BaseException:
                    if load is not None and not self._consumed:
                        # The cache already lists the loaded pages as on device: they
                        # must land even though the forward that carried them never ran.
                        self.pools, _ = self.cache.engine.apply_layerwise(self.pools, load)
                    for rest in batch.requests[j:]:
                        self.cache.release(rest)
                    raise
                load = None  # the first request's first chunk applied everyone's load
            todo = [todo[k] for k in batch.deferred]
        return [reports[i] for i in range(len(prompts))]

    def _run(self, req: Request, load, t0: float) -> RequestReport:
        cache = self.cache
        tokens = req.prompt
        p = req.cached_tokens
        full, swa = req.full_page_ids, req.swa_page_ids
        self.pools, prefill_logits, step_logits, generated, ttft, decode, prefill = self._generate(
            self.pools, tokens, p, full, swa, req.max_new_tokens, t0, load=load, req=req
        )
        if tokens.size > p:  # the L3 cost model's recompute estimate: the forward only
            cache.observe_prefill(int(tokens.size - p), prefill)
        computed = np.concatenate([tokens, generated[:-1]])
        cache.insert(self.pools, req, computed)
        cache.release(req)
        return RequestReport(
            prompt_len=tokens.size,
            cached_tokens=p,
            device_cached_tokens=req.device_hit_tokens,
            host_cached_tokens=req.host_hit_tokens,
            storage_cached_tokens=req.storage_hit_tokens,
            prefill_tokens=tokens.size - p,
            generated=generated,
            ttft_s=ttft,
            decode_s=decode,
            total_s=time.perf_counter() - t0,
            loaded_pages=(req.host_hit_tokens + req.storage_hit_tokens) // self.page,
            inserted_tokens=computed.size // self.page * self.page,
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
        shape = self.pools
        if n_pages > oracle_pages(shape):
            raise ValueError(
                f"the request needs {n_pages} pages; the oracle pools hold {shape.num_pages}"
            )
        if self._oracle_pools is None:
            self._oracle_pools = self.model.init_pools(
                shape.num_pages, shape.num_swa_pages, num_state_slots=shape.num_state_slots
            )
        ids = np.arange(n_pages, dtype=np.int32)
        pools, prefill_logits, step_logits, generated, ttft, decode, _ = self._generate(
            self._oracle_pools, tokens, 0, ids, ids, max_new_tokens, t0, load=None
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
            decode_s=decode,
            total_s=time.perf_counter() - t0,
            loaded_pages=0,
            inserted_tokens=0,
            used_cache=False,
            full_page_ids=ids,
            swa_page_ids=ids,
            prefill_logits=prefill_logits,
            step_logits=step_logits,
        )

    def _generate(self, pools, tokens, start, full, swa, max_new_tokens, t0, *, load, req=None):
        """Prefill ``tokens[start:]`` then greedy-decode; returns pools, logits, tokens, TTFT,
        decode seconds and the prefill forward's seconds (its first chunk to the first
        token: TTFT less the admission). ``req``: the cache's request (its snapshot slots); ``None``:
        the oracle (recurrent state in slot 0, in place)."""
        n = bucket_pages(full.size, self.min_table_pages)
        full_t, swa_t = _pad(full, n), _pad(swa, n)
        model = self.model
        kw = {} if load is None else {"load": load}
        states = _States(self.cache if req is not None else None, req, model.spec.is_hybrid)
        self._consumed = False
        chunk = self.chunk_size or self.page
        t_prefill = time.perf_counter()
        logits, pools, scratch = model.prefill(
            pools,
            tokens[start:],
            start,
            full_t,
            swa_t,
            chunk_size=self.chunk_size,
            **kw,
            **states.plan(tokens.size, chunk, prefill=True),
        )
        states.done()
        self._consumed = True  # the load (if any) rode on the first chunk
        last = logits[-1]
        tok = int(jnp.argmax(last))
        t_first = time.perf_counter()
        ttft, prefill = t_first - t0, t_first - t_prefill
        generated, steps = [tok], [last]
        for i in range(1, max_new_tokens):
            last, pools, scratch = model.decode_step(
                pools,
                tok,
                tokens.size + i - 1,
                full_t,
                swa_t,
                scratch,
                **states.plan(tokens.size + i, 1),
            )
            states.done()
            tok = int(jnp.argmax(last))
            generated.append(tok)
            steps.append(last)
        decode = time.perf_counter() - t0 - ttft
        return (
            pools,
            np.asarray(logits),
            np.asarray(jnp.stack(steps)),
            np.asarray(generated, np.int32),
            ttft,
            decode,
            prefill,
        )

    # ----------------------------------------------------------- passthroughs
    def evict(self, num_pages: int) -> int:
        """:meth:`HiCache.evict` on this loop's pools: frees at least ``num_pages`` device
        full pages if possible (LRU); backed-up nodes are demoted to host.

        Args:
          num_pages: device full pages to free.

        Returns:
          The pages freed.
        """
        return self.cache.evict(self.pools, num_pages)

    def evict_device(self, num_pages: int) -> int:
        """Deprecated alias of :meth:`evict` (the name ``HiCache`` uses); warns.

        Args:
          num_pages: as in :meth:`evict`.

        Returns:
          The pages freed.
        """
        warnings.warn(
            "ServingLoop.evict_device is deprecated: use ServingLoop.evict (as HiCache.evict)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.evict(num_pages)

    def evict_host(self, num_pages: int) -> int:
        """:meth:`HiCache.evict_host`: frees at least ``num_pages`` host pages if possible
        (host-only leaves, LRU).

        Args:
          num_pages: host full pages to free.

        Returns:
          The pages freed.
        """
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


def _check_compatible(model: ServableModel, cache: HiCache) -> None:
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


def oracle_pages(pools) -> int:
    """Pages a request alone may use in pools of this shape (a spec without SWA state,
    such as MLA, has no SWA pages: only the full pages count)."""
    return min(pools.num_pages, pools.num_swa_pages or pools.num_pages)


class _States:
    """The recurrent-state arguments of one request's forwards (hybrid models only):
    the cache's plans (``HiCache.states``), or for the oracle one slot used in place."""

    def __init__(self, cache, req, hybrid: bool):
        self._cache, self._req, self._hybrid = cache, req, hybrid
        self._plan = None
        self._first = True

    def plan(self, end: int, chunk: int, *, prefill: bool = False) -> dict:
        if not self._hybrid:
            return {}
        if self._cache is None:  # the oracle: from the zero state, slot 0 in place
            first, self._first = self._first, False
            return {"state_in": -1 if first else 0, "state_out": 0}
        self._plan = self._cache.states.plan(self._req, end, chunk)
        out = {"state_in": self._plan.state_in, "state_out": self._plan.state_out}
        if prefill:
            out["snapshots"] = self._plan.snapshots
        return out

    def done(self) -> None:
        if self._plan is not None:
            self._cache.states.computed(self._req, self._plan)
            self._plan = None
