"""The vocabulary of cached state: page spaces, tiers, pool kinds, attention kinds.

Enums only, plus the two per-layer patterns the presets use. Which sub-pools a
layer has follows from its :class:`AttentionKind` alone (:func:`pool_kinds_of`);
which page-id space addresses a sub-pool, which of a prefix's pages a restore
needs and how its rows lie over ``'tp'`` follow from its :class:`PoolKind`.
:mod:`jaxhicache.spec` builds a model's geometry on these and re-exports them.

Pool rows (one page of one layer)::

    kind              page space  hit policy      FLOAT row           FP8_DSV4 row
    SWA_KV            SWA         trailing pages  (page, D)           uint8 bytes, 584 B/token, padded to 576
    C4_KV             FULL        all pages       (page/4, D)         uint8, same token format
    C4_INDEXER        FULL        all pages       (page/4, D_I)       uint8, D_I fp8 + fp32 scale per entry
    C128_KV           FULL        all pages       (page/hca, D)       uint8, 584 B/entry, padded to 576
    C4_STATE          SWA         trailing pages  (ring, 4*D) fp32    same
    C4_INDEXER_STATE  SWA         trailing pages  (ring, 4*D_I) fp32  same
    FULL_KV (MHA)     FULL        all pages       (2, page, H_kv, hd) dtype

    kind              page space  hit policy      FLOAT row           FP8_MLA row
    MLA_LATENT        FULL        all pages       (page, L + R)       uint8, L fp8 + L/128 fp32 scales + R bf16
    DSA_INDEXER       FULL        all pages       uint8 bytes: page x D_I fp8 keys, then page x fp32 scales

Over ``'tp'`` every sub-pool is replicated (:attr:`PoolKind.tp_sharding`) except
MHA ``FULL_KV``, whose KV heads are split: a replicated pool is one copy per
stage in host slabs and L3 objects, whatever the TP size.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "C4_RATIO",
    "C4_RING",
    "AttentionKind",
    "HitPolicy",
    "KVFormat",
    "PageSpace",
    "PoolKind",
    "TPSharding",
    "Tier",
    "check_dsv4_ratios",
    "check_mla_layer_kinds",
    "dsv4_ratios",
    "mla_layer_kinds",
    "pool_kinds_of",
    "shared_indexer_layers",
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


class TPSharding(enum.StrEnum):
    """How a sub-pool's rows are laid over the ``'tp'`` mesh axis."""

    REPLICATED = "replicated"  # every TP rank holds the whole row (MQA / MLA latent)
    HEADS = "heads"  # the row's KV heads are split over the TP ranks (MHA/GQA)


class PoolKind(enum.StrEnum):
    """A sub-pool of cached per-layer state."""

    SWA_KV = "swa_kv"
    C4_KV = "c4_kv"
    C4_INDEXER = "c4_indexer"
    C128_KV = "c128_kv"  # the HCA pool, whatever the HCA ratio of the spec
    C4_STATE = "c4_state"
    C4_INDEXER_STATE = "c4_indexer_state"
    FULL_KV = "full_kv"
    MLA_LATENT = "mla_latent"  # MLA: compressed latent + decoupled RoPE key per token
    DSA_INDEXER = "dsa_indexer"  # DSA lightning-indexer keys: fp8 + fp32 scale per token

    @property
    def tp_sharding(self) -> TPSharding:
        """Whether TP ranks hold the whole row (replicated) or a slice of its heads."""
        return TPSharding.HEADS if self is PoolKind.FULL_KV else TPSharding.REPLICATED

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
    MLA = 4  # multi-head latent attention; sparse layers reuse another layer's indexer
    MLA_DSA = 5  # MLA with its own DSA lightning indexer (owns an indexer-key pool)


class KVFormat(enum.Enum):
    """How KV rows are stored."""

    FLOAT = "float"  # logical arrays in ``ModelCacheSpec.dtype`` (tiny test models)
    FP8_DSV4 = "fp8_dsv4"  # DSV4 byte rows: fp8 nope + bf16 rope + scales, uint8 storage
    FP8_MLA = "fp8_mla"  # MLA latent byte rows: fp8 latent + fp32 scales + bf16 rope, uint8


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
    AttentionKind.MLA: (PoolKind.MLA_LATENT,),
    AttentionKind.MLA_DSA: (PoolKind.MLA_LATENT, PoolKind.DSA_INDEXER),
}


def pool_kinds_of(attention: AttentionKind) -> tuple[PoolKind, ...]:
    """Sub-pools a layer of an attention kind has a row in.

    Args:
      attention: the layer's kind (or its int value).

    Returns:
      The pool kinds, in canonical order.
    """
    return _KINDS_OF_ATTENTION[AttentionKind(attention)]


C4_RATIO = 4
"""Compression ratio of CSA (C4) layers; fixed by DSV4 (it carries the A/B overlap)."""
C4_RING = 8
"""Default C4 compressor-state ring: slots per SWA page (2 x the ratio)."""


def dsv4_ratios(num_layers: int, *, hca_ratio: int = 128) -> tuple[int, ...]:
    """DSV4's ratio pattern: layers 0-1 SWA, then even -> 4, odd -> HCA; plus the MTP 0.

    Args:
      num_layers: model layers.
      hca_ratio: the HCA layers' ratio.

    Returns:
      ``num_layers + 1`` ratios.

    Raises:
      ValueError: ``num_layers`` < 1.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    body = tuple(0 if g < 2 else (C4_RATIO if g % 2 == 0 else hca_ratio) for g in range(num_layers))
    return (*body, 0)


def mla_layer_kinds(num_layers: int, indexer_layers: Iterable[int]) -> tuple[AttentionKind, ...]:
    """Per-layer kinds of an MLA model: MLA_DSA where a layer owns an indexer, else MLA.

    Args:
      num_layers: model layers.
      indexer_layers: global ids of the layers that own a DSA indexer.

    Returns:
      One :class:`AttentionKind` per global layer.

    Raises:
      ValueError: an id that is not an integer in ``[0, num_layers)``.
    """
    owners = set()
    for g in indexer_layers:
        if isinstance(g, bool) or not isinstance(g, int | np.integer) or not 0 <= g < num_layers:
            raise ValueError(f"indexer layer {g!r} is not a layer id in [0, {num_layers})")
        owners.add(int(g))
    return tuple(
        AttentionKind.MLA_DSA if g in owners else AttentionKind.MLA for g in range(num_layers)
    )


def shared_indexer_layers(num_layers: int, *, freq: int, offset: int) -> tuple[int, ...]:
    """Layers that own a DSA indexer when the others share one (GLM-5.2's rule).

    Layer ``i`` owns one when ``max(i - offset + 1, 0) % freq == 0``: every layer
    before ``offset``, then every ``freq``-th (``index_topk_freq`` and
    ``index_skip_topk_offset`` of the public config).

    Args:
      num_layers: model layers.
      freq: one owning layer every ``freq`` layers after the first ``offset``.
      offset: the first ``offset`` layers all own one.

    Returns:
      The owning global layer ids, ascending.

    Raises:
      ValueError: ``freq`` < 1 or ``offset`` < 0.
    """
    if freq < 1 or offset < 0:
        raise ValueError(f"need freq >= 1 and offset >= 0, got freq={freq}, offset={offset}")
    return tuple(i for i in range(num_layers) if max(i - offset + 1, 0) % freq == 0)


def check_dsv4_ratios(ratios: Sequence[int], num_layers: int) -> int | None:
    """Validates DSV4 per-layer compression ratios (the MTP slot last).

    Args:
      ratios: one ratio per layer plus the trailing MTP slot.
      num_layers: model layers.

    Returns:
      The HCA ratio, or ``None`` when no layer is HCA.

    Raises:
      ValueError: a wrong length, a non-zero MTP slot, a ratio other than 0, 4 or
        one HCA ratio > 4.
    """
    if len(ratios) != num_layers + 1:
        raise ValueError(
            f"compress_ratios must have num_layers + 1 = {num_layers + 1} entries "
            f"(the last is the MTP slot), got {len(ratios)}"
        )
    if ratios[-1] != 0:
        raise ValueError(f"the trailing MTP entry of compress_ratios must be 0, got {ratios[-1]}")
    bad = sorted({r for r in ratios if r not in (0, C4_RATIO) and r <= C4_RATIO})
    if bad:
        raise ValueError(f"compress ratios must be 0, 4 or one HCA ratio > 4; got {bad}")
    hca = sorted({r for r in ratios if r > C4_RATIO})
    if len(hca) > 1:
        raise ValueError(f"a spec has at most one HCA ratio, got {hca}")
    return hca[0] if hca else None


def check_mla_layer_kinds(
    kinds: Sequence[AttentionKind], num_layers: int
) -> tuple[AttentionKind, ...]:
    """Validates the per-layer kinds of an MLA spec.

    Args:
      kinds: one kind per layer (``AttentionKind`` or its int value).
      num_layers: model layers.

    Returns:
      The kinds as a tuple of :class:`AttentionKind`.

    Raises:
      ValueError: a wrong length, or a kind other than MLA / MLA_DSA.
    """
    try:
        out = tuple(AttentionKind(k) for k in kinds)
    except ValueError as e:
        raise ValueError(f"layer_kinds: {e}") from None
    if len(out) != num_layers:
        raise ValueError(f"layer_kinds has {len(out)} entries, num_layers is {num_layers}")
    bad = sorted(k.name for k in set(out) - {AttentionKind.MLA, AttentionKind.MLA_DSA})
    if bad:
        raise ValueError(f"layer_kinds must be MLA or MLA_DSA, got {bad}")
    return out
