"""`FusionConfig`: the models the gateway serves, how each backend runs, and server operations — from YAML.

```yaml
server: {api_keys_env: FUSION_API_KEYS, max_request_bytes: 1048576, request_timeout_s: 120}
keys: {url: sqlite:///keys.db, flush_interval_s: 1.0}   # API keys with budgets + usage ledger (slm_fusion.keys)
tracing: {enabled: true, otlp_endpoint: http://127.0.0.1:4318/v1/traces}   # OpenTelemetry (slm_fusion.tracing)
models:
  - {name: smol, backend: transformers, model: smollm2-135m-instruct, max_batch_size: 8}
  - {name: smol-gguf, backend: llamacpp, model: /path/SmolLM2-135M-Instruct.Q4_1.gguf}
  - {name: big, backend: openai, model: gpt-4o-mini, base_url: http://127.0.0.1:9000/v1}
embeddings: {name: all-minilm-l6-v2}
ui: {enabled: true, runs_dir: runs}   # the web console at /ui (slm_fusion.ui)
routers: {}          # typed by slm_fusion.routing.specs: one entry per router, `type` picks its class
virtual_models: {}   # {router: NAME} or a router inline; validated with the rest of the file
routing: {}          # fallbacks and replica cooldowns (slm_fusion.routing.replicas)
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from reasonlite.config import format_validation_error
from slm_fusion.context.settings import MODEL_CONTEXT_DESCRIPTION, ModelContext, RetrievalSettings
from slm_fusion.routing.specs import (
    RouterSpec,
    RoutingSettings,
    VirtualModelSpec,
    canonical_virtual_models,
    check_names,
)


class _Strict(BaseModel):
    # A typo in a config key must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid")


class ReasoningDefaults(_Strict):
    """Per-model defaults of the reasoning layer (`slm_fusion.reasoning`); request extras override them."""

    format: Literal["cot", "pal", "answer"] = Field(
        "cot", description="What the model writes: cot ends with 'The answer is X.', pal a solution() program."
    )
    reasoning_budget: int | None = Field(
        None, ge=1, description="Default cap on reasoning tokens (budget forcing past it); null = max_tokens."
    )
    pal: bool = Field(False, description="Always execute the model's program and answer with its result.")
    vote: bool = Field(False, description="Always self-consistency: sample `samples` answers and return the majority.")
    samples: int = Field(5, ge=2, le=64, description="Samples drawn for `vote` when the request's n is 1.")
    vote_temperature: float = Field(0.7, gt=0, le=2.0, description="Sampling temperature for voting when unset.")
    answer_tokens: int = Field(16, ge=1, le=256, description="Tokens allowed for the forced answer after the cap.")
    student_prompt: bool = Field(
        False, description="Rewrite the last user message into the prompt reasonlite trained the student on."
    )
    select: Literal["vote", "verifier"] = Field(
        "vote", description="Which sample answers: the majority (vote), or the top score of verifier_path (samples too)."
    )
    verifier_path: str | None = Field(
        None, description="Folder written by `reasonlite verifier train`; required when select is verifier."
    )

    @model_validator(mode="after")
    def _verifier_needs_path(self) -> ReasoningDefaults:
        if self.select == "verifier" and not self.verifier_path:
            raise ValueError("reasoning.verifier_path is required when reasoning.select is 'verifier': point it at "
                             "the folder `reasonlite verifier train` wrote")
        return self

    def active(self) -> bool:
        return self.reasoning_budget is not None or self.pal or self.vote or self.format == "pal" \
            or self.student_prompt or self.select == "verifier"


class ModelBase(_Strict):
    name: str = Field(..., min_length=1, description="Name clients pass as `model`.")
    model: str = Field(..., min_length=1, description="Path or alias of the weights (upstream model name for openai).")
    description: str = Field("", description="Free text shown by `slm-fusion check`.")
    max_concurrency: int = Field(8, ge=1, description="Requests executed at once; the rest wait in the queue.")
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait; one more gets 429 with Retry-After.")
    timeout_s: float | None = Field(None, gt=0, description="Per-request timeout (504); default server.request_timeout_s.")
    replicas: int = Field(
        1, ge=1, description="Independent backend instances; a request goes to the least busy (--engine ray: Serve "
                             "replicas of a local model).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request gives none.")
    max_output_tokens: int | None = Field(None, ge=1, description="Largest max_tokens accepted (400 above it).")
    reasoning: ReasoningDefaults = Field(
        default_factory=ReasoningDefaults, description="Reasoning-layer defaults (budget, pal, vote) for this model."
    )
    context: ModelContext | None = Field(None, description=MODEL_CONTEXT_DESCRIPTION)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of one local model's replicas (`slm-fusion serve --engine ray`, slm_fusion.deploy_ray)."""

    min_replicas: int = Field(1, ge=0, description="Fewest Serve replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most Serve replicas started under load.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica Serve scales towards.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) exceeds max_replicas "
                             f"({self.max_replicas}); raise max_replicas")
        return self


class RayActorOptions(_Strict):
    """Resources each Serve replica of a local model reserves (`--engine ray`)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs one replica reserves in the Ray cluster.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs one replica reserves (fractions share a GPU).")


class LocalModel(ModelBase):
    """What the local engines (transformers, llama.cpp) share."""

    prefix_cache: bool = Field(True, description="Reuse the KV cache of a recent prompt's shared prefix.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="--engine ray only: Serve autoscales this model's replicas (instead of fixed `replicas`).")
    ray_actor_options: RayActorOptions = Field(
        default_factory=RayActorOptions, description="--engine ray only: resources each Serve replica reserves.")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> LocalModel:
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError(f"model '{self.name}': give either `replicas` or `autoscaling`, not both")
        return self


class TransformersModel(LocalModel):
    backend: Literal["transformers"]
    dtype: str | None = Field(None, description="torch dtype name, e.g. float32 / bfloat16.")
    device: str | None = Field(None, description="torch device; default cpu.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the decode worker.")
    max_batch_size: int = Field(8, ge=1, description="Rows (requests x n) decoded together.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long an idle batcher waits to collect concurrent requests.")
    continuous: bool = Field(True, description="Requests join the running batch between decode steps (else they wait).")
    prefix_cache_mb: float = Field(256, gt=0, description="Memory the prefix cache's stored prompts may take (LRU).")
    adapter: str | None = Field(
        None, description="A PEFT LoRA adapter folder served on `model` (the base); adapter models naming the same "
                          "base share one copy of its weights and its batches (the first one's batching knobs apply).")
    max_adapters: int = Field(8, ge=1, description="Adapters kept loaded on a shared base; the least recently used "
                                                   "is unloaded first.")


class LlamaCppModel(LocalModel):
    backend: Literal["llamacpp"]
    n_ctx: int = Field(2048, ge=16, description="Context of one sequence (prompt + completion), in tokens.")
    slots: int = Field(4, ge=1, description="Sequences decoded together; the KV cache holds slots x n_ctx tokens.")
    n_threads: int | None = Field(None, ge=1, description="llama.cpp threads; default: all cores.")
    n_batch: int = Field(512, ge=1)
    chat_template: str | None = Field(
        None, description="Jinja chat template; default: the GGUF's own `tokenizer.chat_template`."
    )


class OpenAIModel(ModelBase):
    backend: Literal["openai"]
    base_url: str = Field(..., description="Upstream base URL including /v1, e.g. http://127.0.0.1:8001/v1.")
    api_key: str | None = Field(None, description="Upstream key (prefer api_key_env).")
    api_key_env: str | None = Field(None, description="Environment variable holding the upstream key.")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(256, ge=1)
    max_keepalive_connections: int = Field(64, ge=0)
    transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp", description="Connection layer under the httpx client: aiohttp (httpx-aiohttp, faster) or httpcore."
    )
    keepalive_expiry_s: float = Field(
        4.0, gt=0, description="Drop idle upstream connections before the upstream does (uvicorn: 5 s)."
    )
    max_concurrency: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0)

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key


ModelConfig = Annotated[TransformersModel | LlamaCppModel | OpenAIModel, Field(discriminator="backend")]


class ServerConfig(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; empty = no auth.")
    api_keys_env: str | None = Field(None, description="Env var with comma-separated keys (added to api_keys).")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    request_timeout_s: float = Field(300.0, gt=0, description="Default per-request timeout (504).")
    max_n: int = Field(16, ge=1, description="Largest `n` accepted.")
    access_log: bool = Field(True, description="One JSON log line per request.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429.")

    def resolved_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys


class EmbeddingsConfig(_Strict):
    name: str = Field("all-minilm-l6-v2", description="Name clients pass as `model` to /v1/embeddings.")
    backend: Literal["sentence-transformers", "openai"] = Field(
        "sentence-transformers", description="sentence-transformers: all-MiniLM-L6-v2 in process; openai: requests "
                                             "forwarded to an OpenAI-compatible upstream's /v1/embeddings.")
    device: str = Field("cpu", description="sentence-transformers: torch device.")
    max_inputs: int = Field(256, ge=1, description="sentence-transformers: most texts in one request.")
    base_url: str | None = Field(None, description="openai: upstream base URL including /v1.")
    model: str | None = Field(None, description="openai: the upstream's model name, when it differs from `name`.")
    api_key: str | None = Field(None, description="openai: upstream key (prefer api_key_env).")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the upstream key.")

    @model_validator(mode="after")
    def _upstream_needs_url(self) -> EmbeddingsConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("embeddings.backend 'openai' needs embeddings.base_url (the upstream's URL with /v1)")
        if self.backend != "openai" and (self.base_url or self.model):
            raise ValueError("embeddings.base_url and embeddings.model are for backend 'openai': set "
                             "`backend: openai` or drop them")
        return self

    def upstream(self) -> OpenAIModel:
        """The upstream as an `openai` model config (its connection settings and error handling are reused)."""
        return OpenAIModel(name=self.name, backend="openai", model=self.model or self.name, base_url=self.base_url,
                           api_key=self.api_key, api_key_env=self.api_key_env)


class ContextConfig(RetrievalSettings):
    """Files and vector stores (`/v1/files`, `/v1/vector_stores`) and retrieval into chat (slm_fusion.context); the
    retrieval knobs (`RetrievalSettings`: top_k, max_context_tokens, min_score, hybrid_weight, diversity) are the
    defaults of every model's and request's `context`."""

    path: str = Field("context.db", description="SQLite file holding files, chunks, vectors and the BM25 index (relative to the YAML).")
    max_file_bytes: int = Field(20_000_000, ge=1, description="Largest file `/v1/files` accepts (413 above).")
    url: str | None = Field(
        None, description="postgresql://user@host/db: a PostgreSQL + pgvector store several gateway replicas share "
                          "(instead of the SQLite file at `path`).")
    vector_index: Literal["exact", "hnsw"] = Field(
        "exact", description="Dense search on `url`: exact scan, or a pgvector HNSW index (approximate; faster on "
                             "big stores). The SQLite store is always exact.")
    batch_lease_s: float = Field(
        30.0, gt=0, description="A file batch whose worker stopped renewing its claim this long (killed) is resumed "
                                "by the next worker that starts or reads it.")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgresql+psycopg2://")):
            raise ValueError(f"context.url '{url}' must start with postgresql:// (or leave it out for the SQLite "
                             "file at context.path)")
        return url


class UIConfig(_Strict):
    """The web console at `/ui` (slm_fusion.ui): its pages are public and carry no data; the data it shows comes
    from `/ui/api/*`, which needs the same bearer key as the API."""

    enabled: bool = Field(True, description="Serve the web console at /ui and its data endpoints at /ui/api.")
    runs_dir: str | None = Field(
        None, description="Folder holding ReasonLite run folders (`reasonlite run`'s runs_dir), shown on the Runs "
                          "page (relative to the YAML).")
    route_eval_dir: str | None = Field(
        None, description="Folder `slm-fusion route-eval --out` wrote; its cost/quality curve is shown on the "
                          "Routing page (relative to the YAML).")
    sample_interval_s: float = Field(
        2.0, gt=0, description="Seconds between two points of the console's per-model metric series.")
    history_points: int = Field(300, ge=2, description="Points kept per metric series (the oldest are dropped).")
    recent_routes: int = Field(200, ge=1, description="Route decisions kept in memory for the Routing page.")
class KeysConfig(_Strict):
    """API keys with per-key budgets and the usage ledger, in a database (slm_fusion.keys); added to server.api_keys."""

    url: str = Field(..., description="Database URL: sqlite:///path/keys.db (one host) or postgresql://user@host/db "
                                      "(several replicas share it).")
    flush_interval_s: float = Field(
        1.0, gt=0, le=3600, description="Ledger rows are written every this many seconds (a crash loses at most the "
                                        "last interval's rows); also how stale key records and other replicas' "
                                        "usage may be.")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql"):
            raise ValueError(f"keys.url '{url}' must start with sqlite:/// or postgresql://")
        return url


class TracingConfig(_Strict):
    """OpenTelemetry spans per request (slm_fusion.tracing); off unless `enabled`."""

    enabled: bool = Field(False, description="Create spans (one per request, children for routing, reasoning, "
                                             "backend calls and retrieval) and propagate W3C traceparent upstream.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces; null = spans are made and "
                          "propagated but not exported (needs opentelemetry-exporter-otlp-proto-http when set).")
    service_name: str = Field("slm-fusion", description="`service.name` resource attribute of every span.")
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces recorded (a client's sampled traceparent is always "
                                         "followed); below 1 lowers the cost of tracing at high request rates.")


class FusionConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    keys: KeysConfig | None = Field(None, description="API keys with budgets and a usage ledger in a database.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="OpenTelemetry tracing (off by default).")
    models: list[ModelConfig] = Field(default_factory=list)
    embeddings: EmbeddingsConfig | None = None
    context: ContextConfig | None = Field(None, description="Files, vector stores and retrieval; needs `embeddings`.")
    routers: dict[str, RouterSpec] = Field(
        default_factory=dict, description="Router definitions by name; `type` picks the router class (slm_fusion.routing).")
    virtual_models: dict[str, VirtualModelSpec] = Field(
        default_factory=dict, description="Virtual model names served through a router: {router: NAME} or a router "
                                          "inline (a list of entries with `name` is accepted too).")
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="Fallbacks and replica cooldowns: fallbacks, allowed_fails, cooldown_s.")
    ui: UIConfig = Field(default_factory=UIConfig, description="The web console at /ui (slm_fusion.ui).")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelBase]) -> list[ModelBase]:
        seen: set[str] = set()
        for m in models:
            if m.name in seen:
                raise ValueError(f"models: duplicate name '{m.name}'; each model needs a unique `name`")
            seen.add(m.name)
        return models

    @field_validator("virtual_models", mode="before")
    @classmethod
    def _virtual_models_canonical(cls, raw: Any, info: ValidationInfo) -> Any:
        return canonical_virtual_models(raw, set(info.data.get("routers") or {}))

    @model_validator(mode="after")
    def _routing_names(self) -> FusionConfig:
        check_names(self.routers, self.virtual_models, {m.name for m in self.models}, self.routing)
        return self

    @model_validator(mode="after")
    def _embedding_name_free(self) -> FusionConfig:
        if self.embeddings and any(m.name == self.embeddings.name for m in self.models):
            raise ValueError(f"embeddings.name '{self.embeddings.name}' clashes with a chat model; rename one")
        if self.context and not self.embeddings:
            raise ValueError("context needs an embedding model to index and search with: add `embeddings: {}`")
        if self.context and self.embeddings.backend != "sentence-transformers":
            raise ValueError("context indexes with the in-process embedding model (its tokenizer sizes the chunks): "
                             "use `embeddings.backend: sentence-transformers` or drop `context`")
        return self

    @model_validator(mode="after")
    def _declared_context_needs_a_store(self) -> FusionConfig:
        declared = [f"models.{m.name}" for m in self.models if m.context is not None]
        declared += [f"virtual_models.{n}" for n, v in self.virtual_models.items() if getattr(v, "context", None)]
        if declared and self.context is None:
            raise ValueError(f"{declared[0]}.context retrieves from vector stores, but the gateway has none: add "
                             "`context: {}` (and `embeddings: {}`) to the YAML")
        return self

    def model(self, name: str) -> ModelBase | None:
        return next((m for m in self.models if m.name == name), None)

    def declared_context(self, name: str) -> ModelContext | None:
        """The `context:` a model or virtual model of this name declares (None when it declares none)."""
        spec = self.model(name) or self.virtual_models.get(name)
        return getattr(spec, "context", None)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and what to change."""


def _relative_to(base: Path, ref: object, *, looks_like_file: bool = False) -> object:
    """`ref` resolved against the YAML's folder when it is a relative path that exists there (or is written `./x`,
    `../x`, or looks like a file); anything else (aliases, hub-style names, absolute paths) comes back unchanged."""
    if not isinstance(ref, str) or not ref or ref.startswith("~") or Path(ref).is_absolute():
        return ref
    candidate = base / ref
    if candidate.exists() or ref.startswith(("./", "../")):
        return str(candidate.resolve())
    if looks_like_file and not Path(ref).exists():  # missing either way: the error names the YAML-relative path
        return str(candidate.resolve())
    return ref  # an alias, or a file that exists only relative to the current directory (older configs)


_ROUTER_FILE_KEYS = ("path", "exemplars_file")  # classifier router file; semantic router exemplars


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths mean relative to the YAML file (as in every config that names files), not to the
    directory the server happens to be started from: model weights, router files, verifier folders."""
    for m in raw.get("models") or []:
        if not isinstance(m, dict):
            continue
        if m.get("backend") in ("transformers", "llamacpp"):
            ref = m.get("model")
            m["model"] = _relative_to(base, ref, looks_like_file=isinstance(ref, str) and ref.endswith(".gguf"))
        if m.get("adapter"):
            m["adapter"] = _relative_to(base, m["adapter"], looks_like_file=True)
        if isinstance(m.get("reasoning"), dict) and "verifier_path" in m["reasoning"]:
            m["reasoning"]["verifier_path"] = _relative_to(base, m["reasoning"]["verifier_path"])
    if isinstance(raw.get("keys"), dict) and str(raw["keys"].get("url", "")).startswith("sqlite:///"):
        path = raw["keys"]["url"][len("sqlite:///"):]
        raw["keys"]["url"] = "sqlite:///" + str(_relative_to(base, path, looks_like_file=True))
    if isinstance(raw.get("context"), dict):
        raw["context"]["path"] = _relative_to(base, raw["context"].get("path", "context.db"), looks_like_file=True)
    if isinstance(raw.get("ui"), dict):
        for key in ("runs_dir", "route_eval_dir"):
            if raw["ui"].get(key):
                raw["ui"][key] = _relative_to(base, raw["ui"][key], looks_like_file=True)
    for section in ("routers", "virtual_models"):
        specs = raw.get(section) or {}
        for spec in specs.values() if isinstance(specs, dict) else specs:
            if isinstance(spec, dict):
                for key in _ROUTER_FILE_KEYS:
                    if key in spec:
                        spec[key] = _relative_to(base, spec[key], looks_like_file=True)


def load_fusion_config(path: str | Path) -> FusionConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with `models:` and optional `server:`")
    _resolve_paths(raw, path.resolve().parent)
    try:
        return FusionConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"config {path}", schema=FusionConfig,
                                                  listing="the model and section classes in slm_fusion/config.py list every field")) from None
