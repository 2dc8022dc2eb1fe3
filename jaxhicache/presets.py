"""The presets of :class:`jaxhicache.spec.ModelCacheSpec`, from the models' public configs.

:class:`SpecPresets` is mixed into ``ModelCacheSpec`` (its classmethods build with
``cls(...)``), so ``ModelCacheSpec.glm5()`` is the way to call them; this module
knows the spec's fields, not its class, and so does not import ``spec``.

Presets by family:

* DSV4: ``deepseek_v4_flash()`` (43 layers, window 128, page 256, fp8 rows),
  ``tiny_dsv4()``;
* MLA + DSA: ``deepseek_v3_2()``, ``glm5()``, ``glm5_2()`` (61 / 78 / 78 layers, from
  the public configs), ``tiny_mla()``;
* recurrent hybrid: ``qwen3_next_80b_a3b()`` (48 layers, attention every 4th, from the
  public config), ``tiny_hybrid()``;
* MHA / GQA: ``mha()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Self, TypeVar, cast

from jaxhicache.kinds import (
    C4_RATIO,
    KVFormat,
    dsv4_ratios,
    hybrid_layer_kinds,
    mla_layer_kinds,
    shared_indexer_layers,
)
from jaxhicache.rows import RecurrentGeometry

__all__ = ["SpecPresets"]

_S = TypeVar("_S", bound="SpecPresets")


def _build(cls: type[_S], **fields: Any) -> _S:
    """``cls(**fields)``: the spec's constructor, which validates the fields."""
    return cls(**fields)


class SpecPresets:
    """Classmethod presets, mixed into ``ModelCacheSpec`` (abstract: never built itself)."""

    @classmethod
    def deepseek_v4_flash(cls) -> Self:
        """DeepSeek V4 Flash: 43 layers, window 128, page 256, fp8 rows.

        Returns:
          The spec (9,158,208 bytes per page).
        """
        return _build(
            cls,
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
    ) -> Self:
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
        return _build(
            cls,
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
    ) -> Self:
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
        return _build(
            cls,
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
    def deepseek_v3_2(cls, kv_format: KVFormat = KVFormat.FLOAT) -> Self:
        """DeepSeek V3.2: 61 MLA layers, each with its own DSA indexer; page 64.

        Public config: ``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, ``index_head_dim`` 128.

        Args:
          kv_format: ``FLOAT`` (bf16 latent, 1,152 B per token and layer) or ``FP8_MLA`` (656 B).

        Returns:
          The spec.
        """
        return cls._mla("deepseek-v3.2", 61, range(61), kv_format=kv_format)

    @classmethod
    def glm5(cls, kv_format: KVFormat = KVFormat.FLOAT) -> Self:
        """GLM-5 (``glm_moe_dsa``): 78 MLA layers, each with its own DSA indexer; page 64.

        Public config: as DeepSeek V3.2's latent and indexer; no ``indexer_types``.

        Args:
          kv_format: ``FLOAT`` (bf16 latent) or ``FP8_MLA`` (656 B per token and layer).

        Returns:
          The spec.
        """
        return cls._mla("glm-5", 78, range(78), kv_format=kv_format)

    @classmethod
    def glm5_2(cls, kv_format: KVFormat = KVFormat.FLOAT) -> Self:
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
    def qwen3_next_80b_a3b(cls, page_size: int = 64) -> Self:
        """Qwen3-Next-80B-A3B: 48 layers, GQA attention every 4th (16 q / 2 KV heads of 256),
        36 gated-DeltaNet layers (16 key / 32 value heads of 128, conv kernel 4); bf16,
        recurrent state fp32. 24,576 KV bytes per token, 77,266,944 bytes per snapshot.

        Args:
          page_size: tokens per page.

        Returns:
          The spec.
        """
        return cls.tiny_hybrid(
            48, page_size=page_size, num_kv_heads=2, head_dim=256, k_heads=16, v_heads=32,
            k_dim=128, v_dim=128, dtype="bfloat16", name="qwen3-next-80b-a3b",
        )  # fmt: skip

    @classmethod
    def tiny_hybrid(
        cls,
        num_layers: int = 8,
        *,
        full_attention_interval: int = 4,
        page_size: int = 16,
        num_kv_heads: int = 2,
        head_dim: int = 16,
        k_heads: int = 2,
        v_heads: int = 4,
        k_dim: int = 16,
        v_dim: int = 16,
        conv_kernel: int = 4,
        dtype: str = "float32",
        name: str | None = None,
    ) -> Self:
        """A recurrent hybrid (the tests' ``TinyHybridConfig.mini()`` shapes by default).

        Args:
          num_layers: model layers.
          full_attention_interval: layer ``i`` is full attention when ``(i + 1) % it == 0``.
          page_size: tokens per page.
          num_kv_heads: KV heads of the attention layers.
          head_dim: head dim of the attention layers.
          k_heads: linear-attention key heads.
          v_heads: linear-attention value heads.
          k_dim: linear-attention key head dim.
          v_dim: linear-attention value head dim.
          conv_kernel: causal conv width.
          dtype: dtype of the KV rows and conv states (recurrent states: fp32).
          name: model id; derived from the geometry when ``None``.

        Returns:
          The spec.
        """
        attention = cls.mha(num_layers, num_kv_heads, head_dim, page_size, dtype)
        return dataclasses.replace(  # the attention layers' pool, then the linear layers'
            cast(Any, attention),
            name=name or f"tiny-hybrid-l{num_layers}-i{full_attention_interval}-p{page_size}",
            layer_kinds=hybrid_layer_kinds(num_layers, full_attention_interval),
            recurrent=RecurrentGeometry(k_heads, v_heads, k_dim, v_dim, conv_kernel),
        )

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
    ) -> Self:
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
    ) -> Self:
        return _build(
            cls,
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
