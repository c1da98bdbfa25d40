"""`slm-fusion serve CONFIG --engine ray`: the same gateway on Ray Serve.

The FastAPI app of `create_app` is the Serve ingress (`serve.ingress`, built on the replica); each local model
(transformers, llama.cpp) is its own Serve deployment, `ModelReplica`, wrapping the real backend. In the ingress a
`ServeBackend` stands in for the local backend: it implements the `Backend` protocol by calling the model's
deployment handle (`generate`, and `stream` through a streaming handle), so routing, the reasoning layer, fusion,
context retrieval and every HTTP rule run in the ingress exactly as under uvicorn. OpenAI-compatible upstreams stay
in the ingress (they are I/O only).

`format_chat` / `count_tokens` are synchronous in the protocol and called on the ingress's event loop (the reasoning
layer, context packing), so the ingress loads the model's tokenizer only — no weights — rather than making them
remote calls: a transformers model's tokenizer, a GGUF's vocabulary (`vocab_only`).

Config (per local model, slm_fusion.config): `replicas` is the number of Serve replicas under this engine (and of
in-process replicas under uvicorn), or `autoscaling: {min_replicas, max_replicas, target_ongoing_requests}`;
`ray_actor_options: {num_cpus, num_gpus}` is what each replica reserves; `max_concurrency` is each replica's
`max_ongoing_requests`. Ray is the optional extra `ray` (`pip install '.[ray]'`): nothing here imports it at
module level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from slm_fusion.backends.base import Backend, Generation, GenerationRequest, TokenChunk, backend_class, make_backend
from slm_fusion.config import FusionConfig, LocalModel, ModelBase
from slm_fusion.errors import FusionError, Unavailable

APP_NAME = "slm-fusion"
INGRESS_NAME = "gateway"


def deployment_name(model: str) -> str:
    return f"model-{model}"


class ModelReplica:
    """One Serve replica of a local model: the real backend, started in the constructor (Serve awaits it)."""

    async def __init__(self, config: LocalModel) -> None:
        self.backend = make_backend(config)
        await self.backend.start()

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        return await self.backend.generate(req)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.backend.stream(req):
            yield chunk


def _tokenizer_twin(config: ModelBase) -> Backend:
    """The local backend class with its tokenizer loaded and no weights: its own `format_chat`/`count_tokens`
    then run in the ingress, unchanged. Only the attributes those two methods read are filled in."""
    twin = backend_class(config.backend)(config)
    if config.backend == "transformers":
        from reasonlite.models import load_tokenizer

        twin.tokenizer = load_tokenizer(config.model)
    else:  # llamacpp: the GGUF's vocabulary and metadata (chat template, BOS/EOS), as LlamaCppBackend._load reads them
        from llama_cpp import Llama

        from slm_fusion.backends.llamacpp import gguf_path

        twin.llm = Llama(model_path=str(gguf_path(config.model)), vocab_only=True, verbose=False)
        twin.chat_template = twin.chat_template or twin.llm.metadata.get("tokenizer.chat_template")
        for name, token_id in (("bos_token", twin.llm.token_bos()), ("eos_token", twin.llm.token_eos())):
            if token_id is not None and token_id >= 0:
                twin._special[name] = twin.llm.detokenize([token_id], special=True).decode("utf-8", "replace")
    return twin


def _lost(config: ModelBase, exc: BaseException) -> Exception:
    """A Ray failure as the gateway's own error: a backend's FusionError comes back as itself; a dead or
    unreachable replica is a retryable 503 (the fallback chain tries again, Serve restarts the replica)."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, FusionError):
        return cause
    return Unavailable(f"model '{config.name}': its Ray Serve replica failed ({type(cause).__name__}); retry")


class ServeBackend:
    """The `Backend` protocol over a Serve deployment handle (see the module docstring)."""

    def __init__(self, config: ModelBase, handle: Any) -> None:
        self.config = config
        self.handle = handle
        cls = backend_class(config.backend)
        self.supports_response_format = getattr(cls, "supports_response_format", False)
        self.supports_logprobs = getattr(cls, "supports_logprobs", False)
        self.supports_completion_logprobs = getattr(cls, "supports_completion_logprobs", False)
        self._twin: Backend | None = None

    async def start(self) -> None:
        if self._twin is None:  # the same object may stand for several Serve replicas in the ingress
            import asyncio

            self._twin = await asyncio.to_thread(_tokenizer_twin, self.config)

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            return await self.handle.generate.remote(req)
        except (RayError, RayServeException) as e:
            raise _lost(self.config, e) from None

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        chunks = self.handle.options(stream=True).stream.remote(req)
        finished = False
        try:
            async for chunk in chunks:
                yield chunk
            finished = True
        except (RayError, RayServeException) as e:
            raise _lost(self.config, e) from None
        finally:
            if not finished:  # the client went away (or the replica did): stop the replica's decode
                chunks.cancel()

    def count_tokens(self, text: str) -> int:
        return self._twin.count_tokens(text)

    def format_chat(self, messages: list[dict[str, Any]]) -> str:
        return self._twin.format_chat(messages)

    async def aclose(self) -> None:
        return None


def replica_count(config: ModelBase) -> int:
    """How many Serve replicas the ingress may spread one model's requests over (the most it can have)."""
    auto = getattr(config, "autoscaling", None)
    return auto.max_replicas if auto is not None else config.replicas


class GatewayIngress:
    """The Serve ingress: `create_app` with each local model's backend replaced by its deployment handle."""

    def __init__(self, config: FusionConfig, models: dict[str, Any]) -> None:
        self.config = config
        self.models = models

    def __serve_build_asgi_app__(self):
        from slm_fusion.app import create_app

        backends: dict[str, list[Backend]] = {}
        for name, handle in self.models.items():
            cfg = self.config.model(name)
            # One entry per Serve replica: the gateway's fallback chain retries a model once per extra replica, and
            # its admission queue holds max_concurrency per replica, as under uvicorn. Serve picks the replica.
            backends[name] = [ServeBackend(cfg, handle)] * replica_count(cfg)
        return create_app(self.config, backends=backends)


def deployment_options(config: LocalModel) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": deployment_name(config.name),
        "ray_actor_options": config.ray_actor_options.model_dump(),
        "max_ongoing_requests": config.max_concurrency,
        "max_queued_requests": config.max_queue,
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.replicas
    return options


def build_application(config: FusionConfig):
    """The Serve application: the ingress bound to one deployment per local model."""
    from ray import serve

    models = {m.name: serve.deployment(ModelReplica, **deployment_options(m)).bind(m)
              for m in config.models if m.backend != "openai"}
    ingress = serve.deployment(serve.ingress()(GatewayIngress), name=INGRESS_NAME,
                               ray_actor_options={"num_cpus": 0})  # I/O and tokenizing only: no CPU reserved
    return ingress.bind(config, models)


def run(config: FusionConfig, *, host: str, port: int, address: str | None, blocking: bool = True) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port and deploy the gateway."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)  # address None: a local Ray on this machine
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=blocking)
