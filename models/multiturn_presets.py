"""The main job's model presets: one per model family and size.

Each :class:`ModelPreset` knows everything family-specific the job needs, so the
job itself only talks to :class:`~models.protocol.ServableModel` and ``HiCache``:

* how to build its model (:meth:`ModelPreset.model_config`,
  :meth:`ModelPreset.build_model`: config, random weights of seed 0, the paged model);
* its cache knobs (:meth:`ModelPreset.cache_fields`: ``HiCacheConfig`` fields, such
  as the recurrent hybrid's ``state_interval``);
* whether its cache can have an L3 tier (:attr:`ModelPreset.l3_refusal`);
* its workload defaults (:meth:`ModelPreset.workload`).

+-----------------+--------+-----------------------------------------------------------+
| preset          | family | model                                                     |
+=================+========+===========================================================+
| ``bench``       | dsv4   | page 64, W 32, hidden 256, 8 layers (the default)         |
| ``small``       | dsv4   | page 32, W 16, hidden 128, 6 layers (``--quick``)          |
| ``tiny``        | dsv4   | the mini preset, 4 layers (tests)                         |
| ``mla``         | mla    | MLA + DSA, page 64, hidden 256, 8 layers, latent 64,      |
|                 |        | top-256 of the indexer's fp8 keys                         |
| ``mla-tiny``    | mla    | ``TinyMLAConfig.mini()``, 4 layers (tests)                |
| ``hybrid``      | hybrid | gated DeltaNet + full attention, page 64, hidden 128,     |
|                 |        | 8 layers, snapshots every 128 tokens                      |
| ``hybrid-tiny`` | hybrid | ``TinyHybridConfig.mini()``, snapshots every 32 tokens    |
+-----------------+--------+-----------------------------------------------------------+

Tiny presets compile at XLA opt level 0 (about 3x faster compiles, slower programs).
"""

from __future__ import annotations

import enum

from models.workload import WorkloadConfig

__all__ = ["Family", "ModelPreset"]


class Family(enum.Enum):
    """A model family the job can serve."""

    DSV4 = "dsv4"  # models/paged.py PagedModel: SWA + compressed attention
    MLA = "mla"  # models/mla_paged.py PagedMLAModel: MLA latent + DSA indexer
    HYBRID = "hybrid"  # models/hybrid_paged.py PagedHybridModel: recurrent-state snapshots


# why a family's cache cannot have an L3 tier (None: it can; every family can since L3
# stores the hybrid's recurrent-state snapshots; a family added before its L3 support
# names the reason here, and the job runs it on device and host only)
_L3_REFUSAL: dict[Family, str | None] = {Family.DSV4: None, Family.MLA: None, Family.HYBRID: None}


class ModelPreset(enum.Enum):
    """The job's models (random weights, seed 0); see the module docstring."""

    BENCH = "bench"
    SMALL = "small"
    TINY = "tiny"
    MLA = "mla"
    MLA_TINY = "mla-tiny"
    HYBRID = "hybrid"
    HYBRID_TINY = "hybrid-tiny"

    @property
    def family(self) -> Family:
        if self in (ModelPreset.MLA, ModelPreset.MLA_TINY):
            return Family.MLA
        if self in (ModelPreset.HYBRID, ModelPreset.HYBRID_TINY):
            return Family.HYBRID
        return Family.DSV4

    @property
    def is_tiny(self) -> bool:
        """The tests' size (small model, small workload, fast compilation)."""
        return self in (ModelPreset.TINY, ModelPreset.MLA_TINY, ModelPreset.HYBRID_TINY)

    @property
    def size(self) -> str:
        """``bench``, ``small`` or ``tiny``."""
        if self.is_tiny:
            return "tiny"
        return "small" if self is ModelPreset.SMALL else "bench"

    @property
    def model_name(self) -> str:
        """The model id prefix of the job's L3 namespace (``tiny-<family>-<size>``)."""
        return f"tiny-{self.family.value}-{self.size}"

    @property
    def fast_compile(self) -> bool:
        """XLA opt level 0 (3x faster compiles, slower programs): the test presets only."""
        return self.is_tiny

    @property
    def l3_refusal(self) -> str | None:
        """Why this preset's cache cannot have an L3 tier (``None``: it can)."""
        return _L3_REFUSAL[self.family]

    def model_config(self):
        """The model's config (``TinyDSV4Config``, ``TinyMLAConfig`` or ``TinyHybridConfig``)."""
        fam = self.family
        if fam is Family.MLA:
            from models.mla_config import TinyMLAConfig

            if self.is_tiny:
                return TinyMLAConfig.mini(num_layers=4)
            # top-256 of 1-2k tokens: with top-32, the ~1e-6 differences between a restored
            # and a recomputed prefix (other programs, other reduction order) moved
            # borderline tokens in or out of the selection (isolated logit jumps of 1e-4
            # to 0.3) often enough to flip a greedy token (benchmarks/RESULTS.md)
            return TinyMLAConfig.mini(
                num_layers=8, hidden=256, vocab=512, num_heads=4, qk_nope_dim=32, rope_dim=16,
                v_head_dim=32, q_lora=128, kv_lora_rank=64, page_size=64, index_heads=2,
                index_head_dim=32, index_topk=256, mlp_hidden=512,
            )  # fmt: skip
        if fam is Family.HYBRID:
            from models.hybrid_config import TinyHybridConfig

            if self.is_tiny:
                return TinyHybridConfig.mini()
            return TinyHybridConfig.mini(
                num_layers=8, hidden=128, vocab=512, mlp_hidden=256, num_heads=4, num_kv_heads=2,
                head_dim=32, rope_dim=8, k_heads=2, k_dim=32, v_heads=4, v_dim=32, page_size=64,
            )  # fmt: skip
        from models.config import TinyDSV4Config

        if self is ModelPreset.TINY:
            return TinyDSV4Config.mini(num_layers=4)
        page, hidden, layers = (64, 256, 8) if self is ModelPreset.BENCH else (32, 128, 6)
        return TinyDSV4Config.mini(
            num_layers=layers, page_size=page, window=page // 2, hca_ratio=page // 2,
            hidden=hidden, mlp_hidden=2 * hidden, vocab=512, head_dim=32, q_lora=hidden // 2,
            o_lora=hidden // 4, index_head_dim=16, index_topk=8,
        )  # fmt: skip

    def build_model(self, mesh, config=None):
        """The paged model (a ``ServableModel``) on ``mesh``, weights of seed 0."""
        cfg = self.model_config() if config is None else config
        fam = self.family
        if fam is Family.MLA:
            from models.mla import init_mla_params
            from models.mla_paged import PagedMLAModel

            return PagedMLAModel(
                cfg, init_mla_params(cfg, 0), mesh=mesh, fast_compile=self.fast_compile
            )
        if fam is Family.HYBRID:
            from models.hybrid import init_params as init_hybrid
            from models.hybrid_paged import PagedHybridModel

            return PagedHybridModel(
                cfg, init_hybrid(cfg, 0), mesh=mesh, fast_compile=self.fast_compile
            )
        from models.dsv4 import init_params
        from models.paged import PagedModel

        return PagedModel(cfg, init_params(cfg, 0), mesh=mesh, fast_compile=self.fast_compile)

    def cache_fields(self) -> dict:
        """``HiCacheConfig`` fields this family needs: the hybrid's ``state_interval``
        (snapshot grid, 2 pages: a hit ends on it); none for the others."""
        if self.family is Family.HYBRID:
            return {"state_interval": 2 * self.model_config().page_size}
        return {}

    def workload(self, seed: int = 0, *, quick: bool = False) -> WorkloadConfig:
        """The default traffic (``quick``: 4 clients x 3 turns, else 6 x 4; tiny presets:
        3 x 3 with short segments, sized so that 11 device and 14 host pages see
        evictions from both tiers)."""
        if self.is_tiny:
            return WorkloadConfig(
                seed=seed, clients=3, turns=3, system_prompts=1, system_prompt_len=32,
                user_tokens=24, gen_tokens=8, vocab=128,
            )  # fmt: skip
        page = self.model_config().page_size
        return WorkloadConfig(
            seed=seed, clients=4 if quick else 6, turns=3 if quick else 4, system_prompts=2,
            system_prompt_len=16 * page, user_tokens=2 * page, gen_tokens=page // 2, vocab=512,
        )  # fmt: skip
