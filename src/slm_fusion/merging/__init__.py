"""Weight-space merging of small models: merge methods, LoRA folding/combination and a streaming driver.

Names are imported lazily (PEP 562) so `slm-fusion --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MERGE_METHODS": "methods",
    "MergeMethod": "methods",
    "register": "methods",
    "resolve_param": "methods",
    "MergeConfig": "config",
    "MergeConfigError": "config",
    "load_merge_config": "config",
    "MergeError": "driver",
    "MergeReport": "driver",
    "run_merge": "driver",
    "AdapterCheckpoint": "lora",
    "combine_adapters": "lora",
    "concat_adapters": "lora",
    "load_adapter": "lora",
    "merge_adapter": "lora",
    "merge_adapter_in_memory": "lora",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slm_fusion.merging' has no attribute '{name}'")
    return getattr(importlib.import_module(f"slm_fusion.merging.{_EXPORTS[name]}"), name)
