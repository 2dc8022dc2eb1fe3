"""jaxhicache: a hierarchical prefix KV cache (device / host / storage) for JAX serving.

``jaxhicache.enable_compile_cache()`` (see :mod:`jaxhicache.compile_cache`) turns on
JAX's persistent compilation cache and the program cache
(:mod:`jaxhicache.program_cache`), so a restarted process skips recompiling and, for
``cached_jit`` programs, tracing.
The attribute loads lazily: ``import jaxhicache`` alone imports nothing else.
"""

_LAZY = {
    "enable_compile_cache": "jaxhicache.compile_cache",
    "disable_compile_cache": "jaxhicache.compile_cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
