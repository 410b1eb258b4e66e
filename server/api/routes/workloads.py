"""GET /workloads: every registered workload plugin with its config schema."""

from fastapi import APIRouter

from florist.client.workloads import default_workloads
from florist.server.api.schemas import WorkloadPublic, WorkloadsPublic

router = APIRouter(prefix="/workloads", tags=["workloads"])


@router.get("", response_model=WorkloadsPublic)
def list_workloads() -> WorkloadsPublic:
    plugins, errors = default_workloads().load_all()
    data = [
        WorkloadPublic(
            name=p.name,
            summary=p.summary,
            tags=list(p.tags),
            config_schema=p.config_schema(),
            server_evaluation=p.load_test is not None,
        )
        for p in plugins
    ]
    return WorkloadsPublic(data=data, count=len(data), errors=errors)
