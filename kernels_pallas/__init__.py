"""Pallas kernels of jaxhicache (see README.md)."""

from kernels_pallas.paged_copy import (
    Backend,
    Layout,
    PagedCopyTuning,
    bucket_size,
    default_backend,
    paged_gather,
    paged_gather_reference,
    paged_scatter,
    paged_scatter_donated,
    paged_scatter_reference,
    validate_page_ids,
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
