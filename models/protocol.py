"""What :class:`models.engine.Engine` and :class:`models.serving.ServingLoop` need of a model.

:class:`ServableModel` is a structural ``typing.Protocol``:
:class:`models.paged.PagedModel` (DSV4) and
:class:`models.mla_paged.PagedMLAModel` (MLA + DSA) and
:class:`models.hybrid_paged.PagedHybridModel` (gated DeltaNet + full attention)
satisfy it, so the engine and the serving loop drive any of them unchanged.  The
scratch objects are opaque to the callers: they only thread them from one call to
the next.

Recurrent state (a spec with a ``PageSpace.STATE`` space: ``CONV_STATE`` /
``RECURRENT_STATE``) lives in snapshot slots of the pools
(``init_pools(..., num_state_slots=)``).  ``forward`` takes keyword-only
``state_in`` / ``state_out`` (int32 ``[B]``), ``prefill`` and ``decode_step`` take
them as ints (``prefill`` also ``snapshots``: chunk end -> slot): row ``b`` reads its
state at ``starts[b]`` from slot ``state_in[b]`` (``-1``: the zero state, only at
position 0) and writes the state after its tokens to ``state_out[b]`` (equal to
``state_in[b]``: advanced in place; different: copy-on-write, the slot read is never
modified).  Models whose spec has no STATE space accept these arguments and ignore
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from jax.sharding import Mesh

from jaxhicache.layer_map import StageLayerMap
from jaxhicache.pools.device import DevicePools
from jaxhicache.spec import ModelCacheSpec, PoolKind
from jaxhicache.transfer import LayerwiseLoad

__all__ = ["ModelConfig", "ServableModel"]


class ModelConfig(Protocol):
    """The config fields the callers read."""

    @property
    def page_size(self) -> int: ...

    @property
    def vocab(self) -> int: ...


@runtime_checkable
class ServableModel(Protocol):
    """A paged, pipeline-parallel model over the library's :class:`DevicePools`.

    ``spec``, ``mesh`` and ``layer_maps`` must be those of the ``HiCache`` that
    serves it.  Page tables are int32, ``-1`` padded; a model without SWA state
    ignores ``swa_page_ids``.  Pools (and scratch) passed in are donated.
    """

    config: ModelConfig
    spec: ModelCacheSpec
    mesh: Mesh
    layer_maps: Sequence[StageLayerMap]

    def init_pools(
        self, num_pages: int, num_swa_pages: int, num_state_slots: int = 0
    ) -> DevicePools:
        """Zeroed device pools (the oracle's private pools); ``num_state_slots``: snapshot
        slots (ignored without a STATE space)."""
        ...

    def new_scratch_slab(self, slots: int) -> Any:
        """Request-scoped state for ``slots`` requests in flight (threaded through ``forward``)."""
        ...

    def forward(
        self,
        pools: DevicePools,
        slab: Any,
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
    ) -> tuple[np.ndarray, DevicePools, Any]:
        """B requests' chunks in one program: ``(logits [B, T, vocab], pools, slab)``."""
        ...

    def prefill(
        self,
        pools: DevicePools,
        tokens,
        start_pos: int,
        full_page_ids,
        swa_page_ids,
        chunk_size: int | None = None,
        scratch: Any = None,
        load: LayerwiseLoad | None = None,
        *,
        state_in: int | None = None,
        state_out: int | None = None,
        snapshots: dict[int, int] | None = None,
    ) -> tuple[np.ndarray, DevicePools, Any]:
        """One request's tokens from ``start_pos``, chunked: ``(logits [n, vocab], pools, scratch)``."""
        ...

    def decode_step(
        self,
        pools: DevicePools,
        token,
        pos: int,
        full_page_ids,
        swa_page_ids,
        scratch: Any,
        *,
        state_in: int | None = None,
        state_out: int | None = None,
    ) -> tuple[np.ndarray, DevicePools, Any]:
        """One token at ``pos``: ``(logits [vocab], pools, scratch)``."""
        ...

    def global_layer_rows(self, pools: DevicePools, kind: PoolKind) -> list:
        """Per global layer, its ``[pages, *row]`` host rows of ``kind`` (``None``: none)."""
        ...
