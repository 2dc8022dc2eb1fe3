"""``assemble``: the parts of one ``HiCache``, built and connected (its composition root).

::

    spec, mesh, config ─> layer maps ─> HostPools (this process's stages)
                           PageLedger ─> TransferEngine (host generations checked)
                           RadixTree, Agreement, CacheStats, Evictor
    store + config.storage ─> StorageTier (both or neither; StateSlots for snapshots) ─┐
                           Backups (landed backups written to L3) ─> Evictor.backups, .l3
                           Admission, InFlight (over the same tree, ledger and evictor)

The facade (:class:`~jaxhicache.cache.hicache.HiCache`) keeps the parts, connects
the evictor to its poll point and routes every call; nothing here runs a request.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import final

from jax.sharding import Mesh

from jaxhicache.cache.admission import Admission
from jaxhicache.cache.backups import Backups
from jaxhicache.cache.config import HiCacheConfig
from jaxhicache.cache.eviction import Evictor
from jaxhicache.cache.inflight import InFlight
from jaxhicache.cache.l3 import StorageTier
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.states import StateSlots
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement, local_stages
from jaxhicache.layer_map import StageLayerMap, build_layer_maps
from jaxhicache.mesh import PP
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, Tier
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.transfer import TransferEngine
from jaxhicache.tree import RadixTree

__all__ = ["Parts", "assemble"]


@final
@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
    """What :func:`assemble` built, connected to each other (not yet to a poll point)."""

    layer_maps: tuple[StageLayerMap, ...]
    device_swa_pages: int
    host: HostPools
    ledger: PageLedger
    engine: TransferEngine
    tree: RadixTree
    agreement: Agreement
    stats: CacheStats
    evictor: Evictor
    l3: StorageTier | None
    backups: Backups
    admission: Admission
    inflight: InFlight
    states: StateSlots | None
    device_state_slots: int


def assemble(
    spec: ModelCacheSpec,
    mesh: Mesh,
    config: HiCacheConfig,
    store: StorageBackend | None,
    cache_id: int,
) -> Parts:
    """Builds every part of a cache (``ValueError`` for a store without ``config.storage``
    or the reverse, and whatever the parts refuse)."""
    if (store is None) != (config.storage is None):  # before any part (or thread) exists
        raise ValueError(
            "an L3 tier needs both a store (a StorageBackend) and config.storage "
            f"(got store={type(store).__name__}, config.storage={config.storage!r})"
        )
    partition = list(config.partition) if config.partition is not None else None
    layer_maps = build_layer_maps(spec, mesh.shape[PP], partition)
    device_swa = config.device_swa_capacity(spec)
    host_pages = config.host_capacity()
    host_swa = config.host_swa_capacity(spec)
    dev_states, host_states = config.state_slots(spec)  # 0, 0 without recurrent states
    host = HostPools(  # this process's stages only
        spec,
        layer_maps,
        host_pages,
        host_swa,
        num_state_slots=host_states,
        layout=config.host_layout,
        reserve_bytes=config.host_reserve_bytes,
        ranks=local_stages(mesh),
    )
    ledger = PageLedger(
        config.device_pages, device_swa, host_pages, host_swa, dev_states, host_states
    )
    engine = TransferEngine(
        mesh,
        layer_maps,
        host,
        backend=config.backend,
        tuning=config.tuning,
        host_is_current=ledger.host_is_current,
        copy_path=config.copy_path,
    )
    tree = RadixTree(
        spec.page_size,
        spec.swa_trailing_pages,
        write_policy=config.write_policy,
        state_interval=config.state_grid(spec),
    )
    states = StateSlots(tree, ledger, tree.state_interval) if tree.state_interval else None
    # Multi-controller JAX: one MIN all-reduce where a decision rests on what only
    # some processes can see (identity, no collective, in a single process).
    agreement = Agreement()
    stats = CacheStats()
    evictor = Evictor(tree, ledger, stats)
    l3 = (
        None
        if store is None or config.storage is None  # both or neither (checked above)
        else StorageTier(
            store,
            config.storage,
            spec,
            host,
            ledger,
            tree,
            stats,
            agreement=agreement,
            make_room=evictor.make_room_on_host,
            states=states,
        )
    )
    if states is not None:
        states.l3 = l3  # host snapshot room: unclaimed prefetches, then L3 writes waited
    backups = Backups(
        engine,
        tree,
        ledger,
        stats,
        evictor.make_room_on_host,
        on_backed_up=None if l3 is None else l3.write,
        agreement=agreement,
        alloc_host_states=None if states is None else partial(states.alloc, Tier.HOST),
    )
    evictor.backups, evictor.l3 = backups, l3
    has_swa = spec.swa_trailing_pages > 0
    admission = Admission(
        cache_id,
        tree,
        ledger,
        evictor,
        stats,
        l3,
        has_swa,
        engine=engine,
        backups=backups,
        states=states,
    )
    return Parts(
        layer_maps=layer_maps,
        device_swa_pages=device_swa,
        host=host,
        ledger=ledger,
        engine=engine,
        tree=tree,
        agreement=agreement,
        stats=stats,
        evictor=evictor,
        l3=l3,
        backups=backups,
        admission=admission,
        inflight=InFlight(cache_id, tree, ledger, evictor, stats, states),
        states=states,
        device_state_slots=dev_states,
    )
