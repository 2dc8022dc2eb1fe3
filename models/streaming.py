"""Single-device streaming forward with explicit cache state (no mesh, no PP).

:class:`StreamState` is exactly the state DSV4 keeps for one request (see
:mod:`models.chunk` for the row layouts): per-layer pools of every
:class:`~jaxhicache.spec.PoolKind` (``[layers_of_kind, pages, *row]``,
layers in global order), the request's page tables and the request-scoped HCA
partial-window scratch.  :func:`stream_forward` runs the chunk
``[state.pos, state.pos + T)`` and returns its logits and the new state, so
one-shot prefill, chunked prefill and token-by-token decode are all sequences
of calls.  :mod:`models.paged` runs the same layer code through the library's
stage-sharded device pools.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhicache.layer_map import build_layer_maps, stack_layer_maps
from jaxhicache.spec import ModelCacheSpec, PoolKind
from models import layers as L
from models.chunk import PageTables
from models.config import C4_RATIO, TinyDSV4Config
from models.stage import (
    MATMUL_PRECISION,
    compiler_options,
    new_scratch,
    stack_stage_params,
    stage_forward,
)


def cache_spec(cfg: TinyDSV4Config, name: str | None = None) -> ModelCacheSpec:
    """The library's :class:`ModelCacheSpec` of a tiny model config: ``cfg.cache_spec(name)``."""
    return cfg.cache_spec(name)


def _first_read(cfg: TinyDSV4Config, start: int) -> int:
    """The first position a chunk at ``start`` reads SWA-space rows of (window, C4 ring)."""
    lo = start - cfg.window + 1
    if cfg.c4_layers:
        lo = min(lo, C4_RATIO * (start // C4_RATIO) - C4_RATIO)
    return max(0, lo)


def _row_pages(cfg: TinyDSV4Config, start: int, end: int, full, swa):
    """``(read, written)``: sets of ``(space, page id)`` a chunk ``[start, end)`` reads /
    writes (it writes only the pages of its own positions; reads include those)."""
    page = cfg.page_size
    n_pages = -(-end // page)
    first_read, first_write = _first_read(cfg, start) // page, start // page
    read = {("full", int(p)) for p in full[:n_pages]}
    read |= {("swa", int(p)) for p in swa[first_read:n_pages]}
    wrote = {("full", int(p)) for p in full[first_write:n_pages]}
    wrote |= {("swa", int(p)) for p in swa[first_write:n_pages]}
    return read, wrote


def check_page_tables(cfg: TinyDSV4Config, start: int, end: int, full, swa) -> None:
    """Host-side check that every page the chunk ``[start, end)`` reads or writes is present.

    Needed: full pages of every token ``< end`` (compressed entries of the whole
    prefix and chunk); SWA pages of ``[min(start-W+1, 4*(start//4)-4), end)``
    (window keys and the C4 ring rows of the overlap window).  Raises
    ``ValueError`` naming the missing page.  A restore at ``start > 0`` that
    lacks the last SWA page (its C4 compressor state) fails here: it is never
    treated as a first window.
    """
    full, swa = np.asarray(full), np.asarray(swa)
    page = cfg.page_size
    if full.shape != swa.shape or full.ndim != 1:
        raise ValueError(f"page tables must be equal 1-D arrays, got {full.shape} and {swa.shape}")
    n_pages = math.ceil(end / page)
    if n_pages > full.shape[0]:
        raise ValueError(f"chunk ends at {end} but the page table covers {full.shape[0]} pages")
    missing = [i for i in range(n_pages) if full[i] < 0]
    if missing:
        raise ValueError(f"full pages {missing} are absent (-1) but needed for tokens < {end}")
    lo = _first_read(cfg, start)
    missing = [i for i in range(lo // page, n_pages) if swa[i] < 0]
    if missing:
        raise ValueError(
            f"SWA pages {missing} are tombstoned (-1) but chunk [{start}, {end}) reads "
            f"positions >= {lo} (window / C4 compressor state)"
        )


def check_hca_scratch(cfg: TinyDSV4Config, start: int, scratch_from: int) -> None:
    """The HCA partial window ``[r*(start//r), start)`` must come from this request's scratch.

    It is request-scoped and never restored, so a chunk may start inside an HCA
    window only if this request computed that window's earlier tokens itself.
    """
    if not cfg.hca_layers:
        return
    w0 = cfg.hca_ratio * (start // cfg.hca_ratio)
    if w0 < start and w0 < scratch_from:
        raise ValueError(
            f"chunk at {start} needs HCA partial-window tokens [{w0}, {start}) but this "
            f"request's scratch starts at {scratch_from} (restore points must be multiples "
            f"of the HCA ratio {cfg.hca_ratio})"
        )


class BatchArgs(NamedTuple):
    """Checked host inputs of a batched forward (``B`` rows, see ``PagedModel.forward``)."""

    tokens: np.ndarray  # int32 [B, T]
    starts: np.ndarray  # int32 [B]
    n_valid: np.ndarray  # int32 [B]; 0 = padding row
    full: np.ndarray  # int32 [B, W]
    swa: np.ndarray  # int32 [B, W]
    slots: np.ndarray  # int32 [B]
    fresh: np.ndarray  # bool [B]


def _ints(name, x, ndim):
    a = np.asarray(x)
    if a.ndim != ndim or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a {ndim}-D int array, got shape {a.shape} {a.dtype}")
    return a.astype(np.int32)


def check_batch(
    cfg: TinyDSV4Config, tokens, starts, n_valid, full, swa, slots, fresh, slot_starts
) -> tuple[BatchArgs, np.ndarray]:
    """Host-side checks of a batch of chunks; ``ValueError`` naming the bad value.

    Per valid row (``n_valid > 0``): :func:`check_page_tables`, a slot in
    ``[0, len(slot_starts))`` that is started (or ``fresh``), and
    :func:`check_hca_scratch` from the slot's start (the row's own start when
    ``fresh``).  Across valid rows: no shared slot, and no page (full or SWA) that
    one row writes (the pages of its positions ``[start, end)``) and another row
    reads or writes.  Padding rows are not checked: they write nothing.
    Returns the normalized arrays and the slot starts after the call.
    """
    tokens = _ints("tokens", tokens, 2)
    b, t = tokens.shape
    if b < 1 or t < 1:
        raise ValueError(f"tokens must be [B >= 1, T >= 1], got {tokens.shape}")
    starts, n_valid, slots = (
        _ints(n, x, 1) for n, x in (("starts", starts), ("n_valid", n_valid), ("slots", slots))
    )
    fresh = np.zeros((b,), bool) if fresh is None else np.asarray(fresh)
    if fresh.dtype != bool:
        raise ValueError(f"fresh must be a bool array, got {fresh.dtype}")
    full, swa = _ints("full_page_ids", full, 2), _ints("swa_page_ids", swa, 2)
    for name, a in (("starts", starts), ("n_valid", n_valid), ("slots", slots), ("fresh", fresh)):
        if a.shape != (b,):
            raise ValueError(f"{name} has shape {a.shape}, tokens has B={b} rows")
    if full.shape != swa.shape or full.shape[0] != b:
        raise ValueError(f"page tables full {full.shape} / swa {swa.shape} must both be [B={b}, W]")
    bad = np.flatnonzero((n_valid < 0) | (n_valid > t))
    if bad.size:
        raise ValueError(f"n_valid[{bad[0]}]={n_valid[bad[0]]} is outside [0, T={t}]")
    n_slots = len(slot_starts)
    new_starts = np.array(slot_starts, copy=True)
    needs: list = []
    owner: dict[int, int] = {}
    for i in np.flatnonzero(n_valid > 0).tolist():
        start, end, slot = int(starts[i]), int(starts[i] + n_valid[i]), int(slots[i])
        if start < 0:
            raise ValueError(f"starts[{i}]={start} is negative")
        if not 0 <= slot < n_slots:
            raise ValueError(f"slots[{i}]={slot} is outside the slab's [0, {n_slots})")
        if slot in owner:
            raise ValueError(f"rows {owner[slot]} and {i} both use scratch slot {slot}")
        owner[slot] = i
        try:
            check_page_tables(cfg, start, end, full[i], swa[i])
            if fresh[i]:
                check_hca_scratch(cfg, start, start)
            elif slot_starts[slot] < 0:
                raise ValueError(f"scratch slot {slot} was never started (pass fresh=True)")
            else:
                check_hca_scratch(cfg, start, int(slot_starts[slot]))
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
        if fresh[i]:
            new_starts[slot] = start
        needs.append((i, _row_pages(cfg, start, end, full[i], swa[i])))
    writer: dict[tuple[str, int], int] = {}
    for i, (_, wrote) in needs:
        for key in wrote:
            if key in writer:
                raise ValueError(f"rows {writer[key]} and {i} both write {key[0]} page {key[1]}")
            writer[key] = i
    for i, (read, _) in needs:
        for key in read:
            if writer.get(key, i) != i:
                raise ValueError(
                    f"row {i} reads {key[0]} page {key[1]} that row {writer[key]} writes"
                )
    return BatchArgs(tokens, starts, n_valid, full, swa, slots, fresh), new_starts


@dataclasses.dataclass
class StreamState:
    """Cache state of one request after ``pos`` tokens."""

    pools: dict[PoolKind, jax.Array]  # [layers_of_kind, pages, *row], global layer order
    scratch: jax.Array  # HCA partial windows [n_hca_layers, r, 2D]; NaN = never written
    tables: PageTables
    pos: int
    scratch_from: int = 0  # first position this request computed itself (its restore point)


def init_stream_state(
    cfg: TinyDSV4Config, max_len: int, num_pages: int | None = None
) -> StreamState:
    """Zeroed pools for a fresh request of up to ``max_len`` tokens.

    The pools hold ``num_pages`` pages (default: just enough); the request's
    page tables are the identity over its first ``ceil(max_len / page)`` pages.
    """
    spec = cache_spec(cfg)
    n_pages = math.ceil(max_len / cfg.page_size)
    num_pages = num_pages or n_pages
    if num_pages < n_pages:
        raise ValueError(f"num_pages={num_pages} < {n_pages} pages needed for {max_len} tokens")
    pools = {
        k: _committed(
            np.zeros((len(spec.layers_with(k)), num_pages, *spec.row_shape(k)), np.float32)
        )
        for k in spec.kinds()
    }
    ids = np.arange(n_pages, dtype=np.int32)
    return StreamState(pools, fresh_scratch(cfg), PageTables(ids, ids), 0)


def fresh_scratch(cfg: TinyDSV4Config):
    """An empty (NaN) HCA scratch ``[n_hca, r, 2D]`` for a request on one device."""
    return _committed(np.asarray(new_scratch(cfg, 1, len(cfg.hca_layers))[0]))


def _committed(x):
    # state arrays live on (and are committed to) the default device, so arrays a test
    # rebuilds with ``device_put(host, old.sharding)`` hit the same compiled program
    return jax.device_put(x, jax.devices()[0])


def restored_state(cfg: TinyDSV4Config, pools: dict, full, swa, prefix_len: int) -> StreamState:
    """The state of a request resumed at ``prefix_len`` from restored pools (fresh scratch)."""
    tables = PageTables(np.asarray(full, np.int32), np.asarray(swa, np.int32))
    return StreamState(dict(pools), fresh_scratch(cfg), tables, prefix_len, prefix_len)


@functools.lru_cache(maxsize=16)
def _single_stage(cfg: TinyDSV4Config):
    spec = cache_spec(cfg)
    maps = build_layer_maps(spec, 1)
    return spec, maps, stack_layer_maps(maps)


def single_stage_params(cfg: TinyDSV4Config, params: dict) -> dict:
    """Weight stacks of the whole model as one stage (no ``pp`` axis)."""
    _, maps, _ = _single_stage(cfg)
    sp = stack_stage_params(cfg, params, maps)
    sp = {k: (v if k in ("embed", "final_norm", "lm_head") else _squeeze(v)) for k, v in sp.items()}
    return jax.device_put(sp)


def _squeeze(tree):
    return None if tree is None else jax.tree.map(lambda a: a[0], tree)


def _chunk_impl(cfg, sp, pools, scratch, tokens, start, n_valid, tables):
    """One request's chunk: the batched stage forward with B = 1 and a one-slot slab."""
    spec, _, stacked = _single_stage(cfg)
    h = L.embed(sp, tokens)[None]
    h, pools, slab = stage_forward(
        cfg,
        sp,
        stacked.stage_at(0),
        spec.kinds(),
        pools,
        scratch[:, None],  # [n_hca, 1 slot, r, 2D]
        h,
        start[None],
        (start + n_valid)[None],
        PageTables(tables.full[None], tables.swa[None]),
        jnp.zeros((1,), jnp.int32),
    )
    return L.lm_head(sp, h[0], cfg), pools, slab[:, 0]


@functools.cache
def _chunk_jit():
    return jax.jit(
        _chunk_impl,
        static_argnums=(0,),
        donate_argnums=(2, 3),
        compiler_options=compiler_options(),
    )


def _chunk(*args):
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _chunk_jit()(*args)


def stream_forward(
    cfg: TinyDSV4Config, sp: dict, state: StreamState, tokens, pad_to: int | None = None
):
    """Run tokens at positions ``[state.pos, state.pos + len(tokens))``.

    ``sp``: :func:`single_stage_params` of the model.  The state's arrays are
    donated (do not reuse ``state`` afterwards; copy it first).
    ``pad_to`` pads the chunk to a fixed length (one compilation per length);
    padded rows are never written.  Returns ``(logits [len(tokens), V], state)``.
    """
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0]
    t = max(n, pad_to or n)
    start, end = state.pos, state.pos + n
    check_page_tables(cfg, start, end, state.tables.full, state.tables.swa)
    check_hca_scratch(cfg, start, state.scratch_from)
    padded = np.zeros((t,), np.int32)
    padded[:n] = tokens
    logits, pools, scratch = _chunk(
        cfg,
        sp,
        state.pools,
        state.scratch,
        jnp.asarray(padded),
        jnp.int32(start),
        jnp.int32(n),
        PageTables(*(jnp.asarray(ids, jnp.int32) for ids in state.tables)),
    )
    return logits[:n], StreamState(pools, scratch, state.tables, end, state.scratch_from)


def run_chunked(cfg, sp, state: StreamState, tokens, chunk_sizes, pad_to: int | None = None):
    """Run ``tokens`` from ``state.pos`` in chunks (an int or a list of sizes, cycled).

    Returns ``(logits [len(tokens), V], state)``.
    """
    tokens = np.asarray(tokens, np.int32)
    sizes = [chunk_sizes] if isinstance(chunk_sizes, int) else list(chunk_sizes)
    out, off, i = [], 0, 0
    while off < len(tokens):
        n = min(sizes[i % len(sizes)], len(tokens) - off)
        logits, state = stream_forward(cfg, sp, state, tokens[off : off + n], pad_to)
        out.append(logits)
        off += n
        i += 1
    return jnp.concatenate(out, axis=0), state
