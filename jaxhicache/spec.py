"""What a model caches: pool kinds, per-layer attention kinds and byte geometry.

A :class:`ModelCacheSpec` is a frozen, validated description of the per-layer
KV state of one model. It answers three questions and nothing else:

* which sub-pools exist (:meth:`ModelCacheSpec.kinds`) and which global layers
  each one covers (:meth:`ModelCacheSpec.layer_has`);
* the shape and dtype of one page row of one layer of a sub-pool
  (:meth:`ModelCacheSpec.row_shape`, :meth:`ModelCacheSpec.row_dtype`);
* bytes: :meth:`ModelCacheSpec.row_bytes` and :meth:`ModelCacheSpec.page_bytes`.

Invariants (checked in ``__post_init__``, violations raise ``ValueError``
naming the bad value):

* DSV4 specs: ``len(compress_ratios) == num_layers + 1`` (the trailing entry is
  the MTP/next-n slot, ratio 0, and is never a layer); ratios are 0, 4 and one
  HCA ratio > 4; ``page_size`` is a multiple of 4, of the C4 ring and of the
  HCA ratio; ``window <= page_size``.
* MHA specs cache one ``FULL_KV`` sub-pool (K and V) for every layer.

Pool rows (one page of one layer)::

    kind              page space  hit policy      FLOAT row           FP8_DSV4 row
    SWA_KV            SWA         trailing pages  (page, D)           uint8 bytes, 584 B/token, padded to 576
    C4_KV             FULL        all pages       (page/4, D)         uint8, same token format
    C4_INDEXER        FULL        all pages       (page/4, D_I)       uint8, D_I fp8 + fp32 scale per entry
    C128_KV           FULL        all pages       (page/hca, D)       uint8, 584 B/entry, padded to 576
    C4_STATE          SWA         trailing pages  (ring, 4*D) fp32    same
    C4_INDEXER_STATE  SWA         trailing pages  (ring, 4*D_I) fp32  same
    FULL_KV (MHA)     FULL        all pages       (2, page, H_kv, hd) dtype
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from typing import Protocol, final

import numpy as np

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
    "Tier",
    "dsv4_ratios",
    "pool_kinds_of",
]


class PageSpace(enum.StrEnum):
    """Which page-id space addresses a sub-pool's rows."""

    FULL = "full"  # one id per token page of the prefix (the anchor's ids)
    SWA = "swa"  # sliding-window pages: only the trailing ones are kept


class Tier(enum.StrEnum):
    """Where a cached page lives: device pools (L1), host slabs (L2), shared storage (L3)."""

    DEVICE = "device"
    HOST = "host"
    STORAGE = "storage"


class HitPolicy(enum.StrEnum):
    """Which pages of a prefix a restore needs from a sub-pool (DESIGN §4)."""

    ALL_PAGES = "all_pages"
    TRAILING_PAGES = "trailing_pages"


class PoolKind(enum.StrEnum):
    """A sub-pool of cached per-layer state."""

    SWA_KV = "swa_kv"
    C4_KV = "c4_kv"
    C4_INDEXER = "c4_indexer"
    C128_KV = "c128_kv"  # the HCA pool, whatever the HCA ratio of the spec
    C4_STATE = "c4_state"
    C4_INDEXER_STATE = "c4_indexer_state"
    FULL_KV = "full_kv"

    @property
    def page_space(self) -> PageSpace:
        """The page space whose ids address this kind's rows (SWA or full)."""
        if self in (PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
            return PageSpace.SWA
        return PageSpace.FULL

    @property
    def hit_policy(self) -> HitPolicy:
        """Which pages of a prefix a restore needs: all of them, or the trailing window's."""
        if self.page_space is PageSpace.SWA:
            return HitPolicy.TRAILING_PAGES
        return HitPolicy.ALL_PAGES


class AttentionKind(enum.IntEnum):
    """Attention of one layer; the int value is the branch index used in traced code."""

    SWA = 0  # DSV4 ratio 0: sliding window only
    CSA = 1  # DSV4 ratio 4: overlapping compressor + lightning indexer (+ SWA)
    HCA = 2  # DSV4 HCA ratio (128): disjoint compressor, dense compressed attention (+ SWA)
    FULL = 3  # ordinary MHA/GQA attention over the whole prefix


class KVFormat(enum.Enum):
    """How KV rows are stored."""

    FLOAT = "float"  # logical arrays in ``ModelCacheSpec.dtype`` (tiny test models)
    FP8_DSV4 = "fp8_dsv4"  # DSV4 byte rows: fp8 nope + bf16 rope + scales, uint8 storage


_KINDS_OF_ATTENTION: dict[AttentionKind, tuple[PoolKind, ...]] = {
    AttentionKind.SWA: (PoolKind.SWA_KV,),
    AttentionKind.CSA: (
        PoolKind.SWA_KV,
        PoolKind.C4_KV,
        PoolKind.C4_INDEXER,
        PoolKind.C4_STATE,
        PoolKind.C4_INDEXER_STATE,
    ),
    AttentionKind.HCA: (PoolKind.SWA_KV, PoolKind.C128_KV),
    AttentionKind.FULL: (PoolKind.FULL_KV,),
}


def pool_kinds_of(attention: AttentionKind) -> tuple[PoolKind, ...]:
    """Sub-pools a layer of attention kind ``attention`` has a row in."""
    return _KINDS_OF_ATTENTION[AttentionKind(attention)]


C4_RATIO = 4
"""Compression ratio of CSA (C4) layers; fixed by DSV4 (it carries the A/B overlap)."""
C4_RING = 8
"""Default C4 compressor-state ring: slots per SWA page (2 x the ratio)."""


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
        """Layers of this stage that hold ``kind``."""
        ...


_FP8_ROW_ALIGN = 576  # DSV4 KV rows are padded to a multiple of 576 bytes
_FP8_SCALE_GROUP = 64  # one UE8M0 scale per 64 fp8 "nope" values


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
      kv_format: FLOAT (logical arrays) or FP8_DSV4 (byte rows).
      dtype: storage dtype of FLOAT rows (states are always float32).
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

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        for field in ("head_dim", "num_kv_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"unknown dtype {self.dtype!r}") from e
        if self.compress_ratios is None:
            if self.kv_format is not KVFormat.FLOAT:
                raise ValueError(f"MHA specs store FLOAT rows, got kv_format={self.kv_format}")
            return
        self._validate_dsv4()

    def _validate_dsv4(self) -> None:
        ratios = self.compress_ratios
        assert ratios is not None
        if len(ratios) != self.num_layers + 1:
            raise ValueError(
                f"compress_ratios must have num_layers + 1 = {self.num_layers + 1} entries "
                f"(the last is the MTP slot), got {len(ratios)}"
            )
        if ratios[-1] != 0:
            raise ValueError(
                f"the trailing MTP entry of compress_ratios must be 0, got {ratios[-1]}"
            )
        bad = sorted({r for r in ratios if r not in (0, C4_RATIO) and r <= C4_RATIO})
        if bad:
            raise ValueError(f"compress ratios must be 0, 4 or one HCA ratio > 4; got {bad}")
        hca = sorted({r for r in ratios if r > C4_RATIO})
        if len(hca) > 1:
            raise ValueError(f"a spec has at most one HCA ratio, got {hca}")
        if self.num_kv_heads != 1:
            raise ValueError(f"DSV4 attention is MQA (num_kv_heads=1), got {self.num_kv_heads}")
        if not 0 < self.rope_dim < self.head_dim or self.rope_dim % 2:
            raise ValueError(
                f"rope_dim must be even and in (0, head_dim={self.head_dim}), got {self.rope_dim}"
            )
        if self.indexer_head_dim < 1:
            raise ValueError(f"indexer_head_dim must be >= 1, got {self.indexer_head_dim}")
        if self.page_size % C4_RATIO:
            raise ValueError(f"page_size must be a multiple of 4, got {self.page_size}")
        if self.c4_ring % C4_RATIO or self.c4_ring < 2 * C4_RATIO:
            raise ValueError(f"c4_ring must be a multiple of 4 and >= 8, got {self.c4_ring}")
        if self.page_size % self.c4_ring:
            raise ValueError(
                f"page_size {self.page_size} must be a multiple of the C4 ring {self.c4_ring}"
            )
        if hca and self.page_size % hca[0]:
            raise ValueError(
                f"page_size {self.page_size} must be a multiple of the HCA ratio {hca[0]}"
            )
        if not C4_RATIO <= self.window <= self.page_size:
            raise ValueError(
                f"window must be in [4, page_size={self.page_size}], got {self.window}"
            )

    # ------------------------------------------------------------------ presets

    @classmethod
    def deepseek_v4_flash(cls) -> ModelCacheSpec:
        """DeepSeek V4 Flash: 43 layers, window 128, page 256, fp8 rows."""
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
        """A small DSV4-shaped spec, by default with the DSV4 ratio pattern.

        Defaults give the fast "mini" spec (window 8, page 16, ratios 4/8); pass
        ``window=128, page_size=256, hca_ratio=128`` for the structure-faithful one.
        ``compress_ratios``: per-layer ratios (``num_layers`` entries, no MTP slot;
        the trailing MTP 0 is appended here) instead of :func:`dsv4_ratios`; its
        HCA layers must use ``hca_ratio``.  The tiny test model derives its spec
        with this preset (``models.config.TinyDSV4Config.cache_spec``).
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
        """An ordinary MHA/GQA model: one FULL_KV sub-pool (K and V) per layer."""
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

    # ---------------------------------------------------------------- queries

    @property
    def is_dsv4(self) -> bool:
        """Whether the spec has DSV4 per-layer compression ratios."""
        return self.compress_ratios is not None

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
        """Sub-pools this spec caches, in canonical order."""
        return self._kinds

    @functools.cached_property
    def _kinds(self) -> tuple[PoolKind, ...]:
        present = {k for a in set(self.attention_kinds) for k in _KINDS_OF_ATTENTION[a]}
        return tuple(k for k in PoolKind if k in present)

    def check_kind(self, kind: PoolKind) -> PoolKind:
        """Return ``kind`` if this spec caches it, else raise ``ValueError``."""
        if not isinstance(kind, PoolKind):
            raise ValueError(f"not a PoolKind: {kind!r}")
        if kind not in self.kinds():
            raise ValueError(
                f"pool kind {kind.value!r} is not cached by spec {self.name!r} "
                f"(it has {[k.value for k in self.kinds()]})"
            )
        return kind

    def layer_has(self, kind: PoolKind, global_layer: int) -> bool:
        """Whether global layer ``global_layer`` has a row in sub-pool ``kind``."""
        self.check_kind(kind)
        if not 0 <= global_layer < self.num_layers:
            raise ValueError(f"global layer {global_layer} not in [0, {self.num_layers})")
        return kind in _KINDS_OF_ATTENTION[self.attention_kinds[global_layer]]

    def layers_with(self, kind: PoolKind) -> tuple[int, ...]:
        """Global ids of the layers that have sub-pool ``kind``, ascending."""
        self.check_kind(kind)
        return tuple(
            g for g, a in enumerate(self.attention_kinds) if kind in _KINDS_OF_ATTENTION[a]
        )

    def row_shape(self, kind: PoolKind) -> tuple[int, ...]:
        """Shape of one page row of one layer of sub-pool ``kind``."""
        self.check_kind(kind)
        p, d, di = self.page_size, self.head_dim, self.indexer_head_dim
        if kind is PoolKind.FULL_KV:
            return (2, p, self.num_kv_heads, d)
        if kind is PoolKind.C4_STATE:
            return (self.c4_ring, 4 * d)
        if kind is PoolKind.C4_INDEXER_STATE:
            return (self.c4_ring, 4 * di)
        entries, width = self._kv_entries(kind)
        if self.kv_format is KVFormat.FLOAT:
            return (entries, width)
        return (self._fp8_row_bytes(kind, entries),)

    def row_dtype(self, kind: PoolKind) -> np.dtype:
        """Storage dtype of sub-pool ``kind`` (uint8 for FP8_DSV4 KV rows)."""
        self.check_kind(kind)
        if kind in (PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
            return np.dtype(np.float32)
        if self.kv_format is KVFormat.FP8_DSV4:
            return np.dtype(np.uint8)
        return _np_dtype(self.dtype)

    def row_bytes(self, kind: PoolKind) -> int:
        """Bytes of one page row of one layer of sub-pool ``kind``."""
        return math.prod(self.row_shape(kind)) * self.row_dtype(kind).itemsize

    def page_bytes(self, layer_map: StageLayers | None = None) -> int:
        """Bytes of one full page over every cached sub-pool.

        For the whole model, or for the layers of one stage when ``layer_map``
        is given. This is what storage and host tiers must size a page by (the
        full-page anchor itself holds no bytes).
        """
        if layer_map is not None and layer_map.spec != self:
            raise ValueError(f"layer map is for spec {layer_map.spec.name!r}, not {self.name!r}")
        total = 0
        for kind in self.kinds():
            n = len(self.layers_with(kind)) if layer_map is None else layer_map.num_layers_of(kind)
            total += n * self.row_bytes(kind)
        return total

    # -------------------------------------------------------------- internals

    def _kv_entries(self, kind: PoolKind) -> tuple[int, int]:
        """(entries per page, logical width) of a DSV4 KV-like sub-pool."""
        p, d = self.page_size, self.head_dim
        if kind is PoolKind.SWA_KV:
            return p, d
        if kind is PoolKind.C4_KV:
            return p // C4_RATIO, d
        if kind is PoolKind.C4_INDEXER:
            return p // C4_RATIO, self.indexer_head_dim
        if kind is PoolKind.C128_KV:
            hca = self.hca_ratio
            assert hca is not None
            return p // hca, d
        raise ValueError(f"{kind} is not a KV-like pool")

    @property
    def fp8_token_bytes(self) -> int:
        """Bytes of one token (entry) in an FP8_DSV4 KV row (584 for DSV4).

        A row of ``SWA_KV`` / ``C4_KV`` / ``C128_KV`` holds its entries back to back,
        entry ``i`` at bytes ``[i * fp8_token_bytes, (i + 1) * fp8_token_bytes)``:
        fp8 "nope" values, bf16 rope values, one UE8M0 scale per 64 nope values and
        one spare byte; zero padding after the last entry up to a multiple of 576.
        """
        nope = self.head_dim - self.rope_dim
        return nope + 2 * self.rope_dim + math.ceil(nope / _FP8_SCALE_GROUP) + 1

    def _fp8_row_bytes(self, kind: PoolKind, entries: int) -> int:
        if kind is PoolKind.C4_INDEXER:  # fp8 key + one fp32 scale per entry, unpadded
            return entries * (self.indexer_head_dim + 4)
        return _round_up(entries * self.fp8_token_bytes, _FP8_ROW_ALIGN)


def dsv4_ratios(num_layers: int, *, hca_ratio: int = 128) -> tuple[int, ...]:
    """DSV4 ratio pattern: layers 0-1 SWA, then even -> 4, odd -> HCA; plus the MTP 0."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    body = tuple(0 if g < 2 else (C4_RATIO if g % 2 == 0 else hca_ratio) for g in range(num_layers))
    return (*body, 0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp  # bfloat16 / float8 dtypes are registered by ml_dtypes via jax

    return np.dtype(jnp.dtype(name))
