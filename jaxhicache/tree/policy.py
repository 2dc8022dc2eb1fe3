"""Write policies: when device pages are backed up to host (DESIGN §7).

Pure functions of a policy and a node; both answer ``False`` for the root and
for nodes already backed up, so calling them after every insert / match is safe.
"""

from __future__ import annotations

import enum
from typing import final

from jaxhicache.tree.node import TreeNode

__all__ = ["WritePolicy", "should_backup_on_hit", "should_backup_on_insert"]

SELECTIVE_HIT_THRESHOLD = 2  # write_through_selective backs up from this hit on


@final
class WritePolicy(enum.Enum):
    """When device pages are backed up to host (DESIGN §7)."""

    WRITE_THROUGH = "write_through"  # back up on insert
    WRITE_THROUGH_SELECTIVE = "write_through_selective"  # back up once a node was hit twice
    WRITE_BACK = "write_back"  # back up when evicted from device


def _check_write_policy(value: object) -> WritePolicy:
    """``value`` if it is a :class:`WritePolicy`; ``ValueError`` naming it otherwise (no
    strings turned into members: the same rule as ``HiCacheConfig.write_policy``)."""
    if not isinstance(value, WritePolicy):
        choices = ", ".join(f"WritePolicy.{m.name}" for m in WritePolicy)
        raise ValueError(f"write_policy must be one of {choices}; got {value!r}")
    return value


def should_backup_on_insert(policy: WritePolicy, node: TreeNode) -> bool:
    """Whether ``policy`` wants ``node`` (and its unbacked ancestors) backed up after insert.

    Args:
      policy: the cache's write policy.
      node: the node an insert ended at.

    Returns:
      ``True`` for ``WRITE_THROUGH`` and a non-root node without a host value.
    """
    return policy is WritePolicy.WRITE_THROUGH and not node.is_root and node.host_full is None


def should_backup_on_hit(policy: WritePolicy, node: TreeNode) -> bool:
    """Whether a match on ``node`` should trigger a backup.

    Args:
      policy: the cache's write policy.
      node: the matched node.

    Returns:
      ``True`` for ``WRITE_THROUGH_SELECTIVE`` and a non-root node without a host
      value that has been hit at least ``SELECTIVE_HIT_THRESHOLD`` times.
    """
    return (
        policy is WritePolicy.WRITE_THROUGH_SELECTIVE
        and not node.is_root
        and node.host_full is None
        and node.hit_count >= SELECTIVE_HIT_THRESHOLD
    )
