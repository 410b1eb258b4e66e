"""GET /strategies: every registered plugin with its config schema."""

from fastapi import APIRouter

from florist.server.api.schemas import StrategiesPublic, StrategyPublic
from florist.strategies import default_registry

router = APIRouter(prefix="/strategies", tags=["strategies"])


@router.get("", response_model=StrategiesPublic)
def list_strategies() -> StrategiesPublic:
    plugins, errors = default_registry().load_all()
    data = [
        StrategyPublic(
            name=p.name,
            summary=p.summary,
            paper=p.paper,
            tags=list(p.tags),
            config_schema=p.config_schema(),
        )
        for p in plugins
    ]
    return StrategiesPublic(data=data, count=len(data), errors=errors)
