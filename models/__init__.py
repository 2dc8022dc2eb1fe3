"""Tiny DeepSeek-V4-style model for proving the cache end to end (see ``models/README.md``)."""

from models.config import TinyDSV4Config
from models.dsv4 import TinyDSV4, init_params, model_params
from models.paged import PagedModel, RequestScratch
from models.reference import reference_forward, reference_with_margins
from models.restore import restore_prefix, restore_tables
from models.streaming import (
    StreamState,
    cache_spec,
    init_stream_state,
    restored_state,
    run_chunked,
    single_stage_params,
    stream_forward,
)

__all__ = [
    "PagedModel",
    "RequestScratch",
    "StreamState",
    "TinyDSV4",
    "TinyDSV4Config",
    "cache_spec",
    "init_params",
    "init_stream_state",
    "model_params",
    "reference_forward",
    "reference_with_margins",
    "restore_prefix",
    "restore_tables",
    "restored_state",
    "run_chunked",
    "single_stage_params",
    "stream_forward",
]
