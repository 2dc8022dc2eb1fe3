"""L3 keys: page hash chains, namespaces and object keys.

Page hashes (DESIGN §7)::

    h_1 = sha256(root || tokens_1)        root = b""  (no salt)
                                         root = sha256(b"jaxhicache/salt\\x00" || utf8(salt))
    h_i = sha256(h_{i-1} || tokens_i)     tokens_i: the little-endian int32 ids of page i

``h_{i-1}`` enters as its 32 raw digest bytes; hashes are returned as 64-char
lowercase hex. A salted root is a fixed 32 bytes, so the boundary between salt
and tokens is unambiguous, and the salt only enters the first page: every later
hash of a salted chain differs from the unsalted one because its parent does.
Only whole pages are hashed; a trailing partial page is ignored. No Python
``hash()`` is used anywhere (it is salted per process).

Object keys (path-like, valid for files, S3 and GCS)::

    jaxhicache/v<layout>/<model>/<format>-<digest>/layers-<start>-<end>[/tp-<r>-of-<n>]/<unit>/<h[:2]>/<h>

* ``model``: the model id, percent-encoded (``/`` becomes ``%2F``), so distinct
  ids never share a path;
* ``format-digest``: the KV format name plus 16 hex of the sha256 of
  :func:`cache_format` (dtype, KV format, page size, window, head geometry,
  per-layer ratios, row shape/dtype of every sub-pool);
* ``layers-start-end``: the stage's global layer range ``[start, end)`` — not the
  PP rank, as two partitions with the same rank hold different layers;
* ``tp-r-of-n``: only when the unit holds a TP-sharded sub-pool (MHA ``FULL_KV``
  with ``tp > 1``); replicated sub-pools (DSV4's single KV head, the MLA latent,
  the DSA indexer keys) never carry it: one object per stage, not per TP rank;
* ``unit``: a page space (``full`` / ``swa``, one object per page space) or a pool
  kind (``c4_kv``, ... one object per sub-pool); the two never collide. With
  ``pages_per_object = g > 1`` a full-space unit reads ``<unit>-x<g>`` (``full-x4``):
  one object per group of ``g`` pages, keyed by its last page's hash
  (:mod:`~jaxhicache.storage.groups`), never found by a namespace of another ``g``;
* ``h[:2]/h``: a 256-way fan-out so no directory (or S3 prefix) grows unbounded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

import numpy as np

from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind, TPSharding

if TYPE_CHECKING:
    from jaxhicache.layer_map import StageLayerMap

__all__ = [
    "LAYOUT_VERSION",
    "Namespace",
    "cache_format",
    "check_page_hash",
    "object_key",
    "object_keys",
    "page_hashes",
    "tp_sharded_kinds",
]

LAYOUT_VERSION = 2
"""Version of the object byte layout (header, which rows a payload holds and in which
order); part of every key, so objects of another layout are never found (misses).

1: whole page rows in every object. 2: SWA-space objects hold only the rows a
restore at the end of their page reads (``layout.window_rows``)."""

_SALT_TAG = b"jaxhicache/salt\x00"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INT32 = np.iinfo(np.int32)


def page_hashes(
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    salt: str | bytes | None = None,
    parent: str | None = None,
) -> list[str]:
    """Hex sha256 chain of the whole pages of ``tokens`` (see the module docstring).

    Args:
      tokens: token ids (each must fit in int32).
      page_size: tokens per page.
      salt: tenant salt (``cache_salt``); enters the first page's hash only. ``None``
        and empty mean no salt.
      parent: hex hash of the page before ``tokens[0]`` to continue a chain (its
        salt, if any, is already in it, so ``salt`` must then be ``None``).

    Returns:
      One 64-char lowercase hex string per whole page, in order (a trailing
      partial page is not hashed; fewer tokens than a page give ``[]``).

    Raises:
      ValueError: ``page_size`` is not a positive integer (``bool`` included),
        ``tokens`` is not one-dimensional, not integers or outside int32, both a
        non-empty ``salt`` and a ``parent`` are given, or ``parent`` is not a
        page hash.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int | np.integer) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        bad = arr[(arr < _INT32.min) | (arr > _INT32.max)][:4].tolist()
        raise ValueError(f"token ids must fit in int32, got {bad}")
    if salt is not None and parent is not None and len(salt):
        raise ValueError("give either salt (a chain's first page) or parent (a continuation)")
    if parent is not None:
        prev = bytes.fromhex(check_page_hash(parent))
    elif salt:
        raw = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
        prev = hashlib.sha256(_SALT_TAG + raw).digest()
    else:
        prev = b""
    n = arr.size // page_size
    le = arr[: n * page_size].astype("<i4", copy=False).reshape(n, page_size)
    out = []
    for i in range(n):
        h = hashlib.sha256(prev)
        h.update(le[i].tobytes())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


def check_page_hash(h: str) -> str:
    """Checks that ``h`` is a page hash as :func:`page_hashes` makes them.

    Args:
      h: the value to check.

    Returns:
      ``h`` itself.

    Raises:
      ValueError: ``h`` is not a ``str`` of exactly 64 lowercase hex characters.
    """
    if not isinstance(h, str) or not _HEX64.fullmatch(h):
        raise ValueError(f"not a page hash (64 lowercase hex chars): {h!r}")
    return h


def tp_sharded_kinds(spec: ModelCacheSpec, tp_size: int) -> tuple[PoolKind, ...]:
    """Sub-pools whose rows are split over ``'tp'`` (:attr:`PoolKind.tp_sharding` is HEADS).

    Replicated sub-pools (DSV4's single KV head, the MLA latent, the DSA indexer
    keys) are stored once per stage, so their objects never carry a TP rank.

    Args:
      spec: the model's cache spec.
      tp_size: tensor-parallel ranks.

    Returns:
      The split sub-pools in canonical order; empty when ``tp_size`` is 1.
    """
    if tp_size == 1:
        return ()
    return tuple(k for k in spec.kinds() if k.tp_sharding is TPSharding.HEADS)


def cache_format(spec: ModelCacheSpec) -> str:
    """Canonical text of everything that fixes a page's bytes (but not the model id).

    Two specs whose pages could differ in any byte give different texts: KV format,
    dtype, page size, window, head geometry, the C4 ring, the per-layer compress
    ratios, the layer count, every sub-pool's row shape and dtype, and the
    per-layer kinds when the spec has them (MLA: which layers own an indexer
    pool). Its sha256 is
    the ``<digest>`` of every object key (:class:`Namespace`).

    Args:
      spec: the model's cache spec.

    Returns:
      Compact JSON with sorted keys, so equal specs give equal text in every
      process.
    """
    desc: dict[str, object] = {
        "kv_format": spec.kv_format.value,
        "dtype": spec.dtype,
        "page_size": spec.page_size,
        "window": spec.window,
        "head_dim": spec.head_dim,
        "rope_dim": spec.rope_dim,
        "indexer_head_dim": spec.indexer_head_dim,
        "num_kv_heads": spec.num_kv_heads,
        "c4_ring": spec.c4_ring,
        "compress_ratios": list(spec.compress_ratios or ()),
        "num_layers": spec.num_layers,
        "rows": {k.value: [list(spec.row_shape(k)), spec.row_dtype(k).name] for k in spec.kinds()},
    }
    if spec.layer_kinds is not None:  # MLA: which layers own an indexer pool
        desc["layer_kinds"] = [k.name for k in spec.layer_kinds]
    return json.dumps(desc, sort_keys=True, separators=(",", ":"))


@final
@dataclasses.dataclass(frozen=True)
class Namespace:
    """Where one stage's objects live. Build with :meth:`for_stage`.

    Two instances with equal namespaces (same model id, format, layer range,
    TP shard) share objects; any difference gives disjoint keys.

    Attributes:
      model_id: the model id (percent-encoded in the key).
      format_name: the human-readable format part of the key, the KV format
        (e.g. ``"fp8_dsv4"``).
      format_digest: 16 hex of the sha256 of :func:`cache_format`.
      page_size: tokens per page.
      start_layer: the stage's first global layer.
      end_layer: one past the stage's last global layer.
      tp_rank: this process's TP rank; ``None`` when no sub-pool is TP-sharded.
      tp_size: TP ranks the sharded sub-pools are split over (1: none sharded).
      tp_sharded: the sub-pools whose keys carry ``tp-<r>-of-<n>``
        (:func:`tp_sharded_kinds`).
      stage_kinds: the sub-pools with at least one layer on the stage, in
        canonical order (what a page of the stage stores).
      layout_version: the object layout version in the key
        (:data:`LAYOUT_VERSION`).
      pages_per_object: full-space pages per object (``g``; 1: one object per
        page); see :meth:`group`.

    Raises:
      ValueError: an empty ``model_id``, a layer range that is not
        ``0 <= start_layer < end_layer``, TP-sharded sub-pools without a
        ``tp_rank`` in ``[0, tp_size)``, or ``pages_per_object`` not an int >= 1.
    """

    model_id: str
    format_name: str  # human-readable part, e.g. "fp8_dsv4"
    format_digest: str  # 16 hex of sha256(cache_format(spec))
    page_size: int
    start_layer: int
    end_layer: int
    tp_rank: int | None = None
    tp_size: int = 1
    tp_sharded: tuple[PoolKind, ...] = ()
    stage_kinds: tuple[PoolKind, ...] = ()  # sub-pools with at least one layer on the stage
    layout_version: int = LAYOUT_VERSION
    pages_per_object: int = 1

    def __post_init__(self):
        if not self.model_id:
            raise ValueError("model_id must be a non-empty string")
        g = self.pages_per_object
        if type(g) is not int or g < 1:
            raise ValueError(f"pages_per_object must be an int >= 1, got {g!r}")
        if not 0 <= self.start_layer < self.end_layer:
            raise ValueError(f"bad layer range [{self.start_layer}, {self.end_layer})")
        if self.tp_sharded and (self.tp_rank is None or not 0 <= self.tp_rank < self.tp_size):
            raise ValueError(
                f"sub-pools {[k.value for k in self.tp_sharded]} are TP-sharded over "
                f"tp={self.tp_size}: give tp_rank in [0, {self.tp_size}), got {self.tp_rank}"
            )

    @classmethod
    def for_stage(
        cls,
        spec: ModelCacheSpec,
        layer_map: StageLayerMap,
        *,
        model_id: str | None = None,
        tp_rank: int | None = None,
        tp_size: int = 1,
        pages_per_object: int = 1,
    ) -> Namespace:
        """The namespace of one stage.

        Args:
          spec: the model's cache spec.
          layer_map: the stage's layer map (of ``spec``).
          model_id: the model id in the keys; ``None`` (or empty): ``spec.name``.
          tp_rank: this process's TP rank; needed only when a sub-pool is
            TP-sharded at ``tp_size``, ignored (``None`` in the result) otherwise.
          tp_size: tensor-parallel ranks.
          pages_per_object: full-space pages per object (:meth:`group`).

        Returns:
          The stage's :class:`Namespace`: the spec's format digest and page size,
          the stage's global layer range and present sub-pools, and the TP shard
          only when ``tp_size > 1`` splits a sub-pool (else ``tp_size`` 1).

        Raises:
          ValueError: ``layer_map`` is for another spec, ``tp_size < 1``, or as
            the constructor raises it (a sharded sub-pool without a valid
            ``tp_rank``).
        """
        if layer_map.spec != spec:
            raise ValueError(f"layer map is for spec {layer_map.spec.name!r}, not {spec.name!r}")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        sharded = tp_sharded_kinds(spec, tp_size)
        return cls(
            model_id=model_id or spec.name,
            format_name=spec.kv_format.value,
            format_digest=_format_digest(spec),
            page_size=spec.page_size,
            start_layer=layer_map.start_layer,
            end_layer=layer_map.end_layer,
            tp_rank=tp_rank if sharded else None,
            tp_size=tp_size if sharded else 1,
            tp_sharded=sharded,
            stage_kinds=tuple(k for k in spec.kinds() if layer_map.num_layers_of(k) > 0),
            pages_per_object=pages_per_object,
        )

    def group(self, unit: PageSpace | PoolKind) -> int:
        """Pages per object of ``unit``.

        Args:
          unit: a page space, or a pool kind (of its page space).

        Returns:
          :attr:`pages_per_object` for the full space, 1 for the others (a restore
          reads their objects at one end only).
        """
        space = unit if isinstance(unit, PageSpace) else unit.page_space
        return self.pages_per_object if space is PageSpace.FULL else 1

    def matches(self, spec: ModelCacheSpec, layer_map: StageLayerMap) -> bool:
        """Whether this namespace describes stage ``layer_map`` of ``spec``.

        The model id and TP shard are not compared: they are the caller's choice.

        Args:
          spec: a model's cache spec.
          layer_map: a stage's layer map.

        Returns:
          ``True`` when the format digest, page size, layer range and present
          sub-pools all equal those :meth:`for_stage` would give.
        """
        return (
            self.format_digest == _format_digest(spec)
            and self.page_size == spec.page_size
            and (self.start_layer, self.end_layer) == (layer_map.start_layer, layer_map.end_layer)
            and self.stage_kinds == tuple(k for k in spec.kinds() if layer_map.num_layers_of(k) > 0)
        )

    @functools.cached_property
    def prefix(self) -> str:
        """Key prefix shared by all this stage's objects (no TP segment)."""
        model = urllib.parse.quote(self.model_id, safe="")
        return (
            f"jaxhicache/v{self.layout_version}/{model}/{self.format_name}-{self.format_digest}"
            f"/layers-{self.start_layer}-{self.end_layer}"
        )

    def unit_is_sharded(self, unit: PageSpace | PoolKind) -> bool:
        """Whether ``unit``'s keys carry the TP rank.

        Args:
          unit: a pool kind (sharded if it is in :attr:`tp_sharded`), or a page
            space (sharded if any sharded kind is of that space).

        Returns:
          ``True`` when :func:`object_key` adds the ``tp-<r>-of-<n>`` segment.
        """
        if isinstance(unit, PoolKind):
            return unit in self.tp_sharded
        return any(k.page_space is unit for k in self.tp_sharded)


def object_key(namespace: Namespace, unit: PageSpace | PoolKind, page_hash: str) -> str:
    """The key of one object (the layout in the module docstring).

    Args:
      namespace: the stage's namespace.
      unit: what the object holds: a page space (one object per page space) or a
        pool kind (one object per sub-pool).
      page_hash: the page's hash (:func:`page_hashes`).

    Returns:
      ``<namespace.prefix>[/tp-<r>-of-<n>]/<unit>[-x<g>]/<h[:2]>/<h>``; the TP
      segment only when :meth:`Namespace.unit_is_sharded`, ``-x<g>`` only when
      :meth:`Namespace.group` is ``g > 1`` (``page_hash``: the group's last page).

    Raises:
      ValueError: ``unit`` is neither a :class:`PageSpace` nor a :class:`PoolKind`,
        or ``page_hash`` is not a page hash.
    """
    check_page_hash(page_hash)
    return f"{_unit_prefix(namespace, unit)}{page_hash[:2]}/{page_hash}"


def object_keys(
    namespace: Namespace, units: Sequence[PageSpace | PoolKind], hashes: Sequence[str]
) -> list[list[str]]:
    """:func:`object_key` of every unit of every page (each hash checked once).

    Args:
      namespace: the stage's namespace.
      units: the key units of one page, in order.
      hashes: the page hashes.

    Returns:
      Per hash, the key of each unit.

    Raises:
      ValueError: as :func:`object_key` raises it, or ``hashes`` is one string.
    """
    if isinstance(hashes, str):
        raise ValueError("hashes must be a sequence of page hashes, not one string")
    prefixes = [_unit_prefix(namespace, u) for u in units]
    return [[f"{p}{h[:2]}/{h}" for p in prefixes] for h in map(check_page_hash, hashes)]


def _unit_prefix(namespace: Namespace, unit: PageSpace | PoolKind) -> str:
    if not isinstance(unit, PageSpace | PoolKind):
        raise ValueError(f"unit must be a PageSpace or a PoolKind, got {unit!r}")
    tp = (
        f"/tp-{namespace.tp_rank}-of-{namespace.tp_size}" if namespace.unit_is_sharded(unit) else ""
    )
    g = namespace.group(unit)
    name = unit.value if g == 1 else f"{unit.value}-x{g}"
    return f"{namespace.prefix}{tp}/{name}/"


def _format_digest(spec: ModelCacheSpec) -> str:
    return hashlib.sha256(cache_format(spec).encode()).hexdigest()[:16]
