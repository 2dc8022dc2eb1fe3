"""What a model caches: pool kinds, per-layer attention kinds and byte geometry.

A :class:`ModelCacheSpec` is a frozen, validated description of the per-layer
KV state of one model. It answers three questions and nothing else:

* which sub-pools exist (:meth:`ModelCacheSpec.kinds`) and which global layers
  each one covers (:meth:`ModelCacheSpec.layer_has`);
* the shape and dtype of one page row of one layer of a sub-pool
  (:meth:`ModelCacheSpec.row_shape`, :meth:`ModelCacheSpec.row_dtype`);
* bytes: :meth:`ModelCacheSpec.row_bytes` and :meth:`ModelCacheSpec.page_bytes`.

Invariants (checked in ``__post_init__``; violations raise ``ValueError`` naming the
bad value): DSV4 ratios as :func:`check_dsv4_ratios` (the trailing MTP slot is never a
layer), ``page_size`` a multiple of 4, of the C4 ring and of the HCA ratio,
``window <= page_size``; MHA specs cache one ``FULL_KV`` sub-pool for every layer;
explicit ``layer_kinds`` (:func:`check_layer_kinds`) make an MLA spec (one latent row
per token: ``num_kv_heads == 1``, ``head_dim = kv_lora_rank + rope_dim``) or a recurrent
hybrid (LINEAR layers with ``recurrent`` state geometry, FULL_KV attention layers).
Row layouts and TP sharding: :mod:`jaxhicache.kinds`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol, final

import numpy as np

from jaxhicache import rows
from jaxhicache.kinds import (
    C4_RATIO,
    C4_RING,
    PAGE_SPACES,
    AttentionKind,
    HitPolicy,
    KVFormat,
    PageSpace,
    PoolKind,
    Tier,
    TPSharding,
    check_dsv4_ratios,
    check_layer_kinds,
    dsv4_ratios,
    hybrid_layer_kinds,
    mla_layer_kinds,
    pool_kinds_of,
    shared_indexer_layers,
)
from jaxhicache.presets import SpecPresets
from jaxhicache.rows import RecurrentGeometry

__all__ = [
    "C4_RATIO",
    "C4_RING",
    "PAGE_SPACES",
    "AttentionKind",
    "HitPolicy",
    "KVFormat",
    "ModelCacheSpec",
    "PageSpace",
    "PoolKind",
    "RecurrentGeometry",
    "StageLayers",
    "TPSharding",
    "Tier",
    "dsv4_ratios",
    "hybrid_layer_kinds",
    "mla_layer_kinds",
    "pool_kinds_of",
    "shared_indexer_layers",
]


class StageLayers(Protocol):
    """What :meth:`ModelCacheSpec.page_bytes` needs of a stage: its spec and layer counts.

    :class:`jaxhicache.layer_map.StageLayerMap` is one; this module does not import
    ``layer_map`` (which imports it), so the two modules form no import cycle.
    """

    @property
    def spec(self) -> ModelCacheSpec:
        """The model cache spec."""
        ...

    def num_layers_of(self, kind: PoolKind) -> int:
        """Layers of this stage that hold a sub-pool.

        Args:
          kind: the sub-pool.

        Returns:
          The count.
        """
        ...


@final
@dataclasses.dataclass(frozen=True)
class ModelCacheSpec(SpecPresets):
    """Frozen description of a model's cached state. Build it with a preset.

    Attributes:
      name: model id (used in storage key namespaces).
      num_layers: number of model layers (the MTP slot is not a layer).
      compress_ratios: DSV4 only: per-layer ratios plus the trailing MTP slot
        (length ``num_layers + 1``); ``None`` for MHA specs.
      page_size: tokens per page.
      window: sliding window (keys per query, self included); DSV4 only.
      head_dim: ``D`` (DSV4: also the value dim; MHA: per-head dim).
      rope_dim: ``R``, the trailing rotary slice of a head (DSV4).
      indexer_head_dim: ``D_I`` of the lightning indexer (DSV4).
      num_kv_heads: KV heads (DSV4: 1, MQA, replicated over ``'tp'``).
      c4_ring: slots of the C4 compressor-state ring per SWA page (8).
      kv_format: FLOAT (logical arrays), FP8_DSV4 or FP8_MLA (byte rows).
      dtype: storage dtype of FLOAT rows (states are always float32).
      layer_kinds: MLA and hybrid specs: the attention kind of every layer
        (:attr:`AttentionKind.MLA` or :attr:`AttentionKind.MLA_DSA`); DSV4 specs
        derive theirs from ``compress_ratios``, MHA specs are all ``FULL``; hybrid
        specs mix :attr:`AttentionKind.LINEAR` and ``FULL``.
      recurrent: hybrid specs only: the LINEAR layers' state geometry
        (:class:`~jaxhicache.rows.RecurrentGeometry`); ``num_kv_heads`` and
        ``head_dim`` then describe the FULL attention layers.

    Raises:
      ValueError: a field that breaks an invariant of the module doc, named with its value.

    For MLA specs ``head_dim`` is the cached key width ``kv_lora_rank + rope_dim``
    (576 for DeepSeek V3.2): the latent followed by the decoupled RoPE key, the
    same "trailing rotary slice" convention as DSV4's heads.
    """

    name: str
    num_layers: int
    compress_ratios: tuple[int, ...] | None
    page_size: int
    window: int
    head_dim: int
    rope_dim: int
    indexer_head_dim: int
    num_kv_heads: int = 1
    c4_ring: int = C4_RING
    kv_format: KVFormat = KVFormat.FLOAT
    dtype: str = "float32"
    layer_kinds: tuple[AttentionKind, ...] | None = None
    recurrent: RecurrentGeometry | None = None

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        for field in ("head_dim", "num_kv_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        try:
            rows.np_dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"unknown dtype {self.dtype!r}") from e
        if self.layer_kinds is not None:
            self._validate_layer_kinds()
            return
        if self.recurrent is not None:
            raise ValueError("recurrent= geometry needs layer_kinds with LINEAR layers")
        if self.compress_ratios is None:
            if self.kv_format is not KVFormat.FLOAT:
                raise ValueError(f"MHA specs store FLOAT rows, got kv_format={self.kv_format}")
            return
        self._validate_dsv4()

    def _validate_dsv4(self) -> None:
        assert self.compress_ratios is not None
        rows.check_dsv4_geometry(self, check_dsv4_ratios(self.compress_ratios, self.num_layers))

    def _validate_layer_kinds(self) -> None:
        assert self.layer_kinds is not None
        if self.compress_ratios is not None:
            raise ValueError("a spec has compress_ratios (DSV4) or layer_kinds, not both")
        family, kinds = check_layer_kinds(self.layer_kinds, self.num_layers)
        object.__setattr__(self, "layer_kinds", kinds)
        if family == "hybrid":
            rows.check_hybrid_geometry(self)
            return
        if self.recurrent is not None:
            raise ValueError("recurrent= geometry needs LINEAR layers, this is an MLA spec")
        rows.check_mla_geometry(self, has_indexer=AttentionKind.MLA_DSA in kinds)

    # ---------------------------------------------------------------- queries

    @property
    def is_dsv4(self) -> bool:
        """Whether the spec has DSV4 per-layer compression ratios."""
        return self.compress_ratios is not None

    @property
    def is_mla(self) -> bool:
        """Whether the spec caches an MLA latent (MLA / MLA + DSA layers)."""
        return self.layer_kinds is not None and self.recurrent is None

    @property
    def is_hybrid(self) -> bool:
        """Whether the spec has linear-attention layers with recurrent-state snapshots."""
        return self.recurrent is not None

    @property
    def kv_lora_rank(self) -> int:
        """MLA only: width of the compressed latent, ``head_dim - rope_dim`` (512 for V3.2).

        Raises:
          ValueError: not an MLA spec.
        """
        if not self.is_mla:
            raise ValueError(f"spec {self.name!r} is not an MLA spec")
        return self.head_dim - self.rope_dim

    @property
    def hca_ratio(self) -> int | None:
        """The spec's HCA ratio (128 for DSV4), or ``None`` when it has no HCA layer."""
        if self.compress_ratios is None:
            return None
        hca = [r for r in self.compress_ratios[:-1] if r > C4_RATIO]
        return hca[0] if hca else None

    @functools.cached_property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """Attention kind of each global layer (length ``num_layers``, no MTP slot)."""
        if self.layer_kinds is not None:
            return self.layer_kinds
        if self.compress_ratios is None:
            return (AttentionKind.FULL,) * self.num_layers
        to_kind = {0: AttentionKind.SWA, C4_RATIO: AttentionKind.CSA}
        return tuple(to_kind.get(r, AttentionKind.HCA) for r in self.compress_ratios[:-1])

    @property
    def swa_trailing_pages(self) -> int:
        """Trailing pages a restore needs from the SWA-space pools (covers ``window - 1`` keys)."""
        if not self.is_dsv4:
            return 0
        return max(1, math.ceil((self.window - 1) / self.page_size))

    def kinds(self) -> tuple[PoolKind, ...]:
        """Sub-pools this spec caches.

        Returns:
          The kinds, in :class:`PoolKind` order.
        """
        return self._kinds

    @functools.cached_property
    def _kinds(self) -> tuple[PoolKind, ...]:
        present = {k for a in set(self.attention_kinds) for k in pool_kinds_of(a)}
        return tuple(k for k in PoolKind if k in present)

    def check_kind(self, kind: PoolKind) -> PoolKind:
        """``kind``, checked.

        Args:
          kind: a :class:`PoolKind`.

        Returns:
          ``kind``.

        Raises:
          ValueError: not a :class:`PoolKind`, or a kind this spec does not cache.
        """
        if not isinstance(kind, PoolKind):
            raise ValueError(f"not a PoolKind: {kind!r}")
        if kind not in self.kinds():
            raise ValueError(
                f"pool kind {kind.value!r} is not cached by spec {self.name!r} "
                f"(it has {[k.value for k in self.kinds()]})"
            )
        return kind

    def layer_has(self, kind: PoolKind, global_layer: int) -> bool:
        """Whether a layer has a row in a sub-pool.

        Args:
          kind: a sub-pool this spec caches.
          global_layer: a global layer id.

        Returns:
          ``True`` if layer ``global_layer`` has a row in ``kind``.

        Raises:
          ValueError: ``global_layer`` outside ``[0, num_layers)`` (or a bad ``kind``).
        """
        self.check_kind(kind)
        if not 0 <= global_layer < self.num_layers:
            raise ValueError(f"global layer {global_layer} not in [0, {self.num_layers})")
        return kind in pool_kinds_of(self.attention_kinds[global_layer])

    def layers_with(self, kind: PoolKind) -> tuple[int, ...]:
        """The layers that have a sub-pool.

        Args:
          kind: a sub-pool this spec caches.

        Returns:
          Their global ids, ascending.
        """
        self.check_kind(kind)
        return tuple(g for g, a in enumerate(self.attention_kinds) if kind in pool_kinds_of(a))

    def row_shape(self, kind: PoolKind) -> tuple[int, ...]:
        """Shape of one page row of one layer of sub-pool ``kind`` (:func:`rows.row_shape`).

        Args:
          kind: a sub-pool this spec caches.

        Returns:
          The row's shape.
        """
        return rows.row_shape(self, self.check_kind(kind))

    def row_dtype(self, kind: PoolKind) -> np.dtype:
        """Storage dtype of sub-pool ``kind`` (:func:`rows.row_dtype`).

        Args:
          kind: a sub-pool this spec caches.

        Returns:
          The dtype (uint8 for byte rows).
        """
        return rows.row_dtype(self, self.check_kind(kind))

    def row_bytes(self, kind: PoolKind) -> int:
        """Bytes of one page row of one layer of a sub-pool.

        Args:
          kind: a sub-pool this spec caches.

        Returns:
          The bytes.
        """
        return math.prod(self.row_shape(kind)) * self.row_dtype(kind).itemsize

    def page_bytes(self, layer_map: StageLayers | None = None) -> int:
        """Bytes of one full page over every cached sub-pool: what tiers size a page by.

        Args:
          layer_map: one stage's layers (e.g. a ``StageLayerMap``); ``None``: the whole model.

        Returns:
          The bytes of the full- and SWA-space rows (the full-page anchor itself holds
          none; recurrent-state snapshots: :meth:`snapshot_bytes`).

        Raises:
          ValueError: ``layer_map`` is for another spec.
        """
        return self._bytes_of(layer_map, (PageSpace.FULL, PageSpace.SWA))

    def snapshot_bytes(self, layer_map: StageLayers | None = None) -> int:
        """Bytes of one recurrent-state snapshot (conv and recurrent state of every layer).

        Args:
          layer_map: one stage's layers; ``None``: the whole model.

        Returns:
          The bytes; 0 for a spec without recurrent states.

        Raises:
          ValueError: ``layer_map`` is for another spec.
        """
        return self._bytes_of(layer_map, (PageSpace.STATE,))

    def _bytes_of(self, layer_map: StageLayers | None, spaces: tuple[PageSpace, ...]) -> int:
        if layer_map is not None and layer_map.spec != self:
            raise ValueError(f"layer map is for spec {layer_map.spec.name!r}, not {self.name!r}")
        total = 0
        for kind in (k for k in self.kinds() if k.page_space in spaces):
            n = len(self.layers_with(kind)) if layer_map is None else layer_map.num_layers_of(kind)
            total += n * self.row_bytes(kind)
        return total

    @property
    def fp8_token_bytes(self) -> int:
        """Bytes of one token in an FP8_DSV4 KV row (584 for DSV4): :func:`rows.fp8_token_bytes`."""
        return rows.fp8_token_bytes(self)

    @property
    def fp8_mla_token_bytes(self) -> int:
        """Bytes of one token in an FP8_MLA latent row (656 for V3.2): :func:`rows.fp8_mla_token_bytes`."""
        return rows.fp8_mla_token_bytes(self)
