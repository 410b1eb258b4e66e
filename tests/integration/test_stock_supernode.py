"""Florist's app on stock flower-supernode processes (a ClientApp process per message)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import Api, FlowerStack, start_stack
from .test_e2e import FEDAVG

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    with start_stack(tmp_path_factory.mktemp("stock"), [{}, {}, {}], warm=False) as stack:
        yield stack


def test_fedavg_on_stock_supernodes(api: Api) -> None:
    exp = api.submit(FEDAVG | {"name": "e2e-stock", "rounds": 2})
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()
    assert updates["count"] == 6 and {u["status"] for u in updates["data"]} == {"accepted"}
