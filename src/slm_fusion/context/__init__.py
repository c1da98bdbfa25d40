"""The context layer: OpenAI-compatible files and vector stores, and retrieval into chat completions.

    POST /v1/files  ->  POST /v1/vector_stores {file_ids}  ->  POST /v1/vector_stores/{id}/search
    chat completions with `extra_body={"context": {"vector_store_ids": [...]}}` (or the Responses API's
    `file_search` tool): the best chunks for the last user message are packed into a system message within
    `max_context_tokens` of the serving model, and every choice carries `slm_fusion.citations`.

`store` keeps everything in one SQLite file; `retrieve` turns hits into prompt text and citations.
"""

from slm_fusion.context.retrieve import ContextRequest, augment, context_request
from slm_fusion.context.store import ContextStore, Hit, StoreError

__all__ = ["ContextRequest", "ContextStore", "Hit", "StoreError", "augment", "context_request"]
