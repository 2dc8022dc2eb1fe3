"""Paged, pipeline-parallel execution of the tiny MLA + DSA model over the library's device pools.

:class:`PagedMLAModel` has the interface of :class:`models.paged.PagedModel`
(:class:`models.protocol.ServableModel`), so :class:`models.engine.Engine` and
:class:`models.serving.ServingLoop` drive it unchanged.  Layers are split over
``'pp'`` with the library's layer maps and run by :func:`models.pipeline.pipeline`
inside ``jax.shard_map``; the pools are replicated over ``'tp'`` (the computation
too).  Index spaces, as in :mod:`models.stage`:

* per-layer weights: stacked by **stage-local id** ``[pp, max_local, ...]``;
* indexer weights and ``DSA_INDEXER`` pool rows: by **DSA_INDEXER sub-pool id**
  (``local_to_subpool(DSA_INDEXER)[l]``), never by the local id: with shared
  indexers (GLM-5.2) the two differ;
* ``MLA_LATENT`` pool rows: by the ``MLA_LATENT`` sub-pool id.

Rows (token ``s`` at full page ``full[s // page]``, slot ``s % page``):

* ``MLA_LATENT`` ``[pages, page, kv_lora_rank + rope_dim]`` f32: ``[c_s, k_rope_s]``;
* ``DSA_INDEXER`` ``[pages, page * (D_I + 4)]`` uint8: slot ``i``'s fp8 key at bytes
  ``[i D_I, (i + 1) D_I)``, its fp32 scale at ``page D_I + 4 i`` (:mod:`models.mla`).

The selection of an indexer-owning layer (``int32 [B, T, K]`` token positions and
their validity) rides with the activations to the following non-owning layers,
across stages too.  There is no SWA state and no request-scoped scratch: SWA page
tables are accepted and ignored, and the scratch slab only tracks which slots
started (for the same host checks as the DSV4 model).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import put_global
from jaxhicache.layer_map import StageView
from jaxhicache.mesh import PP, pool_sharding
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.program_cache import cached_jit
from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind
from jaxhicache.transfer import LayerwiseLoad, apply_layer, fetch_layer
from models import layers as L
from models import mla as M
from models.chunk import NAN, View, Write, entries_with_own, plan_write, scatter
from models.mla_config import TinyMLAConfig
from models.pipeline import (
    check_load,
    global_layer_rows,
    page_tables,
    pipeline,
    place,
    pools_from_global,
    program_key,
    stack_rows,
    stage0_logits,
)
from models.stage import MATMUL_PRECISION, compiler_options

__all__ = ["PagedMLAModel", "SlotSlab", "check_mla_batch", "mla_layer_forward"]

LAT, IDX = PoolKind.MLA_LATENT, PoolKind.DSA_INDEXER
_HEAD = ("embed", "final_norm", "lm_head")


@dataclasses.dataclass
class SlotSlab:
    """The engine's per-slot state: only ``starts`` int64 ``[slots]`` (``-1``: never started).

    The MLA model keeps nothing request-scoped on device (every row it reads is
    in the pools), so the slab is host bookkeeping only.
    """

    starts: np.ndarray

    @property
    def num_slots(self) -> int:
        return int(self.starts.shape[0])


# ------------------------------------------------------------------ one layer
def read_index_keys(view: View, page_ids, n_need, min_rows, cfg: TinyMLAConfig):
    """Dequantized indexer keys of a request's tokens ``[max(n_pages * page, min_rows), D_I]``.

    Tokens ``< n_need`` are needed (NaN where their page is absent), the rest are 0.
    """
    n, page, dim = page_ids.shape[0], cfg.page_size, cfg.index_head_dim
    raw = view.array[view.layer, jnp.where(page_ids >= 0, page_ids, 0)]
    keys = M.decode_index_row(raw, page, dim).reshape(n * page, dim)
    need = (jnp.arange(n * page) < n_need)[:, None]
    ok = jnp.repeat(page_ids >= 0, page)[:, None]
    keys = jnp.where(need & ~ok, NAN, jnp.where(need, keys, 0.0))
    if n * page < min_rows:
        keys = jnp.pad(keys, ((0, min_rows - n * page), (0, 0)))
    return keys


def scatter_index_bytes(array, layer, w: Write, cfg: TinyMLAConfig):
    """Applies a ``DSA_INDEXER`` write (rows: each token's ``D_I + 4`` bytes) to ``array[layer]``."""
    dim = cfg.index_head_dim
    target = w.target.reshape(-1)
    rows = w.rows.reshape(target.shape[0], dim + 4)
    target = jnp.where(target >= 0, target, array.shape[1])  # out of bounds: dropped
    offsets = M.index_byte_offsets(w.slot.reshape(-1), cfg.page_size, dim)
    return array.at[layer, target[:, None], offsets].set(rows, mode="drop")


def mla_layer_forward(cfg: TinyMLAConfig, kind, p, ip, h, start, end, lat, idx, full, sel, ok):
    """One layer over one request's chunk ``[start, end)`` (padded to ``T``): per row, pure.

    ``kind``: static ``MLA`` or ``MLA_DSA``; ``p``: layer weights; ``ip``: indexer
    weights (``MLA_DSA``); ``h`` [T, d]; ``lat`` / ``idx``: read-only :class:`View` s
    of the layer's pool rows (pre-chunk); ``full``: the 1-D page table; ``sel`` /
    ``ok`` [T, K]: the selection carried from the last owner (replaced here on an
    owner).  Returns ``(h, sel, ok, writes)``.
    """
    t, page, k = h.shape[0], cfg.page_size, cfg.index_topk
    pos = start + jnp.arange(t)
    live = pos < end
    x = L.rms_norm(h, p["attn_norm"], cfg.eps)
    q, cq = M.query_heads(p, x, pos, cfg)
    rows = jnp.where(live[:, None], M.latent_rows(p, x, pos, cfg), 0.0)
    lat_w = plan_write(full, pos // page, pos % page, rows, live)
    lat_all = entries_with_own(lat, full, end, k, pos, lat_w)  # [N, L + R]
    writes = {LAT: lat_w}
    if kind == AttentionKind.MLA_DSA:
        k_fp8, scale = M.fp8_quant(M.index_keys(ip, x, pos, cfg))
        idx_w = plan_write(full, pos // page, pos % page, M.index_row_bytes(k_fp8, scale), live)
        keys = read_index_keys(idx, full, end, k, cfg)
        at = jnp.where(idx_w.target >= 0, pos, keys.shape[0])
        keys = keys.at[at].set(M.fp8_dequant(k_fp8, scale), mode="drop")  # own keys, as read back
        eligible = jnp.arange(keys.shape[0])[None] <= pos[:, None]
        sel, ok, _, _ = M.select_tokens(ip, x, cq, pos, keys, eligible, cfg)
        writes[IDX] = idx_w
    o = M.absorbed_attention(p, q, lat_all[sel], ok, cfg)
    return M.residual_tail(p, h, o, cfg), sel, ok, writes


# ------------------------------------------------------------------ one stage
def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def mla_stage_forward(cfg, sp, view: StageView, pools, act, start, end, full, load=None):
    """One stage's layers over a batch of chunks: a scan over local layers, ``lax.switch``
    on the traced kind, ``jax.vmap`` of :func:`mla_layer_forward` over the rows, then one
    scatter per sub-pool.  ``act`` = ``(h [B, T, d], sel [B, T, K], ok [B, T, K])``.
    Returns ``(act, pools)``."""
    view = jax.tree.map(jnp.asarray, view)

    def branch(kind, li):
        def run(h, sel, ok, pools):
            p = _take(sp["layers"], li)
            lk = view.local_to_subpool[LAT][li]
            ik = ip = None
            if kind == AttentionKind.MLA_DSA:
                ik = view.local_to_subpool[IDX][li]  # the indexer's own index space
                ip = _take(sp["idx"], ik)
            lat = View(pools[LAT], lk)
            idx = View(pools[IDX], ik) if ik is not None else None

            def row(h, start, end, full, sel, ok):
                return mla_layer_forward(cfg, kind, p, ip, h, start, end, lat, idx, full, sel, ok)

            h, sel, ok, writes = jax.vmap(row)(h, start, end, full, sel, ok)
            pools = dict(pools)
            pools[LAT] = scatter(pools[LAT], lk, writes[LAT])
            if ik is not None:
                pools[IDX] = scatter_index_bytes(pools[IDX], ik, writes[IDX], cfg)
            return h, sel, ok, pools

        return run

    def body(carry, li):
        h, sel, ok, pools, fetched = carry
        if load is not None:  # layer li's rows land now; layer li + 1's start moving
            pools = apply_layer(pools, load, fetched, view, li)
            fetched = fetch_layer(load, view, li + 1)
        k = view.attention_kind[li]
        at = jnp.where(view.layer_valid[li] & (k >= AttentionKind.MLA), k - AttentionKind.MLA, 2)
        fns = [branch(AttentionKind.MLA, li), branch(AttentionKind.MLA_DSA, li)]
        fns.append(lambda *c: c)  # padding layer
        h, sel, ok, pools = jax.lax.switch(at, fns, h, sel, ok, pools)
        return (h, sel, ok, pools, fetched), None

    fetched = {} if load is None else fetch_layer(load, view, 0)
    carry = (*act, dict(pools), fetched)
    n = view.attention_kind.shape[0]
    (h, sel, ok, pools, _), _ = jax.lax.scan(body, carry, jnp.arange(n))
    return (h, sel, ok), pools


def stack_mla_params(cfg: TinyMLAConfig, params: dict, maps) -> dict:
    """Per-stage weight stacks (numpy): ``"layers"`` by stage-local id, ``"idx"`` by
    ``DSA_INDEXER`` sub-pool id, both ``[pp, max_rows, ...]``; plus the head weights."""
    params = jax.device_get(params)
    layers = params["layers"]
    if len(layers) != cfg.num_layers:
        raise ValueError(f"params have {len(layers)} layers, config has {cfg.num_layers}")
    out = {k: params[k] for k in _HEAD}
    max_local = max(m.num_local_layers for m in maps)
    common, idx = [], []
    for m in maps:
        rows = [
            {k: v for k, v in layers[m.global_id(loc)].items() if k != "idx"}
            for loc in range(m.num_local_layers)
        ]
        common.append(stack_rows(rows, max_local))
        idx.append([layers[int(g)]["idx"] for g in m.subpool_to_global(IDX)])
    out["layers"] = stack_rows(common, len(maps))
    zero = jax.tree.map(np.zeros_like, layers[cfg.owner_layers[0]]["idx"])
    n = max(1, max(len(r) for r in idx))
    out["idx"] = stack_rows([stack_rows(r or [zero], n) for r in idx], len(maps))
    return out


# ------------------------------------------------------------- host checks
def _ints(name, x, ndim):
    a = np.asarray(x)
    if a.ndim != ndim or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a {ndim}-D int array, got shape {a.shape} {a.dtype}")
    return a.astype(np.int32)


def check_mla_batch(page: int, tokens, starts, n_valid, full, swa, slots, fresh, slot_starts):
    """Host checks of a batch (``ValueError`` naming the bad value); returns the normalized
    ``(tokens, starts, n_valid, full)`` and the slot starts after the call.

    Per valid row: a full page for every token ``< end`` in the table, a started (or
    ``fresh``) slot of its own.  Across valid rows: no page that one row writes (its
    positions ``[start, end)``) is read or written by another.  ``swa`` is ignored.
    """
    tokens = _ints("tokens", tokens, 2)
    b, t = tokens.shape
    if b < 1 or t < 1:
        raise ValueError(f"tokens must be [B >= 1, T >= 1], got {tokens.shape}")
    starts, n_valid, slots = (
        _ints(n, x, 1) for n, x in (("starts", starts), ("n_valid", n_valid), ("slots", slots))
    )
    fresh = np.zeros((b,), bool) if fresh is None else np.asarray(fresh, bool)
    full = _ints("full_page_ids", full, 2)
    if np.asarray(swa).shape[:1] != (b,):
        raise ValueError(f"swa_page_ids must have B={b} rows, got {np.asarray(swa).shape}")
    for name, a in (("starts", starts), ("n_valid", n_valid), ("slots", slots), ("fresh", fresh)):
        if a.shape != (b,):
            raise ValueError(f"{name} has shape {a.shape}, tokens has B={b} rows")
    if full.shape[0] != b:
        raise ValueError(f"full_page_ids {full.shape} must be [B={b}, W]")
    new_starts = np.array(slot_starts, copy=True)
    owner: dict[int, int] = {}
    reads, writes = {}, {}
    for i in np.flatnonzero(n_valid > 0).tolist():
        start, end, slot = int(starts[i]), int(starts[i] + n_valid[i]), int(slots[i])
        if n_valid[i] > t or start < 0:
            raise ValueError(f"row {i}: bad chunk start={start}, n_valid={n_valid[i]}, T={t}")
        if not 0 <= slot < len(slot_starts):
            raise ValueError(f"slots[{i}]={slot} is outside the slab's [0, {len(slot_starts)})")
        if slot in owner:
            raise ValueError(f"rows {owner[slot]} and {i} both use slot {slot}")
        owner[slot] = i
        if not fresh[i] and slot_starts[slot] < 0:
            raise ValueError(f"row {i}: slot {slot} was never started (pass fresh=True)")
        if fresh[i]:
            new_starts[slot] = start
        n_pages = -(-end // page)
        if n_pages > full.shape[1]:
            raise ValueError(
                f"row {i}: chunk ends at {end}, the table covers {full.shape[1]} pages"
            )
        missing = [j for j in range(n_pages) if full[i, j] < 0]
        if missing:
            raise ValueError(f"row {i}: full pages {missing} are absent but needed for < {end}")
        reads[i] = {int(x) for x in full[i, :n_pages]}
        writes[i] = {int(x) for x in full[i, start // page : n_pages]}
    writer = {pg: i for i, ws in writes.items() for pg in ws}
    for i in writes:
        for pg in reads[i]:
            if writer.get(pg, i) != i:
                raise ValueError(f"row {i} reads or writes page {pg} that row {writer[pg]} writes")
    return (tokens, starts, n_valid, full), new_starts


# ------------------------------------------------------------------- the model
class PagedMLAModel:
    """The tiny MLA + DSA model over stage-sharded paged pools.

    Args:
      config: the model config.
      params: plain parameters (:func:`models.mla.init_mla_params`), layers by global id.
      spec: the cache spec (default ``config.cache_spec()``; FLOAT f32 latent rows).
      mesh: a ``('pp', 'tp')`` mesh (default ``make_mesh(pp)``).
      pp: pipeline stages when no mesh is given (default 1).
      partition: explicit layers per stage (default: the reference split rule).
      fast_compile: compile with :data:`models.stage.FAST_COMPILE_OPTIONS` (default: on CPU).
    """

    def __init__(
        self,
        config: TinyMLAConfig,
        params: dict,
        *,
        spec: ModelCacheSpec | None = None,
        mesh: Mesh | None = None,
        pp: int | None = None,
        partition=None,
        fast_compile: bool | None = None,
    ):
        self.config = config
        self.spec = spec if spec is not None else config.cache_spec()
        want = config.cache_spec(self.spec.name)
        if self.spec != want:
            raise ValueError(f"spec {self.spec} is not the cache of this config ({want})")
        at = place(self.spec, mesh, pp, partition, partial(stack_mla_params, config, params), _HEAD)
        self.mesh, self.pp = at.mesh, at.mesh.shape[PP]
        self.layer_maps, self.stacked = at.layer_maps, at.stacked
        self._head, self._stages, self._replicated = at.head, at.stages, at.replicated
        self._compiler_options = compiler_options(fast_compile)
        self._fns: dict[tuple, object] = {}
        self.traces = 0  # forward programs traced (one per compilation)

    # ------------------------------------------------------------------ state
    def init_pools(
        self, num_pages: int, num_swa_pages: int = 0, num_state_slots: int = 0
    ) -> DevicePools:
        """Zeroed device pools for ``num_pages`` full pages (the MLA spec has no SWA space
        and no state space: ``num_state_slots`` is ignored)."""
        del num_state_slots
        return allocate_device_pools(self.spec, self.mesh, self.stacked, num_pages, num_swa_pages)

    def new_scratch(self, start_pos: int = 0) -> None:
        """No request-scoped state: ``None`` (the signature of ``PagedModel.new_scratch``)."""
        del start_pos

    def new_scratch_slab(self, slots: int) -> SlotSlab:
        """The engine's slot bookkeeping for ``slots`` requests in flight (none started)."""
        if type(slots) is not int or slots < 1:
            raise ValueError(f"slots must be a positive int, got {slots!r}")
        return SlotSlab(np.full((slots,), -1, np.int64))

    # ---------------------------------------------------------------- forward
    def _fn(self, t: int, load: LayerwiseLoad | None = None):
        """The program for chunk length ``t`` (one variant per fused-load structure)."""
        key = (t, None if load is None else jax.tree.structure(load))
        if key in self._fns:
            return self._fns[key]
        cfg, pp = self.config, self.pp
        stacked, kinds = self.stacked, self.spec.kinds()

        def body(head, stages, pools, tokens, start, n_valid, full, *ld):
            self.traces += 1  # at trace time only
            view = stacked.stage(PP)
            sp = jax.tree.map(lambda a: a[0], stages)
            pools = {k: a[0] for k, a in pools.items()}
            end = start + n_valid
            lw = ld[0].stage_local() if ld else None
            b, t = tokens.shape
            sel = jnp.zeros((b, t, cfg.index_topk), jnp.int32)
            act = (L.embed(head, tokens), sel, jnp.zeros(sel.shape, bool))

            def run(act, pools):
                return mla_stage_forward(cfg, sp, view, pools, act, start, end, full, load=lw)

            act, pools = pipeline(pp, run, act, pools)
            logits = stage0_logits(L.lm_head(head, act[0], cfg))
            return logits, {k: a[None] for k, a in pools.items()}

        in_specs = (P(), P(PP), P(PP), P(), P(), P(), P())
        if load is not None:
            in_specs += (load.specs(),)
        fn = jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=(P(), P(PP)), check_vma=False
        )
        out_shardings = (
            self._replicated,
            {k: pool_sharding(self.spec, self.mesh, k) for k in kinds},
        )
        jitted = cached_jit(  # a restart loads it (jaxhicache.program_cache)
            fn,
            key=program_key(self, t, load),
            donate_argnums=(2,),
            out_shardings=out_shardings,
            compiler_options=self._compiler_options,
        )
        self._fns[key] = jitted
        return jitted

    def _program(self, pools, tokens, starts, n_valid, full, load=None):
        rep = self._replicated
        args = (
            self._head,
            self._stages,
            dict(pools.arrays),
            *(put_global(a, rep) for a in (tokens, starts, n_valid, full)),
        )
        if load is not None:
            check_load(self.mesh, pools, load)
            args += (load,)
        return self._fn(tokens.shape[1], load), args

    def _run(self, pools, tokens, starts, n_valid, full, load=None):
        fn, args = self._program(pools, tokens, starts, n_valid, full, load)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            logits, arrays = fn(*args)
        return logits.addressable_data(0), pools.replace(arrays=arrays)

    def forward(
        self,
        pools: DevicePools,
        slab: SlotSlab,
        tokens,
        starts,
        n_valid,
        full_page_ids,
        swa_page_ids,
        slots,
        fresh=None,
        load: LayerwiseLoad | None = None,
        *,
        state_in=None,
        state_out=None,
    ):
        """One batched forward of ``B`` requests' chunks (decode: ``T = 1``), as
        :meth:`models.paged.PagedModel.forward`: ``tokens`` int32 ``[B, T]``, ``starts`` /
        ``n_valid`` / ``slots`` int32 ``[B]`` (``n_valid = 0``: a padding row, writes
        nothing), ``full_page_ids`` ``[B, W]`` (``-1`` padded), ``swa_page_ids`` ignored,
        ``fresh`` bool ``[B]``, ``load`` an optional fused layer-wise load.  The pools are
        donated.  Returns ``(logits [B, T, vocab] (host numpy), pools, slab)``."""
        del state_in, state_out  # the protocol's state slots: no STATE space here
        (tokens, starts, n_valid, full), new_starts = check_mla_batch(
            self.config.page_size,
            tokens,
            starts,
            n_valid,
            full_page_ids,
            swa_page_ids,
            slots,
            fresh,
            slab.starts,
        )
        if load is not None and not n_valid.any():
            raise ValueError("a fused load needs at least one valid row to compute")
        logits, pools = self._run(pools, tokens, starts, n_valid, full, load)
        return np.asarray(logits), pools, SlotSlab(new_starts)

    def _chunk_args(self, tokens, start, n, full, t):
        check_mla_batch(
            self.config.page_size,
            np.zeros((1, t), np.int32),
            [start],
            [n],
            full[None],
            full[None],
            [0],
            [True],
            [-1],
        )
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        one = np.ones((1,), np.int32)
        return padded, one * start, one * n, full[None]

    def prefill(
        self,
        pools: DevicePools,
        tokens,
        start_pos: int,
        full_page_ids,
        swa_page_ids,
        chunk_size: int | None = None,
        scratch=None,
        load: LayerwiseLoad | None = None,
        *,
        state_in=None,
        state_out=None,
        snapshots=None,
    ):
        """Runs ``tokens`` at positions ``[start_pos, start_pos + len(tokens))`` in chunks of
        ``chunk_size`` (default: the page size; the last one padded), as
        :meth:`models.paged.PagedModel.prefill`: pages ``< start_pos`` must hold the prefix
        or arrive with ``load`` (applied by the first chunk, layer by layer).
        ``swa_page_ids`` and ``scratch`` are ignored.  Returns
        ``(logits [len(tokens), vocab] (host numpy), pools, None)``."""
        del scratch, state_in, state_out, snapshots  # no STATE space here
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        chunk = chunk_size or self.config.page_size
        if chunk < 1 or start_pos < 0:
            raise ValueError(f"need chunk_size >= 1 and start_pos >= 0, got {chunk}, {start_pos}")
        if load is not None and not len(tokens):
            raise ValueError("a fused load needs at least one token to compute")
        full = page_tables(full_page_ids, swa_page_ids).full
        out = []
        for off in range(0, len(tokens), chunk):
            part = tokens[off : off + chunk]
            args = self._chunk_args(part, start_pos + off, len(part), full, chunk)
            logits, pools = self._run(pools, *args, load)
            load = None  # only the first chunk carries the load
            out.append((logits, len(part)))
        if not out:
            return np.zeros((0, self.config.vocab), np.float32), pools, None
        return np.concatenate([np.asarray(x)[0, :n] for x, n in out]), pools, None

    def decode_step(
        self,
        pools,
        token,
        pos,
        full_page_ids,
        swa_page_ids,
        scratch=None,
        *,
        state_in=None,
        state_out=None,
    ):
        """One token at position ``pos``.  Returns ``(logits [vocab] (numpy), pools, scratch)``."""
        del state_in, state_out  # the protocol's state slots: no STATE space here
        full = page_tables(full_page_ids, swa_page_ids).full
        tok = np.asarray(token, np.int32).reshape(1)
        logits, pools = self._run(pools, *self._chunk_args(tok, pos, 1, full, 1))
        return np.asarray(logits)[0, 0], pools, scratch

    def trace_first_chunk(
        self, pools, tokens, start_pos, full_page_ids, swa_page_ids, chunk_size=None, load=None
    ) -> jax.stages.Traced:
        """The traced program of ``prefill``'s first chunk (nothing runs, nothing donated)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        chunk = chunk_size or self.config.page_size
        full = page_tables(full_page_ids, swa_page_ids).full
        part = tokens[:chunk]
        args = self._chunk_args(part, start_pos, len(part), full, chunk)
        fn, args = self._program(pools, *args, load)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            return fn.trace(*args)

    # ------------------------------------------------- global-id addressing
    def global_layer_rows(self, pools: DevicePools, kind: PoolKind) -> list:
        """Per global layer: its ``[pages, *row]`` host array of ``kind`` (``None`` if none)."""
        return global_layer_rows(self.spec.num_layers, self.layer_maps, pools, kind)

    def pools_from_global(self, rows_by_kind: dict, num_pages: int, num_swa_pages: int = 0):
        """Device pools of this model's PP layout from per-global-layer rows."""
        empty = self.init_pools(num_pages, num_swa_pages)
        return pools_from_global(empty, self.layer_maps, rows_by_kind)
