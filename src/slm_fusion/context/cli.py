"""`slm-fusion store ingest|search|list`: fill and inspect a context store from the shell, the same SQLite file the
gateway serves (`--config gateway.yaml` reads its `context.path` and `embeddings:`; `--db PATH` names the file).

    slm-fusion store ingest docs/ prices.pdf --store retail --config gateway.yaml
    slm-fusion store search retail "member discount on Aria mugs" --config gateway.yaml
    slm-fusion store list --config gateway.yaml

A store is named (`--store NAME` creates it on first use) or given by id. Ingesting a file again that is unchanged
skips it; a changed one replaces the old copy. Each file is indexed in its own transaction, so an interrupted run
(even killed -9) keeps the files it finished and a rerun indexes the rest, the one it was killed on included, without
embedding a finished file again (tests/test_context_resume.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
store_app = typer.Typer(help="Context stores: ingest files, search them, list them (the gateway's `context:` file).",
                        no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--db", help="The store's SQLite file (default context.db) or a "
                                                        "postgresql:// URL; instead of --config.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Gateway YAML whose `context.path` and `embeddings` "
                                                                 "are used.")]


def _open(db: str | None, config: Path | None, must_exist: bool) -> tuple[Any, Any]:
    """The context store of --db or of the gateway YAML, with the gateway's embedding model, and the retrieval
    settings it searches with (the YAML's `context:`, else the defaults)."""
    from slm_fusion.config import EmbeddingsConfig, load_fusion_config
    from slm_fusion.context.settings import RetrievalSettings
    from slm_fusion.context.store import open_store
    from slm_fusion.deployments import Embedder

    if db is not None and config is not None:
        raise typer.BadParameter("give --db PATH or --config GATEWAY.yaml, not both", param_hint="--db/--config")
    embeddings, max_file_bytes, settings, options = EmbeddingsConfig(), 20_000_000, RetrievalSettings(), {}
    if config is not None:
        cfg = load_fusion_config(config)  # ConfigError: one line, exit 2
        if cfg.context is None:
            raise typer.BadParameter(f"{config} has no `context:` section; add `context: {{path: context.db}}` and "
                                     "`embeddings: {}`, or pass --db PATH", param_hint="--config")
        db, embeddings, max_file_bytes = cfg.context.url or cfg.context.path, cfg.embeddings, cfg.context.max_file_bytes
        settings, options = cfg.context, {"vector_index": cfg.context.vector_index,
                                          "batch_lease_s": cfg.context.batch_lease_s}
    db = db or "context.db"
    if must_exist and not db.startswith("postgresql") and not Path(db).is_file():
        raise typer.BadParameter(f"no store file at {db}; ingest files first (`slm-fusion store ingest PATH --store "
                                 "NAME`) or point --db/--config at the gateway's file", param_hint="--db/--config")
    embedder = Embedder(embeddings)
    return open_store(db, embedder.vectors, embedder.offsets, max_file_bytes, **options), settings


def _named(store: Any, name: str, create: bool) -> dict[str, Any]:
    """The vector store with this id or name (created when `create` and there is none)."""
    stores = store.stores()
    found = [s for s in stores if name in (s["id"], s["name"])]
    if len(found) > 1:
        raise typer.BadParameter(f"{len(found)} vector stores are named '{name}'; give one by id "
                                 f"({', '.join(s['id'] for s in found)})", param_hint="NAME")
    if found:
        return found[0]
    if create:
        return store.create_store(name, {})
    known = ", ".join(sorted({s["name"] or s["id"] for s in stores})) or "none yet"
    raise typer.BadParameter(f"no vector store '{name}' (known: {known}); see `slm-fusion store list`",
                             param_hint="NAME")


def _files_under(paths: list[Path]) -> list[Path]:
    """The files to ingest: each file given, and the supported files under each folder given (sorted)."""
    from slm_fusion.context.store import TEXT_TYPES

    supported = TEXT_TYPES | {".pdf"}
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in supported)
        elif not path.is_file():
            raise typer.BadParameter(f"{path} does not exist; give files or folders to ingest", param_hint="PATH")
        elif path.suffix.lower() not in supported:  # refused before anything is written
            raise typer.BadParameter(f"{path}: file type {path.suffix or '(none)'} is not supported; give one of "
                                     f"{', '.join(sorted(supported))}", param_hint="PATH")
        else:
            out.append(path)
    if not out:
        raise typer.BadParameter(f"no supported files under {', '.join(map(str, paths))} "
                                 f"({', '.join(sorted(supported))})", param_hint="PATH")
    return out


@store_app.command("ingest")
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files, or folders whose supported files are ingested.")],
    store_name: Annotated[str, typer.Option("--store", help="Vector store name (created on first use) or id.")],
    db: DbOpt = None, config: ConfigOpt = None,
) -> None:
    """Upload files into a vector store: chunk, embed and index each (a progress bar per file)."""
    from slm_fusion.context.store import StoreError

    files = _files_under(paths)
    store, _ = _open(db, config, must_exist=False)
    try:
        target = _named(store, store_name, create=True)
        sid = target["id"]
        present = {store.file(f["file_id"])["filename"]: f for f in store.store_files(sid)}
        added = skipped = 0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("indexing", total=len(files))
            for path in files:
                progress.update(task, description=f"indexing {path.name}")
                data = path.read_bytes()
                entry = present.get(path.name)
                old = entry["file_id"] if entry is not None else None
                same = old is not None and store.file_content(old) == data
                if same and entry["status"] == "completed":
                    skipped += 1
                else:
                    try:  # a run killed while indexing this file left it `in_progress`: it is indexed again
                        fid = old if same else store.add_file(path.name, data, "assistants")["id"]
                        store.attach(sid, fid)
                    except StoreError as e:
                        raise typer.BadParameter(f"{path}: {e.message}", param_hint="PATH") from None
                    if old is not None and not same:  # the changed file replaces its old copy and its chunks
                        store.delete_file(old)
                    present[path.name] = store.store_file(sid, fid)
                    added += 1
                progress.advance(task)
        console.print(f"vector store {sid} ('{target['name']}'): {added} file(s) indexed, {skipped} unchanged "
                      f"skipped, {store.chunk_count(sid)} chunks in all ({store.location})")
    finally:
        store.close()


@store_app.command("search")
def search(
    name: Annotated[str, typer.Argument(help="Vector store name or id (`slm-fusion store list`).")],
    query: Annotated[str, typer.Argument(help="What to look for.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=50, help="Chunks shown.")] = 5,
    db: DbOpt = None, config: ConfigOpt = None,
) -> None:
    """The best chunks for a query (hybrid dense + BM25 ranking, as the gateway ranks them)."""
    store, settings = _open(db, config, must_exist=True)
    try:
        sid = _named(store, name, create=False)["id"]
        hits = store.search([sid], query, top_k, hybrid_weight=settings.hybrid_weight, diversity=settings.diversity)
    finally:
        store.close()
    table = Table(title=f"{name}: {query}")
    for column in ("#", "score", "file", "text"):
        table.add_column(column, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        text = " ".join(hit.text.split())
        table.add_row(str(rank), f"{hit.score:.3f}", hit.filename, text[:240] + ("…" if len(text) > 240 else ""))
    console.print(table if hits else f"no chunk of '{name}' matches {query!r}")


@store_app.command("list")
def list_stores(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """The vector stores in the file: id, name, files by status, size."""
    store, _ = _open(db, config, must_exist=True)
    try:
        stores = [(s, store.chunk_count(s["id"])) for s in store.stores()]
    finally:
        store.close()
    table = Table(title="vector stores")
    table.add_column("id", no_wrap=True)  # copied into YAML (`context: {vector_store_ids: [...]}`): never wrapped
    for column in ("name", "files", "indexed", "chunks", "bytes", "created"):
        table.add_column(column, overflow="fold")
    for s, chunks in stores:
        counts = s["file_counts"]
        table.add_row(s["id"], s["name"] or "", str(sum(counts.values())), str(counts.get("completed", 0)),
                      str(chunks), str(s["usage_bytes"]),
                      datetime.fromtimestamp(s["created_at"], UTC).strftime("%Y-%m-%d"))
    console.print(table if stores else "no vector stores yet: `slm-fusion store ingest PATH --store NAME`")


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
