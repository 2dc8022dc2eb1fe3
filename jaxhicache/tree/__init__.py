"""Paged radix tree with FULL and SWA components on device and host (DESIGN §7).

Modules, in import order: ``arrays`` (id/token array helpers) ← ``node``
(``TreeNode`` and result records) ← ``hashes`` (tenant salts, L3 page hashes),
``policy`` (write policies) and ``window`` (SWA summaries, window protection,
reclaim) ← ``residency`` (values, locks, eviction, backup) and ``invariants``
(full check) ← ``structure`` (match, insert, split) ← ``radix`` (``RadixTree``).
See ``README.md`` in this folder.
"""

from jaxhicache.tree.node import BackupPlan, EvictResult, InsertResult, MatchResult, TreeNode
from jaxhicache.tree.policy import WritePolicy, should_backup_on_hit, should_backup_on_insert
from jaxhicache.tree.radix import RadixTree

__all__ = [
    "BackupPlan",
    "EvictResult",
    "InsertResult",
    "MatchResult",
    "RadixTree",
    "TreeNode",
    "WritePolicy",
    "should_backup_on_hit",
    "should_backup_on_insert",
]
