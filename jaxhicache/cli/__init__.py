"""Command line: ``jaxhicache`` (or ``python -m jaxhicache``).

Subcommands::

    jaxhicache bench multiturn [...]        the main job: a multi-turn chat workload served
                                            with the cache off, then on (device, host, L3);
                                            a table, results.json and a PNG (models/multiturn.py)
    jaxhicache layer-map [...]              stage layer maps and per-stage byte budgets
    jaxhicache storage ls|stats|clear --store SPEC
                                            what an L3 store holds, per model / stage /
                                            page space; totals (``--verify`` reads every
                                            object); delete every jaxhicache object

``jaxhicache`` alone prints this help and exits 0. Bad arguments end with one line
``jaxhicache: error: ...`` on stderr naming the bad value and exit status 2.

The top of the import stack: the one place in ``jaxhicache`` that reaches into
``models``, lazily, inside ``bench multiturn``; the core library never imports it.

One module per responsibility: ``app`` (the parser and :func:`main`), ``bench_cmd``
(``bench multiturn``), ``layer_map_cmd`` (``layer-map``), ``storage_cmd``
(``storage``, and the ``--store`` opener), ``common`` (errors and argument types).
This package re-exports their public functions.
"""

from __future__ import annotations

from jaxhicache.cli.app import main
from jaxhicache.cli.layer_map_cmd import PRESETS as _PRESETS
from jaxhicache.cli.layer_map_cmd import describe
from jaxhicache.cli.storage_cmd import StoredObject, list_objects, open_store, store_usage

__all__ = [
    "PRESETS",
    "StoredObject",
    "describe",
    "list_objects",
    "main",
    "open_store",
    "store_usage",
]

PRESETS = _PRESETS
"""Cache specs by ``layer-map --model`` name: name -> a function returning the ModelCacheSpec."""
