"""The task protocol: typed fields encoded in one place, and seeds that do not collide."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from pydantic import ValidationError

from florist.client.protocol import Dropout, TrainInstruction, TrainReport
from florist.datasets.seeds import derive_seed
from florist.server.runtime import train_update


def test_an_instruction_travels_beside_the_task_spec_and_strategy_entries() -> None:
    sent = TrainInstruction(server_round=3, model_version=2, task_repeat=1, virtual_time=12.5)
    record = ConfigRecord(
        {**sent.to_record_dict(), "florist.seed": 4, "proximal-mu": 0.1}  # others beside it
    )
    assert TrainInstruction.from_record_dict(record) == sent
    # On the wall clock there is no virtual time: the key is left out, and reads back as None.
    wall = TrainInstruction(server_round=1, model_version=0)
    assert "virtual-time" not in wall.to_record_dict()
    assert TrainInstruction.from_record_dict(wall.to_record_dict()) == wall


def test_a_missing_or_bad_field_is_an_error_naming_it_not_a_default() -> None:
    with pytest.raises(ValidationError) as info:
        TrainInstruction.from_record_dict({"server-round": 2})
    assert [e["loc"] for e in info.value.errors()] == [("model_version",)]
    with pytest.raises(ValidationError, match="server_round"):
        TrainInstruction.from_record_dict({"server-round": 0, "model-version": 0})


def test_a_report_round_trips_through_a_metric_record() -> None:
    report = TrainReport(num_examples=10, local_steps=5, train_time=0.25)
    metrics = report.to_metrics({"train-loss": 0.5})
    assert dict(metrics) == {
        "train-loss": 0.5,
        "num-examples": 10,
        "local-steps": 5,
        "train-time": 0.25,
    }
    assert TrainReport.from_metrics(metrics) == report


def test_a_reply_breaking_the_protocol_is_rejected_with_the_key() -> None:
    sent = {"w": np.zeros(2, np.float32)}
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
            "metrics": MetricRecord({"num-examples": 4, "local-steps": -1}),
        }
    )
    update = train_update(content, sent, node_id=1)
    assert update.status == "rejected"
    assert update.reason is not None and update.reason.startswith(
        "metrics break the protocol: local-steps"
    )
    content["metrics"] = MetricRecord({"num-examples": 4, "local-steps": 3})
    good = train_update(content, sent, node_id=1)
    assert (good.status, good.local_steps, good.num_examples) == ("accepted", 3, 4)


def test_a_dropout_round_trips_and_other_errors_are_not_dropouts() -> None:
    dropout = Dropout(profile="slow", after_s=1.25)
    assert Dropout.from_error(dropout.to_error()) == dropout
    assert Dropout.from_error(Error(code=0, reason="dropped out (profile x) after 1 s")) is None
    assert Dropout.from_error(Error(code=Dropout.CODE, reason="out of memory")) is None


def test_derived_seeds_do_not_collide_where_arithmetic_did() -> None:
    # The old node seed, seed·1000 + partition, gave seed 0 / partition 1000 the stream of
    # seed 1 / partition 0.
    assert 0 * 1000 + 1000 == 1 * 1000 + 0
    assert derive_seed(0, "node", 1000, 0) != derive_seed(1, "node", 0, 0)
    # Every part counts, in its place and with its type.
    seeds = {
        derive_seed(1, 2),
        derive_seed(12),
        derive_seed(2, 1),
        derive_seed("1", 2),
        derive_seed(1, 2, 0),
        derive_seed(2**32),
        derive_seed(1, 0),
    }
    assert len(seeds) == 7
    assert derive_seed(5, "round", 3) == derive_seed(5, "round", 3)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(("part", "error"), [(-1, ValueError), (True, TypeError), (1.5, TypeError)])
def test_a_bad_seed_part_is_refused(part: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        derive_seed(part)  # type: ignore[arg-type]
