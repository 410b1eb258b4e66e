"""The REST API's routers, collected in one place."""

from fastapi import APIRouter

from . import events, experiments, health, node_keys, nodes, strategies, workloads

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(experiments.router)
api_router.include_router(events.router)
api_router.include_router(nodes.router)
api_router.include_router(strategies.router)
api_router.include_router(workloads.router)
api_router.include_router(health.router)
api_router.include_router(node_keys.router)
