"""Paged, pipeline-parallel execution of the tiny DSV4 model through the library's device pools.

:class:`PagedModel` splits the layers over the ``'pp'`` axis of a ``('pp', 'tp')``
mesh with the library's layer maps, keeps per-stage weight stacks sharded
``P('pp')`` (see :mod:`models.stage`), and runs a chunk of one request inside
``jax.shard_map``: a loop of ``pp`` steps where step ``s`` runs stage ``s``
(``lax.cond`` on ``axis_index('pp')``) and ``lax.ppermute`` hands the
activations to the next stage; the last stage's output comes back to stage 0
and the logits are replicated with a masked ``psum``.  Each stage reads and
writes only its own slice of the :class:`~jaxhicache.pools.device.DevicePools`
arrays ``[pp, max_layers_of_kind, pages, *row]``.

A load-back can ride on the first chunk of a prefill: ``prefill(..., load=...)``
takes a :class:`~jaxhicache.transfer.LayerwiseLoad` (from
``TransferEngine.prepare_layerwise``) and the first chunk's program applies it
layer by layer inside each stage's scan (a separate compiled variant), so
layer ``l`` computes as soon as its own rows landed.  The result is bit-identical
to ``engine.load`` followed by ``prefill``.

The HCA partial-window state is request-scoped: a :class:`RequestScratch`
(``[pp, max_hca, r, 2D]``, sharded like the pools) that a request carries from
its prefill into its decode steps.  It is never cached: restores happen at page
boundaries, where it is empty.

:meth:`PagedModel.forward` runs B requests' chunks in one program (a batched
decode step is ``T = 1``): each row has its own tokens, start, valid count and
page tables, and its HCA scratch lives in a row of an engine-owned
:class:`ScratchSlab`.  ``prefill`` and ``decode_step`` are the same program with
B = 1 (a ``RequestScratch`` is a one-slot slab): one copy of the layer math.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import put_global
from jaxhicache.mesh import PP, pool_sharding
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.program_cache import cached_jit
from jaxhicache.spec import ModelCacheSpec, PoolKind
from jaxhicache.transfer import LayerwiseLoad
from models import layers as L
from models.chunk import PageTables
from models.config import TinyDSV4Config
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
from models.stage import (
    MATMUL_PRECISION,
    compiler_options,
    new_scratch,
    reset_slots,
    stack_stage_params,
    stage_forward,
)
from models.streaming import (
    BatchArgs,
    cache_spec,
    check_batch,
    check_hca_scratch,
    check_page_tables,
)

_HEAD = ("embed", "final_norm", "lm_head")


@dataclasses.dataclass
class RequestScratch:
    """Request-scoped HCA partial-window rows ``[pp, max_hca, r, 2D]`` (NaN = never written).

    ``start``: the first position this request computed itself (its restore point).
    """

    rows: jax.Array
    start: int


@dataclasses.dataclass
class ScratchSlab:
    """The engine's HCA scratch for many requests: rows ``[pp, max_hca, slots, r, 2D]``
    (NaN = never written), sharded on ``'pp'``, and ``starts`` int64 ``[slots]``, each
    slot's restore point (``-1``: never started; :meth:`PagedModel.forward` with
    ``fresh`` starts it)."""

    rows: jax.Array
    starts: np.ndarray

    @property
    def num_slots(self) -> int:
        return int(self.starts.shape[0])


def check_spec(cfg: TinyDSV4Config, spec: ModelCacheSpec) -> None:
    """``ValueError`` unless ``spec`` describes the cache of ``cfg`` (FLOAT rows)."""
    want = cache_spec(cfg, name=spec.name)
    for f in ("num_layers", "compress_ratios", "page_size", "window", "head_dim", "rope_dim"):
        if getattr(spec, f) != getattr(want, f):
            raise ValueError(
                f"spec.{f}={getattr(spec, f)!r} but the model needs {getattr(want, f)!r}"
            )
    if spec.indexer_head_dim != want.indexer_head_dim or spec.c4_ring != want.c4_ring:
        raise ValueError(
            f"spec indexer_head_dim/c4_ring = {spec.indexer_head_dim}/{spec.c4_ring}, model needs "
            f"{want.indexer_head_dim}/{want.c4_ring}"
        )
    for kind in spec.kinds():
        if spec.row_dtype(kind) != np.float32:
            raise ValueError(
                f"the tiny model stores float32 rows; {kind.value} is {spec.row_dtype(kind)}"
            )


class PagedModel:
    """The tiny DSV4 model over stage-sharded paged pools.

    Args:
      config: the model config.
      params: plain parameters (:func:`models.dsv4.init_params`), layers by global id.
      spec: the cache spec (default :func:`models.streaming.cache_spec` of ``config``).
      mesh: a ``('pp', 'tp')`` mesh (default ``make_mesh(pp)``).
      pp: pipeline stages when no mesh is given (default 1).
      partition: explicit layers per stage (default: the reference split rule).
      fast_compile: compile with :data:`models.stage.FAST_COMPILE_OPTIONS` (default: on CPU).
    """

    def __init__(
        self,
        config: TinyDSV4Config,
        params: dict,
        *,
        spec: ModelCacheSpec | None = None,
        mesh: Mesh | None = None,
        pp: int | None = None,
        partition=None,
        fast_compile: bool | None = None,
    ):
        self.config = config
        self.spec = spec if spec is not None else cache_spec(config)
        check_spec(config, self.spec)
        at = place(
            self.spec, mesh, pp, partition, partial(stack_stage_params, config, params), _HEAD
        )
        self.mesh, self.pp = at.mesh, at.mesh.shape[PP]
        self.layer_maps, self.stacked = at.layer_maps, at.stacked
        self._head, self._stages, self._replicated = at.head, at.stages, at.replicated
        self._compiler_options = compiler_options(fast_compile)
        self._fns: dict[tuple, object] = {}
        self.traces = 0  # how many times a forward program was traced (one per compilation)

    # ------------------------------------------------------------------ state
    @property
    def max_hca_per_stage(self) -> int:
        if PoolKind.C128_KV not in self.spec.kinds():
            return 1
        return self.stacked.max_layers_of(PoolKind.C128_KV)

    def init_pools(
        self, num_pages: int, num_swa_pages: int, num_state_slots: int = 0
    ) -> DevicePools:
        """Zeroed device pools for ``num_pages`` full pages and ``num_swa_pages`` SWA pages
        (``num_state_slots``: the protocol's; the DSV4 spec has no state space, ignored)."""
        del num_state_slots
        return allocate_device_pools(self.spec, self.mesh, self.stacked, num_pages, num_swa_pages)

    def new_scratch(self, start_pos: int = 0) -> RequestScratch:
        """A fresh request scratch for a request (re)starting at ``start_pos``."""
        rows = new_scratch(self.config, self.pp, self.max_hca_per_stage)
        return RequestScratch(put_global(rows, NamedSharding(self.mesh, P(PP))), start_pos)

    def new_scratch_slab(self, slots: int) -> ScratchSlab:
        """An engine-owned HCA scratch for ``slots`` requests in flight (all NaN, none started)."""
        if type(slots) is not int or slots < 1:
            raise ValueError(f"slots must be a positive int, got {slots!r}")
        rows = new_scratch(self.config, self.pp, self.max_hca_per_stage, slots)
        starts = np.full((slots,), -1, np.int64)
        return ScratchSlab(put_global(rows, NamedSharding(self.mesh, P(PP))), starts)

    # -------------------------------------------------------------- forward
    def _fn(self, t: int, load: LayerwiseLoad | None = None):
        """The chunk program for chunk length ``t`` (with a fused load: one variant per
        load structure).  Batch size, table width and slab size are shapes of its
        arguments: jit compiles once per (B, T, W, slab) and reuses it after."""
        key = (t, None if load is None else jax.tree.structure(load))
        if key in self._fns:
            return self._fns[key]
        cfg, spec, stacked, pp = self.config, self.spec, self.stacked, self.pp
        kinds = spec.kinds()

        def body(head, stages, pools, scratch, tokens, start, n_valid, tables, slots, fresh, *ld):
            self.traces += 1  # at trace time only: counts compilations (tests)
            view = stacked.stage(PP)
            sp = dict(jax.tree.map(lambda a: a[0], stages))
            pools = {k: a[0] for k, a in pools.items()}
            one = scratch.ndim == 4  # a RequestScratch [1, max_hca, r, 2D]: a one-slot slab
            slab = scratch[0][:, None] if one else scratch[0]
            live = n_valid > 0  # padding rows write nothing, not even a reset
            slab = reset_slots(slab, slots, fresh & live)
            end = start + n_valid
            lw = ld[0].stage_local() if ld else None

            def run(h, pools, slab):
                return stage_forward(
                    cfg, sp, view, kinds, pools, slab, h, start, end, tables, slots, load=lw
                )

            h, pools, slab = pipeline(pp, run, L.embed(head, tokens), pools, slab)
            logits = L.lm_head(head, h, cfg)  # the last stage's output is on stage 0 now
            logits = stage0_logits(logits)
            slab = slab[:, 0] if one else slab
            return logits, {k: a[None] for k, a in pools.items()}, slab[None]

        in_specs = (P(), P(PP), P(PP), P(PP), *([P()] * 6))
        if load is not None:
            in_specs += (load.specs(),)
        fn = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=(P(), P(PP), P(PP)),
            check_vma=False,
        )
        staged = NamedSharding(self.mesh, P(PP))
        out_shardings = (
            NamedSharding(self.mesh, P()),
            {k: pool_sharding(spec, self.mesh, k) for k in kinds},
            staged,
        )
        jitted = cached_jit(  # a restart loads it (jaxhicache.program_cache)
            fn,
            key=program_key(self, t, load),
            donate_argnums=(2, 3),
            out_shardings=out_shardings,
            compiler_options=self._compiler_options,
        )
        self._fns[key] = jitted
        return jitted

    def _check_load(self, pools: DevicePools, load: LayerwiseLoad) -> None:
        check_load(self.mesh, pools, load)

    def _program(self, pools, scratch_rows, b: BatchArgs, load=None):
        """``(program, args)`` of one checked batch."""
        rep = self._replicated  # every process passes the same host inputs
        args = (
            self._head,
            self._stages,
            dict(pools.arrays),
            scratch_rows,
            *(put_global(a, rep) for a in (b.tokens, b.starts, b.n_valid)),
            PageTables(put_global(b.full, rep), put_global(b.swa, rep)),
            put_global(b.slots, rep),
            put_global(b.fresh, rep),
        )
        if load is not None:
            self._check_load(pools, load)
            args += (load,)
        return self._fn(b.tokens.shape[1], load), args

    def _chunk(self, pools, scratch, tokens, start, n, tables, t, load=None):
        """``(program, args)`` of one request's chunk (a batch of one), checked on the host."""
        check_page_tables(self.config, start, start + n, tables.full, tables.swa)
        check_hca_scratch(self.config, start, scratch.start)
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        one = np.zeros((1,), np.int32)
        b = BatchArgs(
            padded, one + start, one + n, tables.full[None], tables.swa[None], one, one.astype(bool)
        )
        return self._program(pools, scratch.rows, b, load)

    def _run_chunk(self, pools, scratch, tokens, start, n, tables, t, load=None):
        fn, args = self._chunk(pools, scratch, tokens, start, n, tables, t, load)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            logits, arrays, rows = fn(*args)
        # The logits are replicated: this process's first copy of the padded chunk, still
        # in flight (sliced on the host later: an eager slice would compile per length).
        logits = logits.addressable_data(0)  # [1, T, vocab]
        return logits, pools.replace(arrays=arrays), RequestScratch(rows, scratch.start)

    def forward(
        self,
        pools: DevicePools,
        slab: ScratchSlab,
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
        """One batched forward of ``B`` requests' chunks (decode: ``T = 1``).

        Args (host arrays; ``B`` rows):
          tokens: int32 ``[B, T]``; row ``b`` holds the tokens at positions
            ``[starts[b], starts[b] + n_valid[b])`` in its first ``n_valid[b]`` columns.
          starts: int32 ``[B]``.  n_valid: int32 ``[B]`` in ``[0, T]``; ``0`` marks a
            padding row: it reads nothing that matters and writes nothing (pools, slab).
          full_page_ids / swa_page_ids: int32 ``[B, W]`` page tables, ``-1`` padded
            (the rules of :meth:`prefill` per row, checked for every valid row).
          slots: int32 ``[B]``, each row's row of ``slab``.  fresh: bool ``[B]``
            (default all ``False``): the request begins at ``starts[b]``; its slot is
            reset (NaN rows, slot start = ``starts[b]``) before the layers run.
          load: an optional layer-wise load-back fused into this forward (as in
            :meth:`prefill`); it needs at least one valid row.

        Valid rows may share pages they read (a common prefix) but never write a
        page another valid row reads or writes, nor share a slot (``ValueError``).
        The pools and the slab are donated.  ``B``, ``T`` and ``W`` are the caller's
        buckets: the program compiles once per (B, T, W, slab size, load structure)
        and is reused for every later call with the same shapes.

        Returns ``(logits [B, T, vocab]`` (host numpy; rows of padding are
        garbage), ``pools, slab)``.
        """
        del state_in, state_out  # the protocol's state slots: no STATE space here
        b, new_starts = check_batch(
            self.config,
            tokens,
            starts,
            n_valid,
            full_page_ids,
            swa_page_ids,
            slots,
            fresh,
            slab.starts,
        )
        if load is not None and not b.n_valid.any():
            raise ValueError("a fused load needs at least one valid row to compute")
        fn, args = self._program(pools, slab.rows, b, load)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            logits, arrays, rows = fn(*args)
        logits = np.asarray(logits.addressable_data(0))
        return logits, pools.replace(arrays=arrays), ScratchSlab(rows, new_starts)

    def trace_first_chunk(
        self,
        pools: DevicePools,
        tokens,
        start_pos: int,
        full_page_ids,
        swa_page_ids,
        chunk_size: int | None = None,
        load: LayerwiseLoad | None = None,
    ) -> jax.stages.Traced:
        """The traced program of ``prefill``'s first chunk (nothing runs, nothing is
        donated): inspect its ``.jaxpr`` or ``.lower(lowering_platforms=(...))``."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        chunk = chunk_size or self.config.page_size
        tables = page_tables(full_page_ids, swa_page_ids)
        part = tokens[:chunk]
        fn, args = self._chunk(
            pools, self.new_scratch(start_pos), part, start_pos, len(part), tables, chunk, load
        )
        with jax.default_matmul_precision(MATMUL_PRECISION):
            return fn.trace(*args)

    def prefill(
        self,
        pools: DevicePools,
        tokens,
        start_pos: int,
        full_page_ids,
        swa_page_ids,
        chunk_size: int | None = None,
        scratch: RequestScratch | None = None,
        load: LayerwiseLoad | None = None,
        *,
        state_in=None,
        state_out=None,
        snapshots=None,
    ):
        """Run ``tokens`` at positions ``[start_pos, start_pos + len(tokens))`` in chunks.

        ``full_page_ids`` / ``swa_page_ids``: int32 ``[n_pages]`` page table of the
        request (``-1``: absent / tombstone; pad tables to a bucket with ``-1``).
        Pages ``< start_pos`` must already hold the prefix (a restore fills them),
        or arrive with ``load``: a layer-wise load-back
        (``TransferEngine.prepare_layerwise``) that the first chunk applies layer by
        layer, right before each layer runs (bit-identical to ``engine.load`` then
        ``prefill``; it may carry other requests' pages too).
        ``chunk_size`` (default: the page size) is the compiled chunk length;
        the last chunk is padded.  ``scratch``: the request's HCA scratch (a
        fresh one starting at ``start_pos`` by default).  The pools and scratch
        are donated.  Returns ``(logits [T, vocab] (numpy, on the host), pools, scratch)``.
        """
        del state_in, state_out, snapshots  # the protocol's state slots: no STATE space here
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        chunk = chunk_size or self.config.page_size
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk}")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if load is not None and not len(tokens):
            raise ValueError("a fused load needs at least one token to compute")
        tables = page_tables(full_page_ids, swa_page_ids)
        if scratch is None:
            scratch = self.new_scratch(start_pos)
        out = []
        for off in range(0, len(tokens), chunk):
            part = tokens[off : off + chunk]
            logits, pools, scratch = self._run_chunk(
                pools, scratch, part, start_pos + off, len(part), tables, chunk, load
            )
            load = None  # only the first chunk carries the load
            out.append((logits, len(part)))
        if not out:
            return np.zeros((0, self.config.vocab), np.float32), pools, scratch
        # One host copy per chunk, padding dropped on the host (no program per length).
        return np.concatenate([np.asarray(x)[0, :n] for x, n in out]), pools, scratch

    def decode_step(
        self,
        pools,
        token,
        pos,
        full_page_ids,
        swa_page_ids,
        scratch,
        *,
        state_in=None,
        state_out=None,
    ):
        """One token at position ``pos``.  Returns ``(logits [vocab] (numpy), pools, scratch)``."""
        del state_in, state_out  # the protocol's state slots: no STATE space here
        tables = page_tables(full_page_ids, swa_page_ids)
        tok = np.asarray(token, np.int32).reshape(1)
        logits, pools, scratch = self._run_chunk(pools, scratch, tok, pos, 1, tables, 1)
        return np.asarray(logits)[0, 0], pools, scratch

    # ------------------------------------------------- global-id addressing
    def global_layer_rows(self, pools: DevicePools, kind: PoolKind) -> list:
        """Per global layer: its ``[pages, *row]`` host array of sub-pool ``kind`` (``None`` if none).

        The list is indexed by global id; stage ``r``'s sub-pool row ``k`` is
        global layer ``subpool_to_global(kind)[k]`` (= ``start_layer + local``).
        """
        return global_layer_rows(self.spec.num_layers, self.layer_maps, pools, kind)

    def pools_from_global(self, rows_by_kind: dict, num_pages: int, num_swa_pages: int):
        """Device pools of this model's PP layout from per-global-layer rows.

        ``rows_by_kind[kind][g]`` is layer ``g``'s ``[pages, *row]`` array (as from
        :meth:`global_layer_rows` of any PP layout).  Each stage's local layer
        ``l`` reads the global list at ``start_layer + l``.
        """
        empty = self.init_pools(num_pages, num_swa_pages)
        return pools_from_global(empty, self.layer_maps, rows_by_kind)
