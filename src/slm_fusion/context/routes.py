"""The OpenAI Files and Vector Stores endpoints, on the gateway's context store (each call runs in a thread: SQLite
and the embedding model block). A file batch is indexed by a background thread of the worker that holds its lease
(context.store's module doc); its state is in the store, so any worker answers for it, and reading a batch whose
worker was killed resumes it here."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import Response

from slm_fusion import protocol as P
from slm_fusion.context.settings import RetrievalSettings
from slm_fusion.context.store import ContextStore, StoreError

BATCH_POLL_MS = "250"  # `openai-poll-after-ms` of a batch in progress: the SDK's create_and_poll waits this long


def add_context_routes(app: FastAPI, gw: Any, json_response: Any) -> None:
    def store() -> ContextStore:
        if gw.context is None:
            raise StoreError("this gateway has no context store: add `context: {}` (and `embeddings: {}`) to its "
                             "YAML", status=404)
        return gw.context

    async def run(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def batch_response(batch: dict[str, Any]) -> Response:
        obj = P.file_batch_object(batch)
        return json_response(obj, headers={"openai-poll-after-ms": BATCH_POLL_MS}
                             if obj["status"] == "in_progress" else None)

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()] = "assistants") -> Response:
        data = await file.read()
        added = await run(store().add_file, file.filename or "upload.txt", data, purpose)
        return json_response(P.file_object(added))

    @app.get("/v1/files")
    async def list_files() -> Response:
        return json_response(P.list_object([P.file_object(f) for f in await run(store().files)]))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        return json_response(P.file_object(await run(store().file, file_id)))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        return Response(await run(store().file_content, file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        await run(store().delete_file, file_id)
        return json_response(P.deleted_object(file_id, "file"))

    @app.post("/v1/vector_stores")
    async def create_store(body: P.VectorStoreCreate) -> Response:
        s = store()
        for fid in body.file_ids:  # refuse unknown files before creating anything
            await run(s.file, fid)
        created = await run(s.create_store, body.name, body.metadata)
        for fid in body.file_ids:
            await run(s.attach, created["id"], fid, None, body.chunking_strategy)
        return json_response(P.vector_store_object(await run(s.store, created["id"])))

    @app.get("/v1/vector_stores")
    async def list_stores() -> Response:
        return json_response(P.list_object([P.vector_store_object(x) for x in await run(store().stores)]))

    @app.get("/v1/vector_stores/{store_id}")
    async def get_store(store_id: str) -> Response:
        return json_response(P.vector_store_object(await run(store().store, store_id)))

    @app.delete("/v1/vector_stores/{store_id}")
    async def delete_store(store_id: str) -> Response:
        await run(store().delete_store, store_id)
        return json_response(P.deleted_object(store_id, "vector_store.deleted"))

    @app.post("/v1/vector_stores/{store_id}/files")
    async def attach(store_id: str, body: P.VectorStoreFileCreate) -> Response:
        f = await run(store().attach, store_id, body.file_id, body.attributes, body.chunking_strategy)
        return json_response(P.vector_store_file_object(f))

    @app.get("/v1/vector_stores/{store_id}/files")
    async def list_store_files(store_id: str) -> Response:
        files = await run(store().store_files, store_id)
        return json_response(P.list_object([P.vector_store_file_object(f) for f in files]))

    @app.get("/v1/vector_stores/{store_id}/files/{file_id}")
    async def get_store_file(store_id: str, file_id: str) -> Response:
        return json_response(P.vector_store_file_object(await run(store().store_file, store_id, file_id)))

    @app.delete("/v1/vector_stores/{store_id}/files/{file_id}")
    async def detach(store_id: str, file_id: str) -> Response:
        await run(store().detach, store_id, file_id)
        return json_response(P.deleted_object(file_id, "vector_store.file.deleted"))

    @app.post("/v1/vector_stores/{store_id}/file_batches")
    async def create_batch(store_id: str, body: P.FileBatchCreate) -> Response:
        s = store()
        batch = await run(s.create_batch, store_id, body.entries())
        await run(s.start_batch, batch["id"])  # a background thread of this worker (unless another claimed it)
        return batch_response(batch)

    @app.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}")
    async def get_batch(store_id: str, batch_id: str) -> Response:
        s = store()
        batch = await run(s.batch, store_id, batch_id)
        if batch["status"] == "in_progress":  # its worker was killed (lease expired): this one resumes it
            await run(s.resume_batches, batch_id)
        return batch_response(batch)

    @app.post("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel")
    async def cancel_batch(store_id: str, batch_id: str) -> Response:
        return batch_response(await run(store().cancel_batch, store_id, batch_id))

    @app.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files")
    async def list_batch_files(store_id: str, batch_id: str, status: Annotated[
            Literal["in_progress", "completed", "failed", "cancelled"] | None, Query(alias="filter")] = None,
    ) -> Response:
        files = await run(store().batch_files, store_id, batch_id, status)
        return json_response(P.list_object([P.vector_store_file_object(f) for f in files]))

    @app.post("/v1/vector_stores/{store_id}/search")
    async def search(store_id: str, body: P.VectorStoreSearch) -> Response:
        threshold = body.ranking_options.score_threshold if body.ranking_options else 0.0
        ranking = gw.config.context or RetrievalSettings()  # ranked as a chat's retrieval ranks
        hits = await run(functools.partial(store().search, hybrid_weight=ranking.hybrid_weight,
                                           diversity=ranking.diversity),
                         [store_id], body.text(), body.max_num_results, body.filters, threshold)
        return json_response(P.search_page(body.text(), hits))
