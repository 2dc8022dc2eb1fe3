"""A continuous-batching engine: a paged model (:class:`~models.protocol.ServableModel`:
``PagedModel``, ``PagedMLAModel``) driven by a :class:`HiCache`.

Shaped like the reference system's scheduler, small enough to read. The engine
owns the device pools, an HCA scratch slab with one slot per request in flight,
a waiting queue and a running batch. One :meth:`Engine.step`::

    admission   a request mid-prefill takes its share of the prefill token budget
       │        first; then waiting requests in order, while slots and budget last:
       │        cache.admit(prompt, reserve) — prefix matched, locked, loads merged;
       │        the last one may be cut short (at most one request is mid-prefill);
       │        a request that does not fit waits
    prefill     ONE forward for this step's pieces (rows [B, T], B bucketed, T the
       │        chunk or the budget);
       │        the admission's layer-wise load rides on it; after it:
       │        cache.insert(new whole pages) for every row, first tokens sampled
    grow        running requests whose next position has no page: cache.extend, all
       │        at once; OutOfPages → retract the newest running request (its
       │        computed pages stay in the tree, it re-queues at the front with its
       │        generated tokens appended to its prompt) and try again
    decode      ONE batched forward for all running requests (rows [B, 1], page
       │        tables [B, W], both bucketed to powers of two so shapes compile once),
       │        greedy tokens; a page that filled goes to the tree (batched insert)
    finish      max_new_tokens or a stop token: cache.release; the slot is freed

With ``use_cache=False`` the engine never inserts, so nothing is ever hit: the
cache-off baseline on the same allocator and the same programs.

Every request's tokens equal the same request served alone without a cache
(:meth:`Engine.uncached`), exactly; logits agree within float noise.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxhicache.cache import HiCache, OutOfPages, Request
from jaxhicache.cache.requests import page_tables
from models.protocol import ServableModel
from models.serving import bucket_pages, oracle_pages

__all__ = ["Completion", "Engine", "EngineConfig", "Phase"]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Knobs of :class:`Engine` (validated).

    Attributes:
      max_running: requests in flight at once (prefilling + decoding); the scratch
        slab has this many slots and the decode batch is at most this.
      chunk_size: the short prefill length (default: the page size): a step whose
        rows each need at most this many tokens runs the prefill program with
        ``T = chunk_size``, any other with ``T = prefill_tokens`` (two compiled
        lengths, so short prompts are not padded to the budget).
      prefill_tokens: prefill token budget per step (a multiple of ``chunk_size``;
        default ``4 * chunk_size``): at most that many prompt tokens per step; a
        longer prompt is cut into pieces of at most this over several steps.
      decode_reserve: decode tokens a request gets pages for at admission (more come
        from ``extend`` as it decodes; default 1).
      min_table_pages: smallest page-table bucket.
      use_cache: ``False``: never insert (no prefix is ever hit), the cache-off run.
      record_logits: keep every sampled distribution in the completions (tests).
    """

    max_running: int = 8
    chunk_size: int | None = None
    prefill_tokens: int | None = None
    decode_reserve: int = 1
    min_table_pages: int = 8
    use_cache: bool = True
    record_logits: bool = False

    def __post_init__(self):
        for name in ("max_running", "chunk_size", "prefill_tokens", "min_table_pages"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {v!r}")
        if type(self.decode_reserve) is not int or self.decode_reserve < 0:
            raise ValueError(
                f"EngineConfig.decode_reserve must be an int >= 0, got {self.decode_reserve!r}"
            )
        c, p = self.chunk_size, self.prefill_tokens
        if c is not None and p is not None and p % c:
            raise ValueError(f"EngineConfig.prefill_tokens={p} is not a multiple of chunk {c}")


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclasses.dataclass(eq=False)
class _Req:
    rid: int
    prompt: np.ndarray  # the original prompt
    max_new: int
    stop: frozenset
    salt: str | bytes | None
    arrival: float
    phase: Phase = Phase.WAITING
    generated: list = dataclasses.field(default_factory=list)
    token_times: list = dataclasses.field(default_factory=list)
    logits: list = dataclasses.field(default_factory=list)
    cache_req: Request | None = None
    computed: int = 0  # positions whose KV is written (of prompt + generated)
    slot: int = -1
    fresh: bool = False
    retractions: int = 0
    hits: tuple = (0, 0, 0)  # device, host, storage tokens of the first admission
    prefill_computed: int = 0  # prompt tokens this request computed (all admissions)

    @property
    def seq(self) -> np.ndarray:
        """Prompt + generated tokens (the cache request's prompt after a retraction)."""
        return np.concatenate([self.prompt, np.asarray(self.generated, np.int32)])


@dataclasses.dataclass(frozen=True)
class Completion:
    """What one request did (times in ``time.perf_counter`` seconds)."""

    rid: int
    prompt: np.ndarray
    generated: np.ndarray
    device_cached_tokens: int  # of its first admission
    host_cached_tokens: int
    storage_cached_tokens: int
    prefill_tokens: int  # prompt (and re-prefilled) tokens it computed
    arrival_s: float
    token_s: tuple  # when each generated token was known on the host
    end_s: float
    retractions: int
    aborted: bool
    step_logits: np.ndarray | None  # [len(generated), vocab] with record_logits

    @property
    def prompt_len(self) -> int:
        return self.prompt.size

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.arrival_s if self.token_s else float("nan")

    @property
    def itl_s(self) -> np.ndarray:
        """Inter-token latencies."""
        return np.diff(np.asarray(self.token_s))


class Engine:
    """Continuous batching over ``model`` with prefix caching through ``cache``."""

    def __init__(self, model: ServableModel, cache: HiCache, config: EngineConfig | None = None):
        self.model, self.cache = model, cache
        self.config = cfg = config or EngineConfig()
        self.page = model.config.page_size
        self.chunk = cfg.chunk_size or self.page
        self.budget = cfg.prefill_tokens or 4 * self.chunk
        if self.budget % self.chunk:
            raise ValueError(f"prefill_tokens={self.budget} is not a multiple of {self.chunk}")
        self.pools = cache.new_device_pools()
        self.slab = model.new_scratch_slab(cfg.max_running)
        self._free_slots = list(range(cfg.max_running))[::-1]
        self.waiting: collections.deque[_Req] = collections.deque()
        self.running: list[_Req] = []  # admission order (the newest is retracted first)
        self._all: dict[int, _Req] = {}
        self.done: dict[int, Completion] = {}
        self.on_finish: Callable[[Completion], None] | None = None
        self.steps = self.retractions = 0
        self._next = 0
        self._oracle_pools = None

    # --------------------------------------------------------------- requests
    def submit(self, prompt, max_new_tokens: int, *, stop: Sequence[int] = (), salt=None) -> int:
        """Queues a request; returns its id. Arrival is now."""
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        if prompt.size < 1:
            raise ValueError("a request needs at least one prompt token")
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        r = _Req(self._next, prompt, max_new_tokens, frozenset(stop), salt, time.perf_counter())
        self._next += 1
        self._all[r.rid] = r
        self.waiting.append(r)
        if self.config.use_cache:
            self.cache.prefetch(prompt, salt=salt)  # L3 lookup off the critical path
        return r.rid

    def abort(self, rid: int) -> None:
        """Ends a request wherever it is; nothing more of it is inserted."""
        r = self._all.get(rid)
        if r is None or r.phase in (Phase.FINISHED, Phase.ABORTED):
            raise ValueError(f"request {rid} is not waiting or in flight")
        if r.phase is Phase.WAITING:
            self.waiting.remove(r)
        else:
            self.cache.release(r.cache_req)
            self._leave(r)
        self._finish(r, aborted=True)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running)

    def run(self, max_steps: int | None = None) -> dict[int, Completion]:
        """Steps until nothing waits or runs (or ``max_steps``); returns completions."""
        n = 0
        while not self.idle and (max_steps is None or n < max_steps):
            self.step()
            n += 1
        return self.done

    def uncached(self, prompt, max_new_tokens: int, *, stop: Sequence[int] = ()):
        """The oracle: the request alone, recomputed from position 0 in private pools of
        the engine's shapes (no cache, no batch), greedy. Returns ``(generated int32
        [n], step_logits [n, vocab])``."""
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        n_pages = -(-(prompt.size + max_new_tokens - 1) // self.page)
        shape = self.pools
        if n_pages > oracle_pages(shape):
            raise ValueError(f"the request needs {n_pages} pages; the pools hold {shape.num_pages}")
        if self._oracle_pools is None:
            self._oracle_pools = self.model.init_pools(
                shape.num_pages, shape.num_swa_pages, num_state_slots=shape.num_state_slots
            )
        ids = np.full(bucket_pages(n_pages, self.config.min_table_pages), -1, np.int32)
        ids[:n_pages] = np.arange(n_pages)
        m = self.model
        hybrid = m.spec.is_hybrid  # the recurrent state: slot 0, in place
        logits, pools, scratch = m.prefill(
            self._oracle_pools,
            prompt,
            0,
            ids,
            ids,
            chunk_size=self.chunk,
            **({"state_in": -1, "state_out": 0} if hybrid else {}),
        )
        out, steps = [int(np.argmax(logits[-1]))], [logits[-1]]
        while len(out) < max_new_tokens and out[-1] not in set(stop):
            last, pools, scratch = m.decode_step(
                pools,
                out[-1],
                prompt.size + len(out) - 1,
                ids,
                ids,
                scratch,
                **({"state_in": 0, "state_out": 0} if hybrid else {}),
            )
            out.append(int(np.argmax(last)))
            steps.append(last)
        self._oracle_pools = pools
        return np.asarray(out, np.int32), np.stack(steps)

    # ------------------------------------------------------------------- step
    def step(self) -> None:
        """One scheduler step: admission, one prefill forward, growth, one decode forward."""
        self.steps += 1
        decoding = [r for r in self.running if r.phase is Phase.RUNNING]
        rows, load = self._admit()
        if rows:
            self._prefill(rows, load)
        if decoding:
            self._grow(decoding)
            decoding = [r for r in decoding if r.phase is Phase.RUNNING]
            if decoding:
                self._decode(decoding)

    def _admit(self) -> tuple[list[tuple[_Req, int]], object]:
        """This step's prefill rows ``(request, tokens)`` and the admission's load.

        The step's prompt tokens are capped by ``prefill_tokens``. A request still
        prefilling takes what it needs of it first; new requests are admitted, in
        order and while scratch slots last, only while budget is left, and the last
        one may be cut short: at most one request is ever mid-prefill.
        """
        rows: list[tuple[_Req, int]] = []
        budget = self.budget
        cut = False  # a request's prompt does not end in this step
        for r in self.running:
            if r.phase is Phase.PREFILL:
                rest = r.cache_req.prompt.size - r.computed
                n = min(rest, budget)
                if n:
                    rows.append((r, n))
                budget -= n
                cut |= n < rest
        todo: list[_Req] = []
        left = budget
        while self.waiting and left > 0 and not cut and len(todo) < len(self._free_slots):
            r = self.waiting.popleft()
            todo.append(r)
            rest = r.seq.size - self._expected_cached(r)
            cut = rest > left
            left -= min(rest, left)
        if not todo:
            return rows, None
        reserve = [min(r.max_new - len(r.generated), 1 + self.config.decode_reserve) for r in todo]
        try:
            self.pools, batch = self.cache.admit(
                self.pools,
                [r.seq for r in todo],
                reserve,
                salts=[r.salt for r in todo],
                layerwise=True,
            )
        except OutOfPages:
            if not self.running and not rows:
                raise  # the first request cannot fit even in an empty engine
            self.waiting.extendleft(reversed(todo))
            return rows, None
        for r in reversed(todo[len(batch.requests) :]):  # deferred: back to the front
            self.waiting.appendleft(r)
        for r, req in zip(todo, batch.requests, strict=False):
            r.cache_req, r.computed, r.phase = req, req.cached_tokens, Phase.PREFILL
            r.slot, r.fresh = self._free_slots.pop(), True
            if not r.retractions:
                r.hits = (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens)
            self.running.append(r)
            n = min(req.prompt.size - r.computed, budget)  # the estimate may have been short
            if n:
                rows.append((r, n))
            budget -= n
        return rows, batch.layerwise

    def _expected_cached(self, r: _Req) -> int:
        return self.cache.tree.cached_len(r.seq[:-1], salt=r.salt) if self.config.use_cache else 0

    def _prefill(self, rows, load) -> None:
        b = _pow2(len(rows))
        width = bucket_pages(
            max(r.cache_req.num_pages for r, _ in rows), self.config.min_table_pages
        )
        t_len = self.chunk if max(n for _, n in rows) <= self.chunk else self.budget
        tokens = np.zeros((b, t_len), np.int32)  # two compiled lengths: a chunk, the budget
        starts, n_valid = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for i, (r, n) in enumerate(rows):
            tokens[i, :n] = r.cache_req.prompt[r.computed : r.computed + n]
            starts[i], n_valid[i] = r.computed, n
        t0 = time.perf_counter()
        logits = self._forward([r for r, _ in rows], b, width, tokens, starts, n_valid, load)
        t = time.perf_counter()
        if self.config.use_cache:  # the L3 cost model's recompute estimate
            self.cache.observe_prefill(int(n_valid.sum()), t - t0)
        inserts = []
        for i, (r, n) in enumerate(rows):
            r.computed += n
            r.prefill_computed += n
            inserts.append(r)
            if r.computed == r.cache_req.prompt.size:
                r.phase = Phase.RUNNING
                self._sample(r, logits[i, n - 1], t)
        self._insert([r for r in inserts if r.phase is not Phase.FINISHED])

    def _grow(self, decoding: list[_Req]) -> None:
        """Pages for every running request's next position; retract the newest on OOM."""
        while True:
            need = [
                r
                for r in decoding
                if r.phase is Phase.RUNNING and r.computed >= r.cache_req.capacity
            ]
            if not need:
                return
            try:
                self.cache.extend(self.pools, [r.cache_req for r in need], 1)
                return
            except OutOfPages:
                if len(self.running) == 1:
                    raise  # one request alone does not fit the device pool
                self._retract(self.running[-1])

    def _retract(self, r: _Req) -> None:
        computed = r.seq[: r.computed]
        if self.config.use_cache:
            self.cache.retract(self.pools, r.cache_req, computed)
        else:
            self.cache.release(r.cache_req)
        self._leave(r)
        r.phase, r.computed = Phase.WAITING, 0
        r.retractions += 1
        self.retractions += 1
        self.waiting.appendleft(r)

    def _decode(self, reqs: list[_Req]) -> None:
        b = _pow2(len(reqs))
        width = bucket_pages(max(r.cache_req.num_pages for r in reqs), self.config.min_table_pages)
        tokens = np.zeros((b, 1), np.int32)
        starts, n_valid = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for i, r in enumerate(reqs):
            tokens[i, 0], starts[i], n_valid[i] = r.generated[-1], r.computed, 1
        logits = self._forward(reqs, b, width, tokens, starts, n_valid, None)
        t = time.perf_counter()
        filled = []
        for i, r in enumerate(reqs):
            r.computed += 1
            self._sample(r, logits[i, 0], t)
            if r.phase is Phase.RUNNING and r.computed % self.page == 0:
                filled.append(r)
        self._insert(filled)

    def _forward(self, reqs, b, width, tokens, starts, n_valid, load):
        full, swa = page_tables([r.cache_req for r in reqs], width)
        pad = ((0, b - len(reqs)), (0, 0))
        full, swa = np.pad(full, pad, constant_values=-1), np.pad(swa, pad, constant_values=-1)
        slots = np.zeros(b, np.int32)
        fresh = np.zeros(b, bool)
        for i, r in enumerate(reqs):
            slots[i], fresh[i] = r.slot, r.fresh
            r.fresh = False
        spare = [s for s in range(self.config.max_running) if s not in set(slots[: len(reqs)])]
        slots[len(reqs) :] = spare[0] if spare else 0
        kw = {} if load is None else {"load": load}
        plans = []
        states = self.cache.states
        if states is not None:  # recurrent hybrids: each row's snapshot slots
            s_in, s_out = np.full(b, -1, np.int32), np.full(b, -1, np.int32)
            for i, r in enumerate(reqs):
                end = int(starts[i] + n_valid[i])
                plans.append(states.plan(r.cache_req, end, int(n_valid[i])))
                s_in[i], s_out[i] = plans[-1].state_in, plans[-1].state_out
            kw.update(state_in=s_in, state_out=s_out)
        logits, self.pools, self.slab = self.model.forward(
            self.pools, self.slab, tokens, starts, n_valid, full, swa, slots, fresh, **kw
        )
        for r, plan in zip(reqs, plans, strict=False):
            states.computed(r.cache_req, plan)
        return logits

    def _sample(self, r: _Req, logits: np.ndarray, t: float) -> None:
        tok = int(np.argmax(logits))
        r.generated.append(tok)
        r.token_times.append(t)
        if self.config.record_logits:
            r.logits.append(np.asarray(logits))
        if len(r.generated) >= r.max_new or tok in r.stop:
            self._end(r)

    def _insert(self, reqs: list[_Req]) -> None:
        """New whole pages of the computed tokens go to the tree (one batched call)."""
        if not self.config.use_cache:
            return
        grow = [
            r
            for r in reqs
            if r.computed // self.page > r.cache_req.own_start + r.cache_req.inserted_pages
        ]
        if grow:
            self.cache.insert(
                self.pools, [r.cache_req for r in grow], [r.seq[: r.computed] for r in grow]
            )

    def _end(self, r: _Req) -> None:
        if self.config.use_cache and r.computed > r.cache_req.inserted_len:
            self.cache.insert(self.pools, r.cache_req, r.seq[: r.computed])
        self.cache.release(r.cache_req)
        self._leave(r)
        self._finish(r, aborted=False)

    def _leave(self, r: _Req) -> None:
        self.running.remove(r)
        self._free_slots.append(r.slot)
        r.slot, r.cache_req = -1, None

    def _finish(self, r: _Req, *, aborted: bool) -> None:
        r.phase = Phase.ABORTED if aborted else Phase.FINISHED
        c = Completion(
            rid=r.rid,
            prompt=r.prompt,
            generated=np.asarray(r.generated, np.int32),
            device_cached_tokens=r.hits[0],
            host_cached_tokens=r.hits[1],
            storage_cached_tokens=r.hits[2],
            prefill_tokens=r.prefill_computed,
            arrival_s=r.arrival,
            token_s=tuple(r.token_times),
            end_s=time.perf_counter(),
            retractions=r.retractions,
            aborted=aborted,
            step_logits=np.stack(r.logits) if r.logits else None,
        )
        self.done[r.rid] = c
        if self.on_finish is not None:
            self.on_finish(c)
