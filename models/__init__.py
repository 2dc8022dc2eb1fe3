"""Tiny test models for proving the cache end to end (see ``models/README.md``): the
DeepSeek-V4-style model, the MLA + DSA (GLM-5 / DeepSeek V3.2 family) model and the
Qwen3-Next-style recurrent hybrid (gated DeltaNet + full attention)."""

from models.config import TinyDSV4Config
from models.dsv4 import TinyDSV4, init_params, model_params
from models.hybrid_config import TinyHybridConfig
from models.hybrid_paged import PagedHybridModel
from models.mla import init_mla_params, mla_reference_forward, mla_reference_with_margins
from models.mla_config import TinyMLAConfig
from models.mla_paged import PagedMLAModel
from models.paged import PagedModel, RequestScratch
from models.protocol import ServableModel
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
    "PagedHybridModel",
    "PagedMLAModel",
    "PagedModel",
    "RequestScratch",
    "ServableModel",
    "StreamState",
    "TinyDSV4",
    "TinyDSV4Config",
    "TinyHybridConfig",
    "TinyMLAConfig",
    "cache_spec",
    "init_mla_params",
    "init_params",
    "init_stream_state",
    "mla_reference_forward",
    "mla_reference_with_margins",
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
