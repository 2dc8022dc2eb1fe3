"""Configuration of the tiny DeepSeek-V4-style test model (``TinyDSV4Config``).

The config is a frozen, validated dataclass.  Construction checks the invariants
of ``DSV4_MODEL.md`` §8.3 that the cache semantics depend on and raises
``ValueError`` naming the offending field and value.

Two presets:

* :meth:`TinyDSV4Config.tiny_faithful` keeps DSV4's structural constants
  (window 128, page 256, C4 ratio 4, HCA ratio 128, C4 ring 8) at width 64.
* :meth:`TinyDSV4Config.mini` scales them down for fast tests (window 8, page 16,
  HCA ratio 8) while keeping DSV4's proportions (page = 2W, HCA ratio = W).

The cache geometry is derived in one place: :meth:`TinyDSV4Config.cache_spec`,
the :class:`~jaxhicache.spec.ModelCacheSpec` built with
:meth:`~jaxhicache.spec.ModelCacheSpec.tiny_dsv4` when the config is
constructed.  The ratio list with its MTP slot, the C4 ratio and ring, the
trailing SWA pages of a restore and the C4/HCA layer ids are all read from it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxhicache.spec import C4_RATIO, C4_RING, AttentionKind, ModelCacheSpec, dsv4_ratios

__all__ = ["C4_RATIO", "C4_RING", "TinyDSV4Config", "dsv4_ratio_pattern"]


def dsv4_ratio_pattern(num_layers: int, hca_ratio: int) -> tuple[int, ...]:
    """DSV4's layer pattern without the MTP slot (:func:`jaxhicache.spec.dsv4_ratios`)."""
    return dsv4_ratios(num_layers, hca_ratio=hca_ratio)[:-1]


@dataclasses.dataclass(frozen=True)
class TinyDSV4Config:
    """Hyper-parameters of the tiny DSV4 model (all fp32).

    ``compress_ratios`` has one entry per transformer layer (no trailing MTP
    slot).  Everything the cache depends on (ratios with the MTP slot, window,
    page, ring, trailing SWA pages, C4/HCA layer ids) is read from the one
    :class:`~jaxhicache.spec.ModelCacheSpec` that :meth:`cache_spec` derives,
    built when the config is constructed.
    """

    compress_ratios: tuple[int, ...]
    hidden: int  # d
    vocab: int
    num_heads: int  # H (query heads; one shared K=V head)
    head_dim: int  # D
    rope_dim: int  # R, trailing slice of every head (and of the indexer head)
    q_lora: int
    o_groups: int  # G
    o_lora: int
    window: int  # W, keys per query including itself
    page_size: int
    hca_ratio: int
    index_heads: int  # H_I
    index_head_dim: int  # D_I
    index_topk: int  # K
    mlp_hidden: int
    rope_theta: float = 10000.0  # ratio-0 layers
    compress_rope_theta: float = 160000.0  # ratio-4 and HCA layers
    eps: float = 1e-6
    kv_norm_scale: float = 2.0  # init scale of kv / compressor norm weights (sharper attention)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny_faithful(cls, num_layers: int = 6, **overrides) -> TinyDSV4Config:
        """DSV4's structural constants (W 128, page 256, ratios 4/128) at width 64."""
        hca = overrides.get("hca_ratio", 128)
        fields = dict(
            compress_ratios=dsv4_ratio_pattern(num_layers, hca),
            hidden=64,
            vocab=512,
            num_heads=4,
            head_dim=32,
            rope_dim=8,
            q_lora=32,
            o_groups=2,
            o_lora=16,
            window=128,
            page_size=256,
            hca_ratio=hca,
            index_heads=4,
            index_head_dim=16,
            index_topk=8,
            mlp_hidden=128,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def mini(cls, num_layers: int = 6, **overrides) -> TinyDSV4Config:
        """Scaled-down constants for fast tests: W 8, page 16, ratios 4/8, K 4."""
        hca = overrides.get("hca_ratio", 8)
        fields = dict(
            compress_ratios=dsv4_ratio_pattern(num_layers, hca),
            hidden=32,
            vocab=128,
            num_heads=4,
            head_dim=16,
            rope_dim=8,
            q_lora=16,
            o_groups=2,
            o_lora=8,
            window=8,
            page_size=16,
            hca_ratio=hca,
            index_heads=4,
            index_head_dim=16,
            index_topk=4,
            mlp_hidden=64,
        )
        fields.update(overrides)
        return cls(**fields)

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"TinyDSV4Config.{name}={value!r}: {why}")

        ratios = tuple(self.compress_ratios)
        for i, r in enumerate(ratios):  # exact integers only: 4.5 must not become 4
            if type(r) is bool or not isinstance(r, int | np.integer):
                bad(
                    "compress_ratios",
                    self.compress_ratios,
                    f"layer {i}'s ratio {r!r} is not an int",
                )
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in ratios))

        positive = (
            "hidden",
            "vocab",
            "num_heads",
            "head_dim",
            "rope_dim",
            "q_lora",
            "o_groups",
            "o_lora",
            "window",
            "page_size",
            "hca_ratio",
            "index_heads",
            "index_head_dim",
            "index_topk",
            "mlp_hidden",
        )
        for name in positive:
            value = getattr(self, name)
            if type(value) is bool or not isinstance(value, int) or value <= 0:
                bad(name, value, "must be a positive int")
        if not self.compress_ratios:
            bad("compress_ratios", self.compress_ratios, "needs at least one layer")
        allowed = {0, C4_RATIO, self.hca_ratio}
        for i, r in enumerate(self.compress_ratios):
            if r not in allowed:
                bad(
                    "compress_ratios",
                    self.compress_ratios,
                    f"layer {i} has ratio {r}, not in {sorted(allowed)}",
                )
        if self.rope_dim % 2:
            bad("rope_dim", self.rope_dim, "must be even (interleaved pairs)")
        if self.rope_dim >= self.head_dim:
            bad("rope_dim", self.rope_dim, f"must be < head_dim={self.head_dim} (nope/rope split)")
        if self.rope_dim > self.index_head_dim:
            bad("rope_dim", self.rope_dim, f"must be <= index_head_dim={self.index_head_dim}")
        if self.num_heads % self.o_groups:
            bad("o_groups", self.o_groups, f"must divide num_heads={self.num_heads}")
        # §8.3 invariants
        if self.hca_ratio <= C4_RATIO:  # 6: HCA is > 4 and non-overlapping
            bad(
                "hca_ratio",
                self.hca_ratio,
                f"must be > {C4_RATIO} (HCA is the non-overlapping kind)",
            )
        if self.page_size % self.hca_ratio:  # 1
            bad("page_size", self.page_size, f"must be a multiple of hca_ratio={self.hca_ratio}")
        if self.page_size % C4_RATIO:  # 2
            bad("page_size", self.page_size, f"must be a multiple of the C4 ratio {C4_RATIO}")
        if self.page_size % C4_RING:  # 3 (ring % ratio holds by construction: 8 % 4 == 0)
            bad("page_size", self.page_size, f"must be a multiple of the C4 ring size {C4_RING}")
        if self.window < C4_RATIO:  # 4
            bad("window", self.window, f"must be >= {C4_RATIO}")
        # 7 (K << n_4(t)) depends on sequence length: see ``sparse_indexer_from``.
        if self.eps <= 0:
            bad("eps", self.eps, "must be > 0")
        # the cache spec (the one derivation); it also enforces 5 (W <= page)
        try:
            spec = ModelCacheSpec.tiny_dsv4(
                self.num_layers,
                window=self.window,
                page_size=self.page_size,
                hca_ratio=self.hca_ratio,
                head_dim=self.head_dim,
                rope_dim=self.rope_dim,
                indexer_head_dim=self.index_head_dim,
                compress_ratios=self.compress_ratios,
            )
        except ValueError as e:
            raise ValueError(f"TinyDSV4Config: no valid cache spec: {e}") from e
        object.__setattr__(self, "_spec", spec)

    # ---------------------------------------------------------------- derived
    def cache_spec(self, name: str | None = None) -> ModelCacheSpec:
        """The library's :class:`ModelCacheSpec` (FLOAT rows) of this config.

        Built once, in ``__post_init__``, with :meth:`ModelCacheSpec.tiny_dsv4`;
        ``name`` only renames it (the storage-key namespace).
        """
        spec = self._spec
        return spec if name is None or name == spec.name else dataclasses.replace(spec, name=name)

    @property
    def num_layers(self) -> int:
        return len(self.compress_ratios)

    @property
    def c4_ratio(self) -> int:
        return C4_RATIO

    @property
    def c4_ring(self) -> int:
        return self._spec.c4_ring

    def cache_compress_ratios(self) -> tuple[int, ...]:
        """DSV4's ``compress_ratios`` convention: one entry per layer plus the MTP slot (0)."""
        return self._spec.compress_ratios

    def layer_theta(self, layer: int) -> float:
        return self.compress_rope_theta if self.compress_ratios[layer] else self.rope_theta

    @property
    def c4_layers(self) -> tuple[int, ...]:
        return self._layers_of(AttentionKind.CSA)

    @property
    def hca_layers(self) -> tuple[int, ...]:
        return self._layers_of(AttentionKind.HCA)

    def _layers_of(self, kind: AttentionKind) -> tuple[int, ...]:
        return tuple(g for g, a in enumerate(self._spec.attention_kinds) if a is kind)

    @property
    def swa_trailing_pages(self) -> int:
        """SWA pages before a restore point that a restore needs (the spec's rule)."""
        return self._spec.swa_trailing_pages

    @property
    def sparse_indexer_from(self) -> int:
        """First query position at which the indexer selects a strict subset (n_4(t) > K)."""
        return C4_RATIO * (self.index_topk + 1) - 1
