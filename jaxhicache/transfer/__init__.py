"""L1 <-> L2 page moves for every PP stage in one dispatch (see ``README.md`` here).

Modules: ``moves`` (what moves, handles, counters), ``staging`` (reused host
buffers, aliases), ``programs`` (the jitted ``shard_map`` programs),
``layerwise`` (loads applied per layer inside a forward), ``strategy`` (staged
vs direct copies), ``engine`` (:class:`TransferEngine`).
"""

from jaxhicache.transfer.engine import TransferEngine
from jaxhicache.transfer.layerwise import LayerwiseLoad, apply_layer, fetch_layer, load_layer
from jaxhicache.transfer.moves import BackupHandle, LoadHandle, PageMove, TransferStats
from jaxhicache.transfer.strategy import CopyPath, CopyStrategy, DirectCopy, StagedCopy

__all__ = [
    "BackupHandle",
    "CopyPath",
    "CopyStrategy",
    "DirectCopy",
    "LayerwiseLoad",
    "LoadHandle",
    "PageMove",
    "StagedCopy",
    "TransferEngine",
    "TransferStats",
    "apply_layer",
    "fetch_layer",
    "load_layer",
]
