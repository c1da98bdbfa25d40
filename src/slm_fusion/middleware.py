"""Pure-ASGI middleware in front of every route (request id, auth and key budgets, body-size limit, access log,
metrics, the usage ledger row, the last-resort OpenAI-shaped 500) and the gateway's JSON log format."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from slm_fusion import tracing
from slm_fusion.errors import AuthenticationFailed, FusionError, RequestTooLarge
from slm_fusion.keys import KeyRecord, UsageRow
from slm_fusion.ui import is_public  # the console's pages and static files, which carry no data

if TYPE_CHECKING:  # the middleware reads the gateway's keys, limits and metrics; no import at run time
    from slm_fusion.gateway import Gateway

log = logging.getLogger("slm_fusion")
access_log = logging.getLogger("slm_fusion.access")

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ROUTE_LABELS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models", "/health", "/metrics"}
)


class GatewayMiddleware:
    """Pure ASGI (no per-request task or body copy): request id, auth, size limit, access log, metrics."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway
        self.max_bytes = gateway.config.server.max_request_bytes
        self.access_log = gateway.config.server.access_log
        self.keys = gateway.keys  # slm_fusion.keys.KeyAccounting, or None without a `keys:` section
        self.tracer = gateway.tracer  # None when tracing is off

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope["path"]
        request_id = None
        auth = None
        length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif key == b"authorization":
                auth = value
            elif key == b"content-length":
                length = value
        request_id = request_id or uuid.uuid4().hex
        rid_header = (b"x-request-id", request_id.encode("latin-1"))
        status_box = [500]
        started = [False]
        key: KeyRecord | None = None  # a database key (its budget admitted this request): one ledger row
        traced = None  # the request span (slm_fusion.tracing), current for the whole request
        if self.tracer is not None:
            scope["fusion.request_id"] = request_id
            headers = dict(scope["headers"])
            traced = tracing.start_request(self.tracer, scope, headers.get(b"traceparent"), headers.get(b"tracestate"))

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        async def reply(err: FusionError) -> None:
            body = orjson.dumps(err.to_dict())
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
            await send_wrapped({"type": "http.response.start", "status": err.status, "headers": headers})
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            if (self.gw.api_keys or self.keys is not None) and path not in PUBLIC_PATHS \
                    and not is_public(path):
                found = self._authenticate(auth)
                if found is None:
                    await reply(AuthenticationFailed(
                        "Missing or invalid API key: send `Authorization: Bearer <key>` with a key from "
                        "server.api_keys or `slm-fusion keys create`."))
                    return
                if found is not True:
                    if (refused := self.keys.admit(found)) is not None:
                        await reply(refused)
                        return
                    key = scope["fusion.key"] = found
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                await reply(RequestTooLarge(
                    f"Request body of {int(length)} bytes exceeds the limit of {self.max_bytes} bytes "
                    "(server.max_request_bytes)."
                ))
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffer_chunked(receive)
                if receive is None:
                    await reply(RequestTooLarge(
                        f"Request body exceeds the limit of {self.max_bytes} bytes (server.max_request_bytes)."
                    ))
                    return
            await self.app(scope, receive, send_wrapped)
        except Exception as e:  # the last resort: never a bare 500
            log.exception("unhandled error", extra={"fusion": {"request_id": request_id, "path": path}})
            if not started[0]:
                err = e if isinstance(e, FusionError) else ServerError(f"internal error: {type(e).__name__}")
                await reply(err)
        finally:
            elapsed = time.perf_counter() - start
            model = scope.get("fusion.model", "")
            route = path if path in ROUTE_LABELS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.gw.metrics.observe_request(model, route, status_box[0], elapsed)
            if key is not None:  # the one place a ledger row is made: after the last byte, for every status
                prompt, completion, reasoning = scope.get("fusion.usage") or (0, 0, 0)
                self.keys.record(key, UsageRow(
                    ts=time.time() - elapsed, request_id=request_id, key_id=key.id, path=path,
                    requested_model=scope.get("fusion.requested", ""), model=model,
                    route=scope.get("fusion.route", ""), status=status_box[0], prompt_tokens=prompt,
                    completion_tokens=completion, reasoning_tokens=reasoning, latency_ms=round(elapsed * 1000, 3)))
            if traced is not None:
                tracing.finish_request(traced, scope, status_box[0])
            if self.access_log:
                access_log.info("request", extra={"fusion": {
                    "request_id": request_id, "method": scope["method"], "path": path, "status": status_box[0],
                    "duration_ms": round(elapsed * 1000, 3), "model": model,
                    **({"route": scope["fusion.route"]} if scope.get("fusion.route") else {}),
                }})

    def _authenticate(self, header: bytes | None) -> KeyRecord | bool | None:
        """True for a static key (server.api_keys), the record of a database key, None for anything else."""
        if not header or header[:7].lower() != b"bearer ":
            return None
        presented = header[7:].strip()
        if any(hmac.compare_digest(presented, key) for key in self.gw.api_keys):
            return True
        # Database keys are matched by their sha256 in memory (refreshed every keys.flush_interval_s).
        return self.keys.lookup(presented) if self.keys is not None else None

    async def _buffer_chunked(self, receive: Any) -> Any | None:
        """A chunked body has no Content-Length: read it (at most max_bytes) before the app sees it.

        Returns a replaying `receive`, or None when the body is too large.
        """
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                parts = None  # client gone; let the app see the disconnect
                break
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return None
            parts.append(body)
            if not message.get("more_body"):
                break
        first = {"type": "http.request", "body": b"".join(parts), "more_body": False} if parts is not None else message
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay


class ServerError(FusionError):
    status = 500
    type = "server_error"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fusion": {...}}` fields are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        out.update(getattr(record, "fusion", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("slm_fusion")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
