"""Backends: each turns a `GenerationRequest` into text (see `base`)."""

from slm_fusion.backends.base import (
    BACKENDS,
    Backend,
    Generation,
    GenerationRequest,
    TokenChunk,
    backend_class,
    make_backend,
)

__all__ = ["BACKENDS", "Backend", "Generation", "GenerationRequest", "TokenChunk", "backend_class", "make_backend"]
