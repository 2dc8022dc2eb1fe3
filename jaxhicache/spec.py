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
MLA specs (``layer_kinds``, :func:`check_mla_layer_kinds`) one latent row per token
(``num_kv_heads == 1``, ``head_dim = kv_lora_rank + rope_dim``). Row layouts and TP sharding: :mod:`jaxhicache.kinds`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Protocol, final

import numpy as np

from jaxhicache import rows
from jaxhicache.kinds import (
    C4_RATIO,
    C4_RING,
    AttentionKind,
    HitPolicy,
    KVFormat,
    PageSpace,
    PoolKind,
    Tier,
    TPSharding,
    check_dsv4_ratios,
    check_mla_layer_kinds,
    dsv4_ratios,
    mla_layer_kinds,
    pool_kinds_of,
    shared_indexer_layers,
)

__all__ = [
    "C4_RATIO",
    "C4_RING",
    "AttentionKind",
    "HitPolicy",
    "KVFormat",
    "ModelCacheSpec",
    "PageSpace",
    "PoolKind",
    "StageLayers",
    "TPSharding",
    "Tier",
    "dsv4_ratios",
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
class ModelCacheSpec:
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
      layer_kinds: MLA specs only: the attention kind of every layer
        (:attr:`AttentionKind.MLA` or :attr:`AttentionKind.MLA_DSA`); DSV4 specs
        derive theirs from ``compress_ratios``, MHA specs are all ``FULL``.

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
            self._validate_mla()
            return
        if self.compress_ratios is None:
            if self.kv_format is not KVFormat.FLOAT:
                raise ValueError(f"MHA specs store FLOAT rows, got kv_format={self.kv_format}")
            return
        self._validate_dsv4()

    def _validate_dsv4(self) -> None:
        assert self.compress_ratios is not None
        rows.check_dsv4_geometry(self, check_dsv4_ratios(self.compress_ratios, self.num_layers))

    def _validate_mla(self) -> None:
        assert self.layer_kinds is not None
        if self.compress_ratios is not None:
            raise ValueError("a spec has compress_ratios (DSV4) or layer_kinds (MLA), not both")
        kinds = check_mla_layer_kinds(self.layer_kinds, self.num_layers)
        object.__setattr__(self, "layer_kinds", kinds)
        rows.check_mla_geometry(self, has_indexer=AttentionKind.MLA_DSA in kinds)

    # ------------------------------------------------------------------ presets

    @classmethod
    def deepseek_v4_flash(cls) -> ModelCacheSpec:
        """DeepSeek V4 Flash: 43 layers, window 128, page 256, fp8 rows.

        Returns:
          The spec (9,158,208 bytes per page).
        """
        return cls(
            name="deepseek-v4-flash",
            num_layers=43,
            compress_ratios=dsv4_ratios(43, hca_ratio=128),
            page_size=256,
            window=128,
            head_dim=512,
            rope_dim=64,
            indexer_head_dim=128,
            kv_format=KVFormat.FP8_DSV4,
        )

    @classmethod
    def tiny_dsv4(
        cls,
        num_layers: int = 6,
        *,
        window: int = 8,
        page_size: int = 16,
        hca_ratio: int = 8,
        head_dim: int = 32,
        rope_dim: int = 8,
        indexer_head_dim: int = 16,
        kv_format: KVFormat = KVFormat.FLOAT,
        name: str | None = None,
        compress_ratios: Sequence[int] | None = None,
    ) -> ModelCacheSpec:
        """A small DSV4-shaped spec (the tiny test model's: ``TinyDSV4Config.cache_spec``).

        Args:
          num_layers: model layers.
          window: sliding window (8: the fast "mini" spec; 128 with ``page_size=256,
            hca_ratio=128``: the structure-faithful one).
          page_size: tokens per page.
          hca_ratio: compression ratio of the HCA layers.
          head_dim: ``D``.
          rope_dim: the trailing RoPE slice of ``D``.
          indexer_head_dim: ``D_I``.
          kv_format: FLOAT or FP8_DSV4 rows.
          name: model id; derived from the geometry when ``None``.
          compress_ratios: per-layer ratios (``num_layers`` entries; the MTP 0 is
            appended here) instead of :func:`dsv4_ratios`, HCA layers at ``hca_ratio``.

        Returns:
          The spec.

        Raises:
          ValueError: ``compress_ratios`` of the wrong length or with another HCA
            ratio, or a geometry the spec rejects.
        """
        if compress_ratios is None:
            ratios = dsv4_ratios(num_layers, hca_ratio=hca_ratio)
        else:
            body = tuple(compress_ratios)
            if len(body) != num_layers:
                raise ValueError(
                    f"compress_ratios {body} has {len(body)} layers, num_layers is {num_layers} "
                    "(give the layers only; the MTP slot is appended)"
                )
            other = sorted({r for r in body if r > C4_RATIO} - {hca_ratio})
            if other:
                raise ValueError(
                    f"compress_ratios has HCA ratios {other}, hca_ratio is {hca_ratio}"
                )
            ratios = (*body, 0)
        return cls(
            name=name or f"tiny-dsv4-l{num_layers}-w{window}-p{page_size}-h{hca_ratio}",
            num_layers=num_layers,
            compress_ratios=ratios,
            page_size=page_size,
            window=window,
            head_dim=head_dim,
            rope_dim=rope_dim,
            indexer_head_dim=indexer_head_dim,
            kv_format=kv_format,
        )

    @classmethod
    def mha(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: str = "bfloat16",
        *,
        name: str | None = None,
    ) -> ModelCacheSpec:
        """An ordinary MHA/GQA model: one FULL_KV sub-pool (K and V) per layer.

        Args:
          num_layers: model layers.
          num_kv_heads: KV heads (split over ``'tp'``).
          head_dim: per-head dim.
          page_size: tokens per page.
          dtype: row dtype.
          name: model id; derived from the geometry when ``None``.

        Returns:
          The spec.
        """
        return cls(
            name=name or f"mha-l{num_layers}-h{num_kv_heads}-d{head_dim}",
            num_layers=num_layers,
            compress_ratios=None,
            page_size=page_size,
            window=page_size,
            head_dim=head_dim,
            rope_dim=0,
            indexer_head_dim=0,
            num_kv_heads=num_kv_heads,
            dtype=dtype,
        )

    @classmethod
    def deepseek_v3_2(cls, kv_format: KVFormat = KVFormat.FLOAT) -> ModelCacheSpec:
        """DeepSeek V3.2: 61 MLA layers, each with its own DSA indexer; page 64.

        Public config: ``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, ``index_head_dim`` 128.

        Args:
          kv_format: ``FLOAT`` (bf16 latent, 1,152 B per token and layer) or ``FP8_MLA`` (656 B).

        Returns:
          The spec.
        """
        return cls._mla("deepseek-v3.2", 61, range(61), kv_format=kv_format)

    @classmethod
    def glm5(cls, kv_format: KVFormat = KVFormat.FLOAT) -> ModelCacheSpec:
        """GLM-5 (``glm_moe_dsa``): 78 MLA layers, each with its own DSA indexer; page 64.

        Public config: as DeepSeek V3.2's latent and indexer; no ``indexer_types``.

        Args:
          kv_format: ``FLOAT`` (bf16 latent) or ``FP8_MLA`` (656 B per token and layer).

        Returns:
          The spec.
        """
        return cls._mla("glm-5", 78, range(78), kv_format=kv_format)

    @classmethod
    def glm5_2(cls, kv_format: KVFormat = KVFormat.FLOAT) -> ModelCacheSpec:
        """GLM-5.2: 78 MLA layers sharing DSA indexers; 21 own one; page 64.

        ``indexer_types`` marks 21 layers ``"full"``: :func:`shared_indexer_layers` with
        ``index_topk_freq`` 4, ``index_skip_topk_offset`` 3 (0, 1, 2, 6, 10, ..., 74).
        The other 57 have no indexer-key pool: its sub-pool ids are not the local ids.

        Args:
          kv_format: ``FLOAT`` (bf16 latent) or ``FP8_MLA`` (656 B per token and layer).

        Returns:
          The spec.
        """
        owners = shared_indexer_layers(78, freq=4, offset=3)
        return cls._mla("glm-5.2", 78, owners, kv_format=kv_format)

    @classmethod
    def tiny_mla(
        cls,
        num_layers: int = 4,
        *,
        page_size: int = 16,
        kv_lora_rank: int = 32,
        rope_dim: int = 8,
        indexer_head_dim: int = 16,
        indexer_layers: Sequence[int] | None = None,
        kv_format: KVFormat = KVFormat.FLOAT,
        dtype: str = "float32",
        name: str | None = None,
    ) -> ModelCacheSpec:
        """A small MLA + DSA spec for tests.

        Args:
          num_layers: model layers.
          page_size: tokens per page.
          kv_lora_rank: width of the compressed latent.
          rope_dim: width of the decoupled RoPE key.
          indexer_head_dim: width of one DSA indexer key.
          indexer_layers: global ids of the layers that own an indexer (the others
            reuse the previous owner's selection); ``None``: every layer owns one.
          kv_format: ``FLOAT`` rows or ``FP8_MLA`` byte rows.
          dtype: dtype of ``FLOAT`` rows.
          name: model id; derived from the geometry when ``None``.

        Returns:
          The spec.

        Raises:
          ValueError: an indexer layer id outside ``[0, num_layers)``, or a geometry the
            spec rejects.
        """
        owners = range(num_layers) if indexer_layers is None else indexer_layers
        tag = "all" if indexer_layers is None else "-".join(map(str, sorted(set(owners))))
        return cls._mla(
            name or f"tiny-mla-l{num_layers}-r{kv_lora_rank}-p{page_size}-i{tag}",
            num_layers,
            owners,
            kv_format=kv_format,
            page_size=page_size,
            kv_lora_rank=kv_lora_rank,
            rope_dim=rope_dim,
            indexer_head_dim=indexer_head_dim,
            dtype=dtype,
        )

    @classmethod
    def _mla(
        cls,
        name: str,
        num_layers: int,
        indexer_layers: Iterable[int],
        *,
        kv_format: KVFormat,
        page_size: int = 64,
        kv_lora_rank: int = 512,
        rope_dim: int = 64,
        indexer_head_dim: int = 128,
        dtype: str = "bfloat16",
    ) -> ModelCacheSpec:
        return cls(
            name=name,
            num_layers=num_layers,
            compress_ratios=None,
            page_size=page_size,
            window=page_size,
            head_dim=kv_lora_rank + rope_dim,
            rope_dim=rope_dim,
            indexer_head_dim=indexer_head_dim,
            kv_format=kv_format,
            dtype=dtype,
            layer_kinds=mla_layer_kinds(num_layers, indexer_layers),
        )

    # ---------------------------------------------------------------- queries

    @property
    def is_dsv4(self) -> bool:
        """Whether the spec has DSV4 per-layer compression ratios."""
        return self.compress_ratios is not None

    @property
    def is_mla(self) -> bool:
        """Whether the spec caches an MLA latent (MLA / MLA + DSA layers)."""
        return self.layer_kinds is not None

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
          The bytes (the full-page anchor itself holds none).

        Raises:
          ValueError: ``layer_map`` is for another spec.
        """
        if layer_map is not None and layer_map.spec != self:
            raise ValueError(f"layer map is for spec {layer_map.spec.name!r}, not {self.name!r}")
        total = 0
        for kind in self.kinds():
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
