"""Pallas kernels of jaxhicache (see README.md).

One module per kernel: ``paged_gather`` and ``paged_scatter``, on top of
``common`` (layouts, backends, tuning, id checks, word packing). The public names
are re-exported here. Note that ``kernels_pallas.paged_gather`` (and
``.paged_scatter``) is therefore the function, not the module: import from the
module with ``from kernels_pallas.paged_gather import ...``, or get the module
object with ``importlib.import_module("kernels_pallas.paged_gather")``.
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
