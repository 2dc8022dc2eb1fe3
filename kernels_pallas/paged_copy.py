"""Former home of the paged gather/scatter, now ``common``, ``paged_gather`` and
``paged_scatter``. Kept only because ``jaxhicache/storage/layout.py`` still
imports ``Layout`` from here; delete this module once that import reads
``from kernels_pallas.common import Layout``. New code imports the new modules.
"""

from kernels_pallas.common import (
    Backend,
    Layout,
    PagedCopyTuning,
    bucket_size,
    default_backend,
    validate_page_ids,
)
from kernels_pallas.paged_gather import paged_gather, paged_gather_reference
from kernels_pallas.paged_scatter import (
    paged_scatter,
    paged_scatter_donated,
    paged_scatter_reference,
)

__all__ = [
    "Backend",
    "Layout",
    "PagedCopyTuning",
    "bucket_size",
    "default_backend",
    "paged_gather",
    "paged_gather_reference",
    "paged_scatter",
    "paged_scatter_donated",
    "paged_scatter_reference",
    "validate_page_ids",
]
