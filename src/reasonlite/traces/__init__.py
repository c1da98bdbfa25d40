"""Trace generation (the data half of distillation): rationale prompts, verification, self-consistency, contrastive
pairs and the trace-set folder. Entry point: `build_trace_set(cfg, out_dir)`; read one back with `TraceSet.load`."""

from reasonlite.traces.build import TraceSet, build_trace_set
from reasonlite.traces.pairs import Pair
from reasonlite.traces.verify import Trace

__all__ = ["Pair", "Trace", "TraceSet", "build_trace_set"]
