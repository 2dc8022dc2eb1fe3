"""Paged, pipeline-parallel execution of the tiny hybrid model over the library's pools.

:class:`PagedHybridModel` has the interface of the other paged models
(:class:`models.protocol.ServableModel`), plus the recurrent-state contract below.
Layers are split over ``'pp'`` with the library's layer maps and run by
:func:`models.pipeline.pipeline` inside ``jax.shard_map``; one stage's layers are
:func:`models.hybrid_stage.hybrid_stage_forward` (index spaces there).

Cache state:

* attention layers: K/V in ``FULL_KV`` pages (token ``s`` at page ``full[s // page]``,
  slot ``s % page``), as any page cache;
* linear layers: the conv and recurrent state in ``CONV_STATE`` / ``RECURRENT_STATE``
  **snapshot slots** (``PageSpace.STATE``, ``init_pools(..., num_state_slots=)``).

The state contract: forward row ``b`` reads its state at ``starts[b]`` from slot
``state_in[b]`` (``-1``: the zero state, only when ``starts[b] == 0``) and writes the
state after its ``n_valid[b]`` tokens to slot ``state_out[b]``.  ``state_out`` may be
``state_in`` (the caller owns the slot: advanced in place) or another slot
(copy-on-write: a cached snapshot read as ``state_in`` is never modified).  Valid rows
of one batch never write a slot another valid row reads or writes (``ValueError``
naming the slot); padding rows (``n_valid == 0``) read and write nothing.
:meth:`PagedHybridModel.prefill` ping-pongs through ``snapshots`` (chunk end ->
slot) with no copies.  SWA page tables are accepted and ignored (no SWA space).
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import put_global
from jaxhicache.mesh import PP, TP, pool_partition_spec, pool_sharding
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.program_cache import cached_jit
from jaxhicache.spec import ModelCacheSpec, PoolKind
from jaxhicache.transfer import LayerwiseLoad
from models import layers as L
from models.hybrid_config import TinyHybridConfig
from models.hybrid_stage import HEAD, hybrid_stage_forward, stack_hybrid_params
from models.hybrid_streaming import chunk_plan
from models.mla_paged import SlotSlab, check_mla_batch
from models.pipeline import (
    check_load,
    global_layer_rows,
    page_tables,
    pipeline,
    place,
    pools_from_global,
    program_key,
    stage0_logits,
)
from models.stage import MATMUL_PRECISION, compiler_options

__all__ = ["PagedHybridModel", "SlotSlab", "check_snapshots", "check_state_slots"]


# ------------------------------------------------------------- host checks
def _slots(name, x, b):
    a = np.asarray(x)
    if a.shape != (b,) or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be an int array of shape ({b},), got {a.shape} {a.dtype}")
    return a.astype(np.int32)


def check_state_slots(starts, n_valid, state_in, state_out, num_slots: int):
    """Host checks of the state slots of a batch; returns ``(state_in, state_out)`` int32.

    Per valid row: ``state_in`` in ``[-1, num_slots)`` (``-1`` only at ``start == 0``),
    ``state_out`` in ``[0, num_slots)``.  Across valid rows: a slot one row writes is
    neither read nor written by another.  Padding rows are not checked.
    """
    starts, n_valid = np.asarray(starts), np.asarray(n_valid)
    b = starts.shape[0]
    if state_in is None or state_out is None:
        raise ValueError("the hybrid model needs state_in and state_out (snapshot slots)")
    s_in, s_out = _slots("state_in", state_in, b), _slots("state_out", state_out, b)
    writer: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for i in np.flatnonzero(n_valid > 0).tolist():
        si, so = int(s_in[i]), int(s_out[i])
        if not -1 <= si < num_slots:
            raise ValueError(f"row {i}: state_in={si} is outside [-1, {num_slots})")
        if si == -1 and starts[i] != 0:
            raise ValueError(
                f"row {i}: state_in=-1 (the zero state) but the row starts at {int(starts[i])}"
            )
        if not 0 <= so < num_slots:
            raise ValueError(f"row {i}: state_out={so} is outside [0, {num_slots})")
        if so in writer:
            raise ValueError(f"rows {writer[so]} and {i} both write state slot {so}")
        writer[so] = i
        if si >= 0:
            readers.setdefault(si, []).append(i)
    for slot, i in writer.items():
        for j in readers.get(slot, []):
            if j != i:
                raise ValueError(f"row {j} reads state slot {slot} that row {i} writes")
    return s_in, s_out


def check_snapshots(snapshots, plan, chunk: int, state_in: int, state_out: int) -> dict:
    """``snapshots`` (position -> slot) checked against a prefill's chunk ``plan``.

    Each position must be a multiple of ``chunk`` and a chunk end of the plan; slots
    distinct, never ``state_in``; the final position only with ``state_out`` (the last
    chunk writes there).  Returns a ``{int: int}`` copy.
    """
    snaps = {int(p): int(s) for p, s in (snapshots or {}).items()}
    ends = [e for _, e in plan]
    final = ends[-1] if ends else None
    for p, s in snaps.items():
        if p % chunk or p not in ends:
            raise ValueError(
                f"snapshot position {p} is not a chunk end on the chunk_size={chunk} grid "
                f"(chunk ends: {ends})"
            )
        if s < 0:
            raise ValueError(f"snapshot slot {s} at {p} must be >= 0")
        if s == state_in:
            raise ValueError(f"snapshot slot {s} at {p} is state_in (copy-on-write: never written)")
        if p == final and s != state_out:
            raise ValueError(
                f"snapshot at the final position {p} goes to slot {s}, but the last chunk "
                f"writes state_out={state_out}: pass state_out={s} instead"
            )
        if p != final and s == state_out:
            raise ValueError(f"snapshot slot {s} at {p} is state_out (overwritten later)")
    mid = [s for p, s in snaps.items() if p != final]
    if len(set(mid)) != len(mid):
        raise ValueError(f"snapshot slots repeat: {snaps}")
    return snaps


# ------------------------------------------------------------------- the model
class PagedHybridModel:
    """The tiny hybrid model over stage-sharded pools (K/V pages, state snapshot slots).

    Args:
      config: the model config.
      params: plain parameters (:func:`models.hybrid.init_params`), layers by global id.
      spec: the cache spec (default ``config.cache_spec()``).
      mesh: a ``('pp', 'tp')`` mesh (default ``make_mesh(pp)``).  With ``tp > 1`` the
        pools are split along :attr:`PoolKind.tp_axis`; the computation is replicated.
      pp: pipeline stages when no mesh is given (default 1).
      partition: explicit layers per stage (default: the reference split rule).
      fast_compile: compile with :data:`models.stage.FAST_COMPILE_OPTIONS` (default: on CPU).
    """

    def __init__(
        self,
        config: TinyHybridConfig,
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
        tp = (mesh.shape[TP] if mesh is not None else 1) or 1
        for name in ("k_heads", "v_heads", "num_kv_heads"):  # before any weight is placed
            if getattr(config, name) % tp:
                raise ValueError(
                    f"tp={tp} does not divide {name}={getattr(config, name)} "
                    "(the state and K/V pools are split over 'tp')"
                )
        at = place(
            self.spec, mesh, pp, partition, partial(stack_hybrid_params, config, params), HEAD
        )
        self.mesh, self.pp, self.tp = at.mesh, at.mesh.shape[PP], tp
        self.layer_maps, self.stacked = at.layer_maps, at.stacked
        self._head, self._stages, self._replicated = at.head, at.stages, at.replicated
        self._compiler_options = compiler_options(fast_compile)
        self._fns: dict[tuple, object] = {}
        self.traces = 0  # forward programs traced (one per compilation)

    # ------------------------------------------------------------------ state
    def init_pools(
        self, num_pages: int, num_swa_pages: int = 0, num_state_slots: int = 0
    ) -> DevicePools:
        """Zeroed pools: ``num_pages`` K/V pages and ``num_state_slots`` (>= 1) snapshot slots."""
        return allocate_device_pools(
            self.spec, self.mesh, self.stacked, num_pages, num_swa_pages, num_state_slots
        )

    def new_scratch(self, start_pos: int = 0) -> None:
        """No request-scoped state outside the pools: ``None``."""
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
        cfg, pp, tp = self.config, self.pp, self.tp
        stacked, kinds = self.stacked, self.spec.kinds()

        def body(head, stages, pools, tokens, start, n_valid, full, s_in, s_out, *ld):
            self.traces += 1  # at trace time only
            view = stacked.stage(PP)
            sp = jax.tree.map(lambda a: a[0], stages)["layers"]
            pools = {k: a[0] for k, a in pools.items()}
            lw = ld[0].stage_local() if ld else None

            def run(h, pools):
                return hybrid_stage_forward(
                    cfg, tp, sp, view, pools, h, start, n_valid, full, s_in, s_out, load=lw
                )

            h, pools = pipeline(pp, run, L.embed(head, tokens), pools)
            logits = stage0_logits(L.lm_head(head, h, cfg))
            return logits, {k: a[None] for k, a in pools.items()}

        pool_specs = {k: pool_partition_spec(self.spec, k, tp) for k in kinds}
        in_specs = (P(), P(PP), pool_specs, *([P()] * 6))
        if load is not None:
            in_specs += (load.specs(),)
        fn = jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=(P(), pool_specs), check_vma=False
        )
        out_shardings = (
            self._replicated,
            {k: pool_sharding(self.spec, self.mesh, k) for k in kinds},
        )
        jitted = cached_jit(  # a restart loads it (jaxhicache.program_cache)
            fn,
            key=program_key(self, t, load, tp=tp),
            donate_argnums=(2,),
            out_shardings=out_shardings,
            compiler_options=self._compiler_options,
        )
        self._fns[key] = jitted
        return jitted

    def _run(self, pools, tokens, starts, n_valid, full, s_in, s_out, load=None):
        rep = self._replicated
        args = (
            self._head,
            {"layers": self._stages["layers"]},
            dict(pools.arrays),
            *(put_global(a, rep) for a in (tokens, starts, n_valid, full, s_in, s_out)),
        )
        if load is not None:
            check_load(self.mesh, pools, load)
            args += (load,)
        fn = self._fn(tokens.shape[1], load)
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
        :meth:`models.paged.PagedModel.forward`, plus ``state_in`` / ``state_out`` int32
        ``[B]`` (the state contract of the module docstring).  ``swa_page_ids`` is
        ignored; the pools are donated.  Returns ``(logits [B, T, vocab] (host numpy),
        pools, slab)``."""
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
        s_in, s_out = check_state_slots(starts, n_valid, state_in, state_out, pools.num_state_slots)
        if load is not None and not n_valid.any():
            raise ValueError("a fused load needs at least one valid row to compute")
        logits, pools = self._run(pools, tokens, starts, n_valid, full, s_in, s_out, load)
        return np.asarray(logits), pools, SlotSlab(new_starts)

    def _chunk(self, pools, tokens, start, full, t, s_in, s_out, load=None):
        """One request's chunk ``[start, start + len(tokens))`` padded to ``t`` (B = 1)."""
        n = len(tokens)
        one = np.ones((1,), np.int32)
        check_mla_batch(
            self.config.page_size,
            np.zeros((1, t), np.int32),
            one * start,
            one * n,
            full[None],
            full[None],
            [0],
            [True],
            [-1],
        )
        s_in, s_out = check_state_slots(
            one * start, one * n, [s_in], [s_out], pools.num_state_slots
        )
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        return self._run(pools, padded, one * start, one * n, full[None], s_in, s_out, load)

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
        state_in: int | None = None,
        state_out: int | None = None,
        snapshots: dict[int, int] | None = None,
    ):
        """Runs ``tokens`` at positions ``[start_pos, start_pos + len(tokens))`` in chunks on
        the ``chunk_size`` grid (default: the page size; every chunk padded to it, the
        first one shorter when ``start_pos`` is off the grid).

        The first chunk reads ``state_in``; the chunk ending at ``p`` writes its state to
        ``snapshots[p]`` (a multiple of ``chunk_size``, validated) and the next chunk reads
        it there; any other chunk writes ``state_out``, the last one always.  K/V pages
        ``< start_pos`` must hold the prefix or arrive with ``load`` (applied by the first
        chunk).  ``swa_page_ids`` and ``scratch`` are ignored.  Returns
        ``(logits [len(tokens), vocab] (host numpy), pools, None)``."""
        del scratch
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        chunk = chunk_size or self.config.page_size
        if chunk < 1 or start_pos < 0:
            raise ValueError(f"need chunk_size >= 1 and start_pos >= 0, got {chunk}, {start_pos}")
        if state_in is None or state_out is None:
            raise ValueError("the hybrid model needs state_in and state_out (snapshot slots)")
        if load is not None and not len(tokens):
            raise ValueError("a fused load needs at least one token to compute")
        full = page_tables(full_page_ids, swa_page_ids).full
        plan = chunk_plan(start_pos, start_pos + len(tokens), chunk)
        snaps = check_snapshots(snapshots, plan, chunk, int(state_in), int(state_out))
        out, cur = [], int(state_in)
        for s, e in plan:
            dst = snaps.get(e, int(state_out))
            part = tokens[s - start_pos : e - start_pos]
            logits, pools = self._chunk(pools, part, s, full, chunk, cur, dst, load)
            load = None  # only the first chunk carries the load
            out.append((logits, len(part)))
            cur = dst
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
        state_in: int | None = None,
        state_out: int | None = None,
    ):
        """One token at ``pos`` from slot ``state_in`` to ``state_out``.  Returns
        ``(logits [vocab] (numpy), pools, scratch)``."""
        if state_in is None or state_out is None:
            raise ValueError("the hybrid model needs state_in and state_out (snapshot slots)")
        full = page_tables(full_page_ids, swa_page_ids).full
        tok = np.asarray(token, np.int32).reshape(1)
        logits, pools = self._chunk(pools, tok, pos, full, 1, state_in, state_out)
        return np.asarray(logits)[0, 0], pools, scratch

    # ------------------------------------------------- global-id addressing
    def global_layer_rows(self, pools: DevicePools, kind: PoolKind) -> list:
        """Per global layer: its ``[pages or slots, *row]`` host array of ``kind`` (``None``
        where the layer has none)."""
        return global_layer_rows(self.spec.num_layers, self.layer_maps, pools, kind)

    def pools_from_global(
        self, rows_by_kind: dict, num_pages: int, num_swa_pages: int = 0, num_state_slots: int = 1
    ):
        """Device pools of this model's PP layout from per-global-layer rows."""
        empty = self.init_pools(num_pages, num_swa_pages, num_state_slots)
        return pools_from_global(empty, self.layer_maps, rows_by_kind)
