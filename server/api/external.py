"""How the API shows an external experiment, which has no Florist spec (source 'external')."""

from __future__ import annotations

from typing import Any

from florist.client.task import StrategyRef
from florist.server.api.schemas import ExperimentPublic
from florist.server.db.models import Experiment
from florist.server.db.repository import Progress
from florist.server.external import UNKNOWN_STRATEGY, ExternalSpec


def row_fields(exp: Experiment, progress: Progress | None) -> dict[str, Any]:
    """The fields every experiment shows, external or not: its row's and its progress."""
    progress = progress or Progress()
    return {
        "id": exp.id,
        "name": exp.name,
        "status": exp.status,
        "num_rounds": exp.num_rounds,
        "current_round": progress.current_round,
        "accepted_updates": progress.accepted_updates,
        "best_accuracy": progress.best_accuracy,
        "best_round": progress.best_round,
        "best_val_accuracy": progress.best_val_accuracy,
        "best_by": progress.best_by,
        "flwr_run_id": None if exp.flwr_run_id is None else str(exp.flwr_run_id),
        "error": exp.error,
        "resumes": exp.resumes,
        "created_at": exp.created_at,
        "started_at": exp.started_at,
        "finished_at": exp.finished_at,
    }


def external_to_public(exp: Experiment, progress: Progress | None = None) -> ExperimentPublic:
    """The experiment as the API lists it: what Flower said of the run and what was recorded."""
    spec = ExternalSpec.model_validate(exp.spec)
    strategy = spec.strategy or StrategyRef(name=exp.strategy or UNKNOWN_STRATEGY)
    return ExperimentPublic(
        **row_fields(exp, progress),
        source="external",
        app=f"{spec.app} {spec.app_version}".strip() or None,
        run_config=spec.run_config,
        strategy=strategy,
        # Florist's spec fields: an external app's data, model and training are its own.
        workload=None,
        training={},
        clients=spec.clients,
        asynchronous=False,  # Flower's Strategy.start runs synchronous rounds
    )
