"""The web console at `/ui`: server-rendered Jinja2 pages (Models, Playground, Routing, Runs) with a little
hand-written JS, served by the gateway itself — no Node build, no second process.

Auth: the pages and their static files carry no data and are public; everything they show comes from `/ui/api/*`
(and the playground from `/v1/chat/completions` itself), which need the same `Authorization: Bearer <key>` as the
API (middleware). The browser gets the key from the user: typed into the page once and kept in `sessionStorage`
(gone with the tab, never in a cookie, so no request is authorised behind the user's back).

The data endpoints, all JSON:
  GET /ui/api/models        each model and virtual model: backend, replicas (health, cooldown left), queue, fallbacks
  GET /ui/api/metrics       per-model series of request rate, p50/p95 latency and tokens/s (`metrics.MetricSeries`)
  GET /ui/api/routes        the recent route decisions (`Gateway.recent_routes`) and the route-eval report
  GET /ui/api/runs          the ReasonLite runs under `ui.runs_dir`; /ui/api/runs/{name} one run (`ui.runs`)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from slm_fusion.errors import NotFound
from slm_fusion.metrics import MetricSeries
from slm_fusion.ui import runs

HERE = Path(__file__).parent
PAGES = {"models": "Models", "playground": "Playground", "routing": "Routing", "runs": "Runs"}


def is_public(path: str) -> bool:
    """The console's pages and static files: public, since they hold no data (the middleware asks no key)."""
    return path == "/ui" or (path.startswith("/ui/") and not path.startswith("/ui/api/"))


def add_ui_routes(app: FastAPI, gw: Any, json_response: Any) -> None:
    cfg = gw.config.ui
    templates = Jinja2Templates(directory=HERE / "templates")
    series = MetricSeries(gw.metrics, cfg.sample_interval_s, cfg.history_points)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.get("/ui", include_in_schema=False)
    async def console() -> Response:
        return RedirectResponse("/ui/models")

    @app.get("/ui/{page}", include_in_schema=False)
    async def page(request: Request, page: str) -> Response:
        if page not in PAGES:
            raise NotFound(f"No console page '{page}'; pages: {', '.join(PAGES)}")
        return templates.TemplateResponse(request, f"{page}.html", {"page": page, "pages": PAGES,
                                                                        "auth": bool(gw.api_keys)})

    @app.get("/ui/api/models", include_in_schema=False)
    async def models() -> Response:
        return json_response({"models": models_view(gw), "context": gw.config.context is not None})

    @app.get("/ui/api/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return json_response({"interval_s": cfg.sample_interval_s, "models": series.read()})

    @app.get("/ui/api/routes", include_in_schema=False)
    async def routes() -> Response:
        report = await asyncio.to_thread(route_eval, cfg.route_eval_dir)
        return json_response({"recent": list(reversed(gw.recent_routes)), "route_eval": report,
                              "route_eval_dir": cfg.route_eval_dir})

    @app.get("/ui/api/runs", include_in_schema=False)
    async def run_list() -> Response:
        found = await asyncio.to_thread(runs.list_runs, cfg.runs_dir) if cfg.runs_dir else []
        return json_response({"runs_dir": cfg.runs_dir, "runs": found})

    @app.get("/ui/api/runs/{name}", include_in_schema=False)
    async def run(name: str) -> Response:
        folder = runs.run_folder(cfg.runs_dir, name) if cfg.runs_dir else None
        if folder is None:
            raise NotFound(f"No run '{name}' under ui.runs_dir ({cfg.runs_dir or 'not set'})")
        return json_response(await asyncio.to_thread(runs.read_run, cfg.runs_dir, folder))


def models_view(gw: Any) -> list[dict[str, Any]]:
    """What the Models page shows per model: its deployments' health and load, read from the live handles."""
    out: list[dict[str, Any]] = []
    for name, h in gw.handles.items():
        health = h.health
        now = health.clock() if health is not None else 0.0
        replicas = [{
            "index": i, "active": h.active[i],
            "healthy": health.healthy(i) if health is not None else True,
            "fails": health.fails[i] if health is not None else 0,
            "cooldown_left_s": round(max(0.0, health.cooling_until[i] - now), 3) if health is not None else 0.0,
        } for i in range(len(h.backends))]
        out.append({"name": name, "kind": "model", "backend": h.config.backend, "state": h.state,
                    "replicas": replicas, "queued": h.waiting, "in_flight": h.admitted - h.waiting,
                    "max_concurrency": h.config.max_concurrency, "max_queue": h.config.max_queue,
                    "fallbacks": gw.routing.fallbacks.get(name, []),
                    "reasoning": h.config.reasoning.model_dump() if h.config.reasoning.active() else None})
    for name, vm in gw.routers.items():
        if name not in gw.handles:
            router = getattr(vm, "router", vm)
            out.append({"name": name, "kind": "virtual", "router": getattr(router, "name", None),
                        "router_kind": getattr(router, "kind", None), "targets": sorted(vm.targets())})
    return out


def route_eval(folder: str | None) -> dict[str, Any] | None:
    """`route_eval.json` that `slm-fusion route-eval` wrote, without its per-prompt outcomes (None when absent)."""
    path = Path(folder) / "route_eval.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"error": f"{path} does not parse: {e}"}
    return {"routers": [{k: r.get(k) for k in ("virtual_model", "kind", "router", "accuracy", "n", "latency_ms")}
                        for r in report.get("routers", [])],
            "cascades": [{k: c.get(k) for k in ("name", "small", "big", "n", "curve")}
                         for c in report.get("cascades", [])]}
