"""Configuration of the tiny hybrid recurrent-state test model (``TinyHybridConfig``).

The model follows Qwen3-Next's layout: gated DeltaNet linear-attention layers,
with a full (GQA) attention layer every ``full_attention_interval``-th layer
(layer ``i`` is full attention when ``(i + 1) % interval == 0``: with interval
4, layers 3, 7, 11, ...).

The config is a frozen, validated dataclass; construction raises ``ValueError``
naming the offending field and value.  It also gives the sizes a cache needs:

* one **snapshot** of a linear layer (what the recurrent-state cache stores per
  grid position): a conv state ``[conv_dim, conv_kernel - 1]`` in the model
  dtype and a recurrent state ``[v_heads, k_dim, v_dim]`` in fp32 by default
  (:meth:`conv_state_bytes`, :meth:`recurrent_state_bytes`,
  :meth:`snapshot_bytes`);
* the **KV per token** of the full-attention layers, what a page cache holds
  (:meth:`kv_bytes_per_token`).

Presets: :meth:`TinyHybridConfig.mini` (the tests' model, fp32) and
:meth:`TinyHybridConfig.qwen3_next_80b` (the published Qwen3-Next-80B-A3B
shapes, for the byte formulas only: never initialise its weights).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from jaxhicache.spec import ModelCacheSpec

__all__ = ["LayerKind", "TinyHybridConfig"]


class LayerKind(enum.StrEnum):
    LINEAR = "linear_attention"  # gated DeltaNet: conv state + recurrent state
    FULL = "full_attention"  # GQA with RoPE: K/V per token (pages)


def _nbytes(dtype) -> int:
    return int(np.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class TinyHybridConfig:
    """Hyper-parameters of the tiny hybrid model (weights and activations fp32).

    Attention layers: ``num_heads`` query heads, ``num_kv_heads`` K/V heads,
    ``head_dim`` each, RoPE on the trailing ``rope_dim`` channels (Qwen3-Next
    rotates a quarter of the head), per-head q/k RMSNorm and a sigmoid output
    gate.  Linear layers: ``k_heads`` q/k heads of ``k_dim``, ``v_heads`` value
    heads of ``v_dim`` (``v_heads`` a multiple of ``k_heads``: v head ``h``
    reads q/k head ``h // (v_heads // k_heads)``), a causal depthwise conv of
    ``conv_kernel`` taps over the q, k, v channels.
    """

    num_layers: int
    hidden: int
    vocab: int
    mlp_hidden: int
    full_attention_interval: int
    # full attention
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_dim: int
    # gated DeltaNet
    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    conv_kernel: int = 4
    rope_theta: float = 10000.0
    eps: float = 1e-6
    page_size: int = 16  # tokens per K/V page of the attention layers (the cache's page)

    # ------------------------------------------------------------------ presets
    @classmethod
    def mini(cls, num_layers: int = 8, **overrides) -> TinyHybridConfig:
        """The tests' model: 8 layers (full attention at 3 and 7), width 32."""
        fields = dict(
            num_layers=num_layers,
            hidden=32,
            vocab=128,
            mlp_hidden=64,
            full_attention_interval=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_dim=8,
            k_heads=2,
            k_dim=16,
            v_heads=4,
            v_dim=16,
            conv_kernel=4,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def qwen3_next_80b(cls, **overrides) -> TinyHybridConfig:
        """Qwen3-Next-80B-A3B's published shapes (48 layers, 16 QK / 32 V heads of 128,
        attention 16 / 2 heads of 256, rope 64).  For the byte formulas only: its
        dense MLP stands in for the MoE and its weights would not fit a test."""
        fields = dict(
            num_layers=48,
            hidden=2048,
            vocab=151936,
            mlp_hidden=5120,
            full_attention_interval=4,
            num_heads=16,
            num_kv_heads=2,
            head_dim=256,
            rope_dim=64,
            k_heads=16,
            k_dim=128,
            v_heads=32,
            v_dim=128,
            conv_kernel=4,
        )
        fields.update(overrides)
        return cls(**fields)

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"TinyHybridConfig.{name}={value!r}: {why}")

        positive = (
            "num_layers",
            "hidden",
            "vocab",
            "mlp_hidden",
            "full_attention_interval",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "rope_dim",
            "k_heads",
            "k_dim",
            "v_heads",
            "v_dim",
            "conv_kernel",
            "page_size",
        )
        for name in positive:
            value = getattr(self, name)
            if type(value) is bool or not isinstance(value, int | np.integer) or value <= 0:
                bad(name, value, "must be a positive int")
            object.__setattr__(self, name, int(value))
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.v_heads % self.k_heads:
            bad("v_heads", self.v_heads, f"must be a multiple of k_heads={self.k_heads}")
        if self.rope_dim % 2:
            bad("rope_dim", self.rope_dim, "must be even (rotated pairs)")
        if self.rope_dim > self.head_dim:
            bad("rope_dim", self.rope_dim, f"must be <= head_dim={self.head_dim}")
        if self.conv_kernel < 2:
            bad("conv_kernel", self.conv_kernel, "must be >= 2 (a conv state of kernel - 1 >= 1)")
        for name in ("rope_theta", "eps"):
            value = getattr(self, name)
            if type(value) is bool or not isinstance(value, int | float) or not value > 0:
                bad(name, value, "must be a positive number")
        try:
            spec = ModelCacheSpec.tiny_hybrid(
                self.num_layers,
                full_attention_interval=self.full_attention_interval,
                page_size=self.page_size,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                k_heads=self.k_heads,
                v_heads=self.v_heads,
                k_dim=self.k_dim,
                v_dim=self.v_dim,
                conv_kernel=self.conv_kernel,
            )
        except ValueError as e:
            raise ValueError(f"TinyHybridConfig: no valid cache spec: {e}") from e
        object.__setattr__(self, "_spec", spec)

    def cache_spec(self, name: str | None = None) -> ModelCacheSpec:
        """The model's one :class:`ModelCacheSpec` (``ModelCacheSpec.tiny_hybrid`` of this
        config's fields: fp32 ``FULL_KV`` pages, ``CONV_STATE`` / ``RECURRENT_STATE``
        snapshot slots), built once at construction; ``name`` only renames it."""
        spec = self._spec
        return spec if name is None or name == spec.name else dataclasses.replace(spec, name=name)

    # ---------------------------------------------------------------- layout
    def layer_kind(self, layer: int) -> LayerKind:
        """Layer ``layer``'s kind: full attention iff ``(layer + 1) % interval == 0``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer!r} is outside [0, {self.num_layers})")
        if (layer + 1) % self.full_attention_interval == 0:
            return LayerKind.FULL
        return LayerKind.LINEAR

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_layers))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Global ids of the gated DeltaNet layers (index ``i`` is state row ``i``)."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k is LayerKind.LINEAR)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Global ids of the full-attention layers (index ``i`` is KV row ``i``)."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k is LayerKind.FULL)

    # ------------------------------------------------------------ state shapes
    @property
    def key_dim(self) -> int:
        """q (and k) channels of a linear layer: ``k_heads * k_dim``."""
        return self.k_heads * self.k_dim

    @property
    def value_dim(self) -> int:
        """v (and z) channels of a linear layer: ``v_heads * v_dim``."""
        return self.v_heads * self.v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: ``2 * k_heads * k_dim + v_heads * v_dim``."""
        return 2 * self.key_dim + self.value_dim

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        """One linear layer's conv state: the last ``K - 1`` pre-conv inputs, oldest first."""
        return (self.conv_dim, self.conv_kernel - 1)

    @property
    def recurrent_state_shape(self) -> tuple[int, int, int]:
        """One linear layer's recurrent state ``S``: ``[v_heads, k_dim, v_dim]``."""
        return (self.v_heads, self.k_dim, self.v_dim)

    @property
    def kv_token_shape(self) -> tuple[int, int]:
        """K (and V) of one token of one attention layer: ``[num_kv_heads, head_dim]``."""
        return (self.num_kv_heads, self.head_dim)

    # ------------------------------------------------------------------ bytes
    def conv_state_bytes(self, dtype=np.float32) -> int:
        """Bytes of one linear layer's conv state in the model dtype ``dtype``."""
        return self.conv_dim * (self.conv_kernel - 1) * _nbytes(dtype)

    def recurrent_state_bytes(self, dtype=np.float32) -> int:
        """Bytes of one linear layer's recurrent state (fp32 unless told otherwise)."""
        return self.v_heads * self.k_dim * self.v_dim * _nbytes(dtype)

    def state_bytes(self, conv_dtype=np.float32, recurrent_dtype=np.float32) -> int:
        """Bytes of one snapshot of ONE linear layer: conv + recurrent state."""
        return self.conv_state_bytes(conv_dtype) + self.recurrent_state_bytes(recurrent_dtype)

    def snapshot_bytes(self, conv_dtype=np.float32, recurrent_dtype=np.float32) -> int:
        """Bytes of one snapshot of the whole model (every linear layer)."""
        return len(self.linear_layers) * self.state_bytes(conv_dtype, recurrent_dtype)

    def kv_bytes_per_token(self, dtype=np.float32) -> int:
        """K + V bytes of one token summed over the full-attention layers."""
        per_layer = 2 * self.num_kv_heads * self.head_dim * _nbytes(dtype)
        return len(self.attention_layers) * per_layer
