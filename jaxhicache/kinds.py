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

    kind              space       hit policy      row (one snapshot slot of one layer)
    CONV_STATE        STATE       end snapshot    (conv_dim, kernel - 1) in the model dtype
    RECURRENT_STATE   STATE       end snapshot    (v_heads, k_dim, v_dim) in the state dtype (fp32)

Over ``'tp'`` a sub-pool is replicated or split along one row axis
(:attr:`PoolKind.tp_sharding`, :attr:`PoolKind.tp_axis`): MHA ``FULL_KV`` splits its
KV heads, the recurrent states their channels / value heads; everything else is
replicated, so host slabs and L3 objects hold it once per stage, whatever the TP size.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "C4_RATIO",
    "C4_RING",
    "PAGE_SPACES",
    "AttentionKind",
    "HitPolicy",
    "KVFormat",
    "PageSpace",
    "PoolKind",
    "TPSharding",
    "Tier",
    "check_dsv4_ratios",
    "check_layer_kinds",
    "dsv4_ratios",
    "hybrid_layer_kinds",
    "mla_layer_kinds",
    "pool_kinds_of",
    "shared_indexer_layers",
]


class PageSpace(enum.StrEnum):
    """Which page-id space addresses a sub-pool's rows."""

    FULL = "full"  # one id per token page of the prefix (the anchor's ids)
    SWA = "swa"  # sliding-window pages: only the trailing ones are kept
    STATE = "state"  # recurrent-state snapshot slots: one per snapshot, at a node end


PAGE_SPACES = (PageSpace.FULL, PageSpace.SWA)
"""The page-addressed spaces (one id per token page); ``STATE`` holds snapshot slots."""


class Tier(enum.StrEnum):
    """Where a cached page lives: device pools (L1), host slabs (L2), shared storage (L3)."""

    DEVICE = "device"
    HOST = "host"
    STORAGE = "storage"


class HitPolicy(enum.StrEnum):
    """Which pages of a prefix a restore needs from a sub-pool (DESIGN §4)."""

    ALL_PAGES = "all_pages"
    TRAILING_PAGES = "trailing_pages"
    END_SNAPSHOT = "end_snapshot"  # one snapshot, taken exactly at the hit's end


class TPSharding(enum.StrEnum):
    """How a sub-pool's rows are laid over the ``'tp'`` mesh axis."""

    REPLICATED = "replicated"  # every TP rank holds the whole row (MQA / MLA latent)
    HEADS = "heads"  # the row's heads (or channels) are split over the TP ranks


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
    CONV_STATE = "conv_state"  # linear attention: the causal conv's last kernel-1 inputs
    RECURRENT_STATE = "recurrent_state"  # linear attention: the recurrent state per v head

    @property
    def tp_sharding(self) -> TPSharding:
        """Whether TP ranks hold the whole row (replicated) or a slice of its heads."""
        return TPSharding.REPLICATED if self.tp_axis is None else TPSharding.HEADS

    @property
    def tp_axis(self) -> int | None:
        """The row axis split over ``'tp'`` (``None``: replicated).

        ``FULL_KV`` rows ``(2, page, heads, head_dim)`` split their KV heads (axis 2);
        ``CONV_STATE`` rows ``(conv_dim, kernel - 1)`` their channels (axis 0, rank-major:
        rank ``r`` holds its own q, k and v channels as one block) and
        ``RECURRENT_STATE`` rows ``(v_heads, k_dim, v_dim)`` their value heads (axis 0).
        """
        return _TP_AXIS.get(self)

    @property
    def page_space(self) -> PageSpace:
        """The id space that addresses this kind's rows (full pages, SWA pages, state slots)."""
        if self in (PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
            return PageSpace.SWA
        if self in (PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE):
            return PageSpace.STATE
        return PageSpace.FULL

    @property
    def hit_policy(self) -> HitPolicy:
        """Which pages of a prefix a restore needs: all, the trailing window's, or the end's snapshot."""
        if self.page_space is PageSpace.SWA:
            return HitPolicy.TRAILING_PAGES
        if self.page_space is PageSpace.STATE:
            return HitPolicy.END_SNAPSHOT
        return HitPolicy.ALL_PAGES


_TP_AXIS = {PoolKind.FULL_KV: 2, PoolKind.CONV_STATE: 0, PoolKind.RECURRENT_STATE: 0}


class AttentionKind(enum.IntEnum):
    """Attention of one layer; the int value is the branch index used in traced code."""

    SWA = 0  # DSV4 ratio 0: sliding window only
    CSA = 1  # DSV4 ratio 4: overlapping compressor + lightning indexer (+ SWA)
    HCA = 2  # DSV4 HCA ratio (128): disjoint compressor, dense compressed attention (+ SWA)
    FULL = 3  # ordinary MHA/GQA attention over the whole prefix
    MLA = 4  # multi-head latent attention; sparse layers reuse another layer's indexer
    MLA_DSA = 5  # MLA with its own DSA lightning indexer (owns an indexer-key pool)
    LINEAR = 6  # linear attention with a recurrent state (gated DeltaNet, Mamba2)


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
    AttentionKind.LINEAR: (PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE),
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


_FAMILIES = {
    "MLA": frozenset({AttentionKind.MLA, AttentionKind.MLA_DSA}),
    "hybrid": frozenset({AttentionKind.FULL, AttentionKind.LINEAR}),
}


def check_layer_kinds(
    kinds: Sequence[AttentionKind], num_layers: int
) -> tuple[str, tuple[AttentionKind, ...]]:
    """Validates explicit per-layer kinds: one family, one kind per layer.

    Families: ``"MLA"`` (MLA / MLA_DSA layers) and ``"hybrid"`` (LINEAR layers with
    recurrent states and FULL attention layers; at least one LINEAR).

    Args:
      kinds: one kind per layer (``AttentionKind`` or its int value).
      num_layers: model layers.

    Returns:
      ``(family, kinds as a tuple of AttentionKind)``.

    Raises:
      ValueError: a wrong length, an unknown kind, or kinds of no single family.
    """
    try:
        out = tuple(AttentionKind(k) for k in kinds)
    except ValueError as e:
        raise ValueError(f"layer_kinds: {e}") from None
    if len(out) != num_layers:
        raise ValueError(f"layer_kinds has {len(out)} entries, num_layers is {num_layers}")
    for family, allowed in _FAMILIES.items():
        if set(out) <= allowed and (family != "hybrid" or AttentionKind.LINEAR in out):
            return family, out
    raise ValueError(
        f"layer_kinds must be MLA / MLA_DSA, or LINEAR with FULL; got {sorted({k.name for k in out})}"
    )


def hybrid_layer_kinds(num_layers: int, full_attention_interval: int) -> tuple[AttentionKind, ...]:
    """Per-layer kinds of a recurrent hybrid: FULL every ``interval``-th layer, else LINEAR.

    Layer ``i`` is full attention when ``(i + 1) % interval == 0`` (Qwen3-Next:
    ``full_attention_interval`` 4, layers 3, 7, ..., 47).

    Args:
      num_layers: model layers.
      full_attention_interval: one full-attention layer per this many layers.

    Returns:
      One :class:`AttentionKind` per global layer.

    Raises:
      ValueError: an interval < 2 (no linear layer would be left).
    """
    if full_attention_interval < 2:
        raise ValueError(f"full_attention_interval must be >= 2, got {full_attention_interval}")
    return tuple(
        AttentionKind.FULL if (i + 1) % full_attention_interval == 0 else AttentionKind.LINEAR
        for i in range(num_layers)
    )
