"""Configuration of the tiny MLA + DSA test model (GLM-5 / DeepSeek V3.2 family).

:class:`TinyMLAConfig` is a frozen, validated dataclass; construction raises
``ValueError`` naming the bad field and value.  Its cache geometry is derived
once, at construction, with :meth:`jaxhicache.spec.ModelCacheSpec.tiny_mla`
(:meth:`TinyMLAConfig.cache_spec`): per layer one ``MLA_LATENT`` row
``(page, kv_lora_rank + rope_dim)``, and on the layers that own a DSA indexer
(``indexer_layers``, kind ``MLA_DSA``) one ``DSA_INDEXER`` byte row.  The
other layers (kind ``MLA``) reuse the selection of the nearest preceding owner,
so layer 0 must own one.

Presets: :meth:`TinyMLAConfig.mini` (every layer owns an indexer, like
DeepSeek V3.2 and GLM-5) and :meth:`TinyMLAConfig.shared` (owners 0 and 2 of 4,
like GLM-5.2's shared indexers: the indexer sub-pool ids differ from the
stage-local ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxhicache.spec import AttentionKind, ModelCacheSpec

__all__ = ["FP8_MAX", "TinyMLAConfig"]

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: the indexer key scale maps a token's amax onto it."""


@dataclasses.dataclass(frozen=True)
class TinyMLAConfig:
    """Hyper-parameters of the tiny MLA + DSA model (all fp32).

    ``indexer_layers``: global ids of the layers owning a DSA indexer (``None``:
    every layer).  ``qk_nope_dim`` / ``rope_dim``: the non-rotary and rotary
    parts of a query/key head; ``v_head_dim``: a value head; ``kv_lora_rank``:
    the cached latent.  ``index_heads`` × ``index_head_dim``: the indexer's
    queries (one key per token, its trailing ``rope_dim`` channels rotated);
    ``index_topk``: tokens each query attends to.
    """

    num_layers: int
    indexer_layers: tuple[int, ...] | None
    hidden: int
    vocab: int
    num_heads: int
    qk_nope_dim: int
    rope_dim: int
    v_head_dim: int
    q_lora: int
    kv_lora_rank: int
    page_size: int
    index_heads: int
    index_head_dim: int
    index_topk: int
    mlp_hidden: int
    rope_theta: float = 10000.0
    eps: float = 1e-6
    kv_norm_scale: float = 2.0  # init scale of the latent's norm weight (sharper attention)

    # ------------------------------------------------------------------ presets
    @classmethod
    def mini(cls, num_layers: int = 4, **overrides) -> TinyMLAConfig:
        """Fast-test dims (d 32, page 16, latent 32, RoPE 8, 2 indexer heads of 16, top-8)."""
        fields = dict(
            num_layers=num_layers,
            indexer_layers=None,
            hidden=32,
            vocab=128,
            num_heads=4,
            qk_nope_dim=16,
            rope_dim=8,
            v_head_dim=16,
            q_lora=32,
            kv_lora_rank=32,
            page_size=16,
            index_heads=2,
            index_head_dim=16,
            index_topk=8,
            mlp_hidden=64,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def shared(cls, num_layers: int = 4, **overrides) -> TinyMLAConfig:
        """:meth:`mini` with indexers on layers 0 and 2 only (the others share them)."""
        overrides.setdefault("indexer_layers", (0, 2))
        return cls.mini(num_layers, **overrides)

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"TinyMLAConfig.{name}={value!r}: {why}")

        positive = (
            "num_layers",
            "hidden",
            "vocab",
            "num_heads",
            "qk_nope_dim",
            "rope_dim",
            "v_head_dim",
            "q_lora",
            "kv_lora_rank",
            "page_size",
            "index_heads",
            "index_head_dim",
            "index_topk",
            "mlp_hidden",
        )
        for name in positive:
            value = getattr(self, name)
            if type(value) is bool or not isinstance(value, int) or value <= 0:
                bad(name, value, "must be a positive int")
        if self.rope_dim % 2:
            bad("rope_dim", self.rope_dim, "must be even (interleaved pairs)")
        if self.rope_dim > self.index_head_dim:
            bad("rope_dim", self.rope_dim, f"must be <= index_head_dim={self.index_head_dim}")
        if self.eps <= 0:
            bad("eps", self.eps, "must be > 0")
        owners = self.indexer_layers
        if owners is not None:
            if isinstance(owners, str | bytes) or not isinstance(owners, Sequence):
                bad("indexer_layers", owners, "must be a sequence of layer ids or None")
            for g in owners:
                if type(g) is bool or not isinstance(g, int | np.integer):
                    bad("indexer_layers", owners, f"{g!r} is not an int")
            owners = tuple(sorted({int(g) for g in owners}))
            object.__setattr__(self, "indexer_layers", owners)
        try:
            spec = ModelCacheSpec.tiny_mla(
                self.num_layers,
                page_size=self.page_size,
                kv_lora_rank=self.kv_lora_rank,
                rope_dim=self.rope_dim,
                indexer_head_dim=self.index_head_dim,
                indexer_layers=owners,
            )
        except ValueError as e:
            raise ValueError(f"TinyMLAConfig: no valid cache spec: {e}") from e
        if spec.attention_kinds[0] is not AttentionKind.MLA_DSA:
            bad("indexer_layers", owners, "layer 0 must own an indexer (the others reuse one)")
        object.__setattr__(self, "_spec", spec)

    # ---------------------------------------------------------------- derived
    def cache_spec(self, name: str | None = None) -> ModelCacheSpec:
        """The model's :class:`ModelCacheSpec` (FLOAT latent rows), built once at construction.

        ``name`` only renames it (the storage-key namespace).
        """
        spec = self._spec
        return spec if name is None or name == spec.name else dataclasses.replace(spec, name=name)

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """Per global layer: ``MLA_DSA`` (owns an indexer) or ``MLA`` (reuses one)."""
        return self._spec.attention_kinds

    @property
    def owner_layers(self) -> tuple[int, ...]:
        """Global ids of the layers that own an indexer, ascending."""
        return tuple(g for g, a in enumerate(self.attention_kinds) if a is AttentionKind.MLA_DSA)

    @property
    def latent_dim(self) -> int:
        """Width of a cached latent row: ``kv_lora_rank + rope_dim``."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key head width: ``qk_nope_dim + rope_dim``."""
        return self.qk_nope_dim + self.rope_dim

    @property
    def index_row_bytes(self) -> int:
        """Bytes of one token in a ``DSA_INDEXER`` row: ``index_head_dim`` fp8 + one fp32."""
        return self.index_head_dim + 4
