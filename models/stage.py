"""The layers of one pipeline stage over a batch of chunks (B requests, one chunk
each): a scan over the stage's local layers with ``lax.switch`` on the traced
attention kind of each layer; inside, ``jax.vmap`` of the per-row layer over the
B rows against the unbatched pools, then one scatter per sub-pool.

Weights and pools are addressed with the library's stage layer maps
(:mod:`jaxhicache.layer_map`), in the same three index spaces as the cache:

* common layer weights (attention + MLP): stacked by **stage-local id**
  (``local_to_global``), ``[pp, max_local, ...]``;
* C4 compressor + indexer weights: stacked by **C4 sub-pool id**
  (``subpool_to_global(C4_KV)``), ``[pp, max_c4, ...]``;
* HCA compressor weights: stacked by **C128 sub-pool id**, ``[pp, max_hca, ...]``;
* pools ``[pp, max_layers_of_kind, pages, *row]``: the row of local layer ``l``
  in sub-pool ``K`` is ``local_to_subpool(K)[l]``;
* the HCA scratch slab ``[pp, max_hca, slots, r, 2D]``: C128 sub-pool id, then the
  request's slot (one request alone: ``[pp, max_hca, r, 2D]``, one slot).

Any list that spans the whole model (``params["layers"]``, a global list of
per-layer pools) is indexed by the global id ``start_layer + local`` only.

With a :class:`~jaxhicache.transfer.LayerwiseLoad` (a load-back fused into the
chunk), iteration ``l`` of the scan first writes layer ``l``'s loaded rows into
its sub-pool rows and issues the host->device copy of layer ``l + 1`` (carried to
the next iteration), then computes layer ``l``: the forward of layer ``l``
depends only on the load of layer ``l``, and the next layer's copy can run
under this layer's compute.
Stages padded to the largest stage carry zero weights and never-addressed
pool rows; a padded layer takes the identity branch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxhicache.layer_map import StageLayerMap, StageView
from jaxhicache.spec import AttentionKind, PoolKind, pool_kinds_of
from jaxhicache.transfer import LayerwiseLoad, apply_layer, fetch_layer
from models.chunk import SCRATCH, PageTables, View, layer_forward, scatter
from models.config import TinyDSV4Config
from models.pipeline import stack_rows

_COMPRESSED = ("comp", "idx")

MATMUL_PRECISION = "highest"
"""fp32 everywhere: no TF32/bf16 passes on GPUs (entry points trace under this precision)."""

FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}
"""XLA:CPU options that cut compile time ~3x for these small programs (tests, CPU CI)."""


def compiler_options(fast: bool | None = None) -> dict | None:
    """``FAST_COMPILE_OPTIONS`` when ``fast`` (default: when the default backend is CPU).

    Options this XLA build does not know are dropped (probed once).
    """
    if fast is None:
        fast = jax.default_backend() == "cpu"
    return _supported_fast_options() if fast else None


@functools.cache
def _supported_fast_options() -> dict:
    ok = {}
    for key, value in FAST_COMPILE_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(1.0).compile()
        except Exception:  # an XLA build without this flag: compile normally
            continue
        ok[key] = value
    return ok


def stack_stage_params(cfg: TinyDSV4Config, params: dict, maps: Sequence[StageLayerMap]) -> dict:
    """Per-stage weight stacks with a leading ``pp`` axis (see the module docstring), as numpy.

    Returns ``{"embed", "final_norm", "lm_head"}`` (replicated) plus
    ``"layers"`` / ``"c4"`` / ``"hca"`` stacks ``[pp, max_rows, ...]``
    (``"c4"``/``"hca"`` are ``None`` when the model has no such layer).
    """
    params = jax.device_get(params)
    layers = params["layers"]
    if len(layers) != cfg.num_layers:
        raise ValueError(f"params have {len(layers)} layers, config has {cfg.num_layers}")
    max_local = max(m.num_local_layers for m in maps)
    spec = maps[0].spec
    kinds = spec.kinds()
    out = {k: params[k] for k in ("embed", "final_norm", "lm_head")}
    common, c4, hca = [], [], []
    for m in maps:
        rows = [
            {k: v for k, v in layers[m.global_id(local)].items() if k not in _COMPRESSED}
            for local in range(m.num_local_layers)
        ]
        common.append(stack_rows(rows, max_local))
        if PoolKind.C4_KV in kinds:
            ids = m.subpool_to_global(PoolKind.C4_KV)
            rows = [{"comp": layers[g]["comp"], "idx": layers[g]["idx"]} for g in ids]
            c4.append(rows)
        if PoolKind.C128_KV in kinds:
            hca.append([{"comp": layers[g]["comp"]} for g in m.subpool_to_global(PoolKind.C128_KV)])
    out["layers"] = stack_rows(common, len(maps))

    def stack_kind(per_stage, template):
        n = max(1, max(len(r) for r in per_stage))
        zero = jax.tree.map(np.zeros_like, template)
        return stack_rows([stack_rows(r or [zero], n) for r in per_stage], len(per_stage))

    g4, gh = cfg.c4_layers, cfg.hca_layers
    c4_template = {"comp": layers[g4[0]]["comp"], "idx": layers[g4[0]]["idx"]} if g4 else None
    out["c4"] = stack_kind(c4, c4_template) if g4 else None
    out["hca"] = stack_kind(hca, {"comp": layers[gh[0]]["comp"]}) if gh else None
    return out


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(array, i, value):
    return jax.lax.dynamic_update_index_in_dim(array, value, i, axis=0)


def stage_forward(
    cfg: TinyDSV4Config,
    sp: dict,
    view: StageView,
    kinds: Sequence[PoolKind],
    pools: dict,
    slab,
    h,
    start,
    end,
    tables,
    slots,
    load: LayerwiseLoad | None = None,
):
    """Run one stage's layers on a batch of chunks.

    ``h``: [B, T, d]; ``start`` / ``end``: int32 [B] (row ``b`` is the chunk
    ``[start[b], end[b])``; ``end == start`` is a padding row: it writes nothing);
    ``tables``: :class:`~models.chunk.PageTables` of ``[B, W]``; ``slots``: int32
    [B], each row's row in the HCA scratch ``slab`` ``[max_hca, slots, r, 2D]``.
    ``sp``: this stage's weight stacks (no ``pp`` axis); ``view``: its layer
    maps; ``pools``: ``{kind: [max_layers_of_kind, pages, *row]}``; ``load``: a
    stage-local layer-wise load applied layer by layer (see the module
    docstring), or ``None``.  Each layer runs :func:`~models.chunk.layer_forward`
    over the rows with ``jax.vmap`` against the unbatched pools, then scatters all
    rows' writes at once.  Returns ``(h, pools, slab)``.
    """
    kinds = tuple(kinds)
    view = jax.tree.map(jnp.asarray, view)

    def branch(kind, li):
        needed = pool_kinds_of(kind)
        if not all(k in kinds for k in needed):
            return lambda h, pools, slab: (h, pools, slab)  # kind absent from the model

        def run(h, pools, slab):
            p = _take(sp["layers"], li)
            sub = {k: view.local_to_subpool[k][li] for k in needed}
            cp = ip = scr = None
            if kind == AttentionKind.CSA:
                c4 = _take(sp["c4"], sub[PoolKind.C4_KV])
                cp, ip = c4["comp"], c4["idx"]
            elif kind == AttentionKind.HCA:
                cp = _take(sp["hca"], sub[PoolKind.C128_KV])["comp"]
                scr = View(slab, sub[PoolKind.C128_KV])
            views = {k: View(pools[k], sub[k]) for k in needed}

            def row(h, start, end, full, swa, slot):
                return layer_forward(
                    cfg, kind, p, cp, ip, h, start, end, views, scr, slot, PageTables(full, swa)
                )

            h, writes = jax.vmap(row)(h, start, end, tables.full, tables.swa, slots)
            pools = dict(pools)
            for k in needed:
                pools[k] = scatter(pools[k], sub[k], writes[k])
            if kind == AttentionKind.HCA:
                slab = scatter(slab, sub[PoolKind.C128_KV], writes[SCRATCH])
            return h, pools, slab

        return run

    def body(carry, li):
        h, pools, slab, fetched = carry
        with jax.named_scope("stage_layer"):
            if load is not None:  # layer li's rows land now; layer li + 1's start moving
                pools = apply_layer(pools, load, fetched, view, li)
                fetched = fetch_layer(load, view, li + 1)
            k = view.attention_kind[li]
            idx = jnp.where(view.layer_valid[li] & (k >= 0), k, 3)
            fns = [branch(a, li) for a in (AttentionKind.SWA, AttentionKind.CSA, AttentionKind.HCA)]
            fns.append(lambda h, pools, slab: (h, pools, slab))  # padding layer
            h, pools, slab = jax.lax.switch(idx, fns, h, pools, slab)
        return (h, pools, slab, fetched), None

    n = view.attention_kind.shape[0]
    fetched = {} if load is None else fetch_layer(load, view, 0)
    carry = (h, dict(pools), slab, fetched)
    (h, pools, slab, _), _ = jax.lax.scan(body, carry, jnp.arange(n))
    return h, pools, slab


def reset_slots(slab, slots, fresh):
    """NaN the slab rows ``slots[b]`` where ``fresh[b]`` (``slab`` ``[max_hca, slots, r, 2D]``)."""
    at = jnp.where(fresh, slots, slab.shape[1])  # out of bounds: dropped
    return slab.at[:, at].set(jnp.nan, mode="drop")


def scratch_shape(
    cfg: TinyDSV4Config, pp: int, max_hca: int, slots: int | None = None
) -> tuple[int, ...]:
    """``[pp, max_hca, r, 2D]`` (one request) or ``[pp, max_hca, slots, r, 2D]`` (a slab)."""
    lead = (pp, max(1, max_hca)) if slots is None else (pp, max(1, max_hca), slots)
    return (*lead, cfg.hca_ratio, 2 * cfg.head_dim)


def new_scratch(cfg: TinyDSV4Config, pp: int, max_hca: int, slots: int | None = None):
    """A fresh HCA scratch (host numpy): NaN rows, so any read of a never-written row poisons."""
    return np.full(scratch_shape(cfg, pp, max_hca, slots), np.nan, np.float32)
