"""The small endpoints: models, health, metrics, admin and the engine debug view."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.server.errors import error_response
from freehold.server.metrics import CONTENT_TYPE
from freehold.server.protocol import ErrorResponse, ModelCard, ModelList
from freehold.server.serving import Serving

router = APIRouter()


def _serving(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/models", response_model=ModelList, include_in_schema=False)  # base URL without /v1
@router.get("/v1/models", response_model=ModelList, summary="The model this server serves")
async def list_models(request: Request) -> ModelList:
    serving = _serving(request)
    return ModelList(data=[_card(serving, name) for name in serving.model_names])


@router.get("/models/{model_id:path}", response_model=ModelCard, include_in_schema=False)
@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, request: Request) -> ModelCard:
    serving = _serving(request)
    return _card(serving, serving.check_model(model_id))


@router.get("/health", summary="200 while the engine steps; 503 when its thread died or a step is stuck",
            response_model=None, responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> Response | dict[str, str]:
    state = _serving(request).engine.health()
    if not state.ok:
        return error_response(503, f"the engine is not serving: {state.reason}", code="engine_unhealthy")
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> Response:
    return Response(_serving(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/admin/reset_prefix_cache", summary="Drop every cached, unreferenced KV block")
async def reset_prefix_cache(request: Request) -> dict[str, int]:
    num_blocks = await _serving(request).engine.call(lambda engine: engine.reset_prefix_cache())
    return {"num_blocks_reset": int(num_blocks)}  # type: ignore[call-overload]


@router.get("/debug/engine", summary="The engine's scheduler and KV state (for tests and operators)")
async def engine_state(request: Request) -> dict[str, float | int]:
    serving = _serving(request)
    s = serving.engine.stats()
    return {"num_running": s.num_running, "num_waiting": s.num_waiting, "num_pending": serving.num_pending,
            "kv_blocks_total": s.kv_blocks_total, "kv_blocks_used": s.kv_blocks_used, "kv_usage": s.kv_usage,
            "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
            "num_preemptions": s.num_preemptions}


def _card(serving: Serving, name: str) -> ModelCard:
    return ModelCard(id=name, created=serving.created, max_model_len=serving.max_model_len)
