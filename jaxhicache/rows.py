"""The bytes of one page row of one layer, for every sub-pool kind and KV format,
and the geometry each family's rows need.

Pure functions of a spec's geometry (:class:`RowGeometry`, which
:class:`jaxhicache.spec.ModelCacheSpec` satisfies; this module does not import
``spec``). The table of layouts is in :mod:`jaxhicache.kinds`.

Byte formats:

* FP8_DSV4 KV entry (``SWA_KV``, ``C4_KV``, ``C128_KV``): ``head_dim - rope_dim``
  fp8 "nope" values, ``rope_dim`` bf16 values, one UE8M0 scale per 64 nope values
  and one spare byte (584 B for DSV4); a row holds its entries back to back, zero
  padded to a multiple of 576 bytes.
* Indexer keys (``C4_INDEXER`` in FP8_DSV4, ``DSA_INDEXER`` always): fp8 keys and
  one fp32 scale per entry, unpadded (``DSA_INDEXER``: the page's keys, then its
  scales).
* FP8_MLA latent token: ``kv_lora_rank`` fp8 (e4m3) values, one fp32 scale per 128
  of them, then ``rope_dim`` bf16 RoPE-key values (656 B for DeepSeek V3.2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, final

import numpy as np

from jaxhicache.kinds import C4_RATIO, KVFormat, PoolKind

__all__ = [
    "FP8_MLA_SCALE_GROUP",
    "RecurrentGeometry",
    "RowGeometry",
    "check_dsv4_geometry",
    "check_hybrid_geometry",
    "check_mla_geometry",
    "fp8_mla_token_bytes",
    "fp8_token_bytes",
    "np_dtype",
    "row_dtype",
    "row_shape",
]

_FP8_ROW_ALIGN = 576  # DSV4 KV rows are padded to a multiple of 576 bytes
_FP8_SCALE_GROUP = 64  # one UE8M0 scale per 64 fp8 "nope" values
FP8_MLA_SCALE_GROUP = 128
"""FP8_MLA latent values per fp32 scale."""


@final
@dataclasses.dataclass(frozen=True)
class RecurrentGeometry:
    """The per-layer state of a linear-attention layer (gated DeltaNet, as in Qwen3-Next).

    A snapshot of one layer is a conv state ``(conv_dim, conv_kernel - 1)`` in the
    model dtype (the causal conv's last inputs) and a recurrent state
    ``(v_heads, k_dim, v_dim)`` in ``state_dtype``; ``conv_dim = 2 * k_heads * k_dim
    + v_heads * v_dim`` (the conv runs over q, k and v).

    Attributes:
      k_heads: query/key heads.
      v_heads: value heads (a multiple of ``k_heads``).
      k_dim: key head dim.
      v_dim: value head dim.
      conv_kernel: causal conv kernel width (4 in Qwen3-Next).
      state_dtype: dtype of the recurrent state (the reference keeps it in fp32).

    Raises:
      ValueError: a count below 1, ``v_heads`` not a multiple of ``k_heads``, a
        kernel below 2, or an unknown ``state_dtype``.
    """

    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int = 4
    state_dtype: str = "float32"

    def __post_init__(self):
        for f in ("k_heads", "v_heads", "k_dim", "v_dim"):
            if getattr(self, f) < 1:
                raise ValueError(f"RecurrentGeometry.{f} must be >= 1, got {getattr(self, f)}")
        if self.v_heads % self.k_heads:
            raise ValueError(
                f"RecurrentGeometry.v_heads={self.v_heads} must be a multiple of "
                f"k_heads={self.k_heads}"
            )
        if self.conv_kernel < 2:
            raise ValueError(f"RecurrentGeometry.conv_kernel must be >= 2, got {self.conv_kernel}")
        try:
            np_dtype(self.state_dtype)
        except TypeError:
            raise ValueError(f"unknown state_dtype {self.state_dtype!r}") from None

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: ``2 * k_heads * k_dim + v_heads * v_dim``."""
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim


class RowGeometry(Protocol):
    """What the row functions read of a spec (a :class:`~jaxhicache.spec.ModelCacheSpec`)."""

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        ...

    @property
    def window(self) -> int:
        """Sliding window (DSV4)."""
        ...

    @property
    def head_dim(self) -> int:
        """Row width ``D``."""
        ...

    @property
    def rope_dim(self) -> int:
        """The trailing RoPE slice."""
        ...

    @property
    def indexer_head_dim(self) -> int:
        """``D_I`` of an indexer key."""
        ...

    @property
    def num_kv_heads(self) -> int:
        """KV heads of an MHA row."""
        ...

    @property
    def c4_ring(self) -> int:
        """C4 compressor-state ring slots."""
        ...

    @property
    def kv_format(self) -> KVFormat:
        """FLOAT or a byte format."""
        ...

    @property
    def dtype(self) -> str:
        """Dtype name of FLOAT rows."""
        ...

    @property
    def recurrent(self) -> RecurrentGeometry | None:
        """The linear-attention state geometry (hybrid specs)."""
        ...

    @property
    def hca_ratio(self) -> int | None:
        """The HCA ratio, or ``None`` without HCA layers."""
        ...


def check_dsv4_geometry(g: RowGeometry, hca: int | None) -> None:
    """The geometry DSV4 rows need (the ratios themselves: ``kinds.check_dsv4_ratios``).

    Args:
      g: the spec's geometry.
      hca: the spec's HCA ratio, or ``None``.

    Raises:
      ValueError: more than one KV head, a RoPE slice that is odd or not inside
        ``head_dim``, no indexer width, a page that is not a multiple of 4, of the
        C4 ring (itself a multiple of 4, at least 8) and of the HCA ratio, or a
        window outside ``[4, page_size]``.
    """
    _check_shared_row(g, "DSV4")
    if g.indexer_head_dim < 1:
        raise ValueError(f"indexer_head_dim must be >= 1, got {g.indexer_head_dim}")
    if g.page_size % C4_RATIO:
        raise ValueError(f"page_size must be a multiple of 4, got {g.page_size}")
    if g.c4_ring % C4_RATIO or g.c4_ring < 2 * C4_RATIO:
        raise ValueError(f"c4_ring must be a multiple of 4 and >= 8, got {g.c4_ring}")
    if g.page_size % g.c4_ring:
        raise ValueError(f"page_size {g.page_size} must be a multiple of the C4 ring {g.c4_ring}")
    if hca and g.page_size % hca:
        raise ValueError(f"page_size {g.page_size} must be a multiple of the HCA ratio {hca}")
    if not C4_RATIO <= g.window <= g.page_size:
        raise ValueError(f"window must be in [4, page_size={g.page_size}], got {g.window}")


def check_mla_geometry(g: RowGeometry, *, has_indexer: bool) -> None:
    """The geometry MLA latent and DSA indexer rows need.

    Args:
      g: the spec's geometry (``head_dim = kv_lora_rank + rope_dim``).
      has_indexer: whether some layer owns a DSA indexer.

    Raises:
      ValueError: more than one KV head, a RoPE slice that is odd or not inside
        ``head_dim``, no indexer width where a layer owns an indexer, the FP8_DSV4
        format, or FP8_MLA with a latent that is not a multiple of 128.
    """
    _check_shared_row(g, "MLA")
    if has_indexer and g.indexer_head_dim < 1:
        raise ValueError(f"MLA_DSA layers need indexer_head_dim >= 1, got {g.indexer_head_dim}")
    if g.kv_format is KVFormat.FP8_DSV4:
        raise ValueError("MLA specs store FLOAT or FP8_MLA rows, got kv_format=FP8_DSV4")
    lat = g.head_dim - g.rope_dim
    if g.kv_format is KVFormat.FP8_MLA and lat % FP8_MLA_SCALE_GROUP:
        raise ValueError(
            f"FP8_MLA needs kv_lora_rank a multiple of {FP8_MLA_SCALE_GROUP}, got {lat}"
        )


def check_hybrid_geometry(g: RowGeometry) -> None:
    """The geometry a recurrent hybrid's rows need.

    Args:
      g: the spec's geometry (``num_kv_heads`` / ``head_dim``: its full-attention layers).

    Raises:
      ValueError: no ``recurrent`` geometry, or a byte KV format.
    """
    if g.recurrent is None:
        raise ValueError("a hybrid spec (LINEAR layers) needs its recurrent= geometry")
    if g.kv_format is not KVFormat.FLOAT:
        raise ValueError(f"hybrid specs store FLOAT rows, got kv_format={g.kv_format}")


def _check_shared_row(g: RowGeometry, family: str) -> None:
    """DSV4 and MLA cache one row per token shared by all heads, RoPE slice last."""
    if g.num_kv_heads != 1:
        raise ValueError(
            f"{family} caches one row per token for all heads (num_kv_heads=1), "
            f"got {g.num_kv_heads}"
        )
    if not 0 < g.rope_dim < g.head_dim or g.rope_dim % 2:
        raise ValueError(
            f"rope_dim must be even and in (0, head_dim={g.head_dim}), got {g.rope_dim}"
        )


def row_shape(g: RowGeometry, kind: PoolKind) -> tuple[int, ...]:
    """Shape of one page row of one layer of sub-pool ``kind``.

    Args:
      g: the spec's geometry.
      kind: the sub-pool (the caller checks that the spec caches it).

    Returns:
      The shape: logical for FLOAT rows, ``(bytes,)`` for byte rows.
    """
    p, d, di = g.page_size, g.head_dim, g.indexer_head_dim
    if kind in (PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE):  # one snapshot slot
        r = g.recurrent
        assert r is not None
        if kind is PoolKind.CONV_STATE:
            return (r.conv_dim, r.conv_kernel - 1)
        return (r.v_heads, r.k_dim, r.v_dim)
    if kind is PoolKind.FULL_KV:
        return (2, p, g.num_kv_heads, d)
    if kind is PoolKind.MLA_LATENT:
        if g.kv_format is KVFormat.FP8_MLA:
            return (p * fp8_mla_token_bytes(g),)
        return (p, d)
    if kind is PoolKind.DSA_INDEXER:  # page x D_I fp8 keys, then page x fp32 scales
        return (p * (di + 4),)
    if kind is PoolKind.C4_STATE:
        return (g.c4_ring, 4 * d)
    if kind is PoolKind.C4_INDEXER_STATE:
        return (g.c4_ring, 4 * di)
    entries, width = _kv_entries(g, kind)
    if g.kv_format is KVFormat.FLOAT:
        return (entries, width)
    if kind is PoolKind.C4_INDEXER:  # fp8 key + one fp32 scale per entry, unpadded
        return (entries * (di + 4),)
    return (-(-entries * fp8_token_bytes(g) // _FP8_ROW_ALIGN) * _FP8_ROW_ALIGN,)


def row_dtype(g: RowGeometry, kind: PoolKind) -> np.dtype:
    """Storage dtype of sub-pool ``kind``.

    Args:
      g: the spec's geometry.
      kind: the sub-pool.

    Returns:
      float32 for the compressor states, the state dtype for recurrent states,
      uint8 for byte rows (every FP8 format,
      DSA indexer keys), else the spec's dtype.
    """
    if kind in (PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
        return np.dtype(np.float32)
    if kind is PoolKind.RECURRENT_STATE:
        assert g.recurrent is not None
        return np_dtype(g.recurrent.state_dtype)
    if kind is PoolKind.DSA_INDEXER or g.kv_format is not KVFormat.FLOAT:
        return np.dtype(np.uint8)
    return np_dtype(g.dtype)


def fp8_token_bytes(g: RowGeometry) -> int:
    """Bytes of one entry of an FP8_DSV4 KV row (584 for DSV4; layout in the module doc).

    Args:
      g: the spec's geometry.

    Returns:
      The entry's bytes, before the row's padding.
    """
    nope = g.head_dim - g.rope_dim
    return nope + 2 * g.rope_dim + math.ceil(nope / _FP8_SCALE_GROUP) + 1


def fp8_mla_token_bytes(g: RowGeometry) -> int:
    """Bytes of one token of an FP8_MLA latent row (656 for DeepSeek V3.2).

    Args:
      g: the spec's geometry (``head_dim = kv_lora_rank + rope_dim``).

    Returns:
      ``kv_lora_rank + 4 * ceil(kv_lora_rank / 128) + 2 * rope_dim``.
    """
    lat = g.head_dim - g.rope_dim
    return lat + 4 * math.ceil(lat / FP8_MLA_SCALE_GROUP) + 2 * g.rope_dim


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype named ``name``, bfloat16 and the float8 types included.

    Args:
      name: a dtype name (``"float32"``, ``"bfloat16"``, ...).

    Returns:
      The dtype.

    Raises:
      TypeError: an unknown name.
    """
    import jax.numpy as jnp  # bfloat16 / float8 dtypes are registered by ml_dtypes via jax

    return np.dtype(jnp.dtype(name))


def _kv_entries(g: RowGeometry, kind: PoolKind) -> tuple[int, int]:
    """(entries per page, logical width) of a DSV4 KV-like sub-pool."""
    p, d = g.page_size, g.head_dim
    if kind is PoolKind.SWA_KV:
        return p, d
    if kind is PoolKind.C4_KV:
        return p // C4_RATIO, d
    if kind is PoolKind.C4_INDEXER:
        return p // C4_RATIO, g.indexer_head_dim
    if kind is PoolKind.C128_KV:
        assert g.hca_ratio is not None
        return p // g.hca_ratio, d
    raise ValueError(f"{kind} is not a KV-like pool")
