"""Per-client weights that undo asynchronous aggregation's bias toward fast clients."""

from __future__ import annotations

from collections import Counter
from typing import Literal

ClientWeighting = Literal["none", "data", "frequency"]

CLIENT_WEIGHTING_DOC = (
    "Weight w_i of an update from client i, on top of the staleness factor. none: w_i = 1 (the "
    "paper's rule). data: w_i = M·p_i = n_i / mean_j n_j, with p_i = n_i / Σ_j n_j the client's "
    "share of the examples. frequency: w_i = p_i / q_i, with q_i = a_i / A the client's share of "
    "the arrivals so far (Fraboni et al., JMLR 2023: d_i = p_i / arrival frequency). The sums run "
    "over the M clients that have sent an update so far, counting this one; n_j is a client's "
    "latest example count. With equal data and equal speeds every variant gives w_i = 1."
)


def data_shares(examples: dict[int, float]) -> dict[int, float]:
    """p_i = n_i / Σ_j n_j over the clients that reported (all 0 when none holds data)."""
    total = float(sum(examples.values()))
    return {node: (n / total if total > 0 else 0.0) for node, n in examples.items()}


class ArrivalWeights:
    """Counts what the server has seen of each client and weighs each new arrival.

    Asynchronous aggregation applies an update every time a client reports, so a client that
    reports k times as often moves the global model k times as often: the run optimises
    Σ_i q_i·f_i (q_i its share of the arrivals) instead of the federated objective Σ_i p_i·f_i.
    Fraboni et al. (JMLR 2023, https://arxiv.org/abs/2206.10189) weigh each update by p_i / q_i
    to undo this. Here p_i and q_i are estimated from what has arrived (no client reports its
    speed ahead of time), over the clients seen so far; see ``CLIENT_WEIGHTING_DOC``.
    """

    def __init__(self, mode: ClientWeighting) -> None:
        self.mode = mode
        self.examples: dict[int, float] = {}  # n_j, each client's latest example count
        self.arrivals: Counter[int] = Counter()  # a_j
        self.total_arrivals = 0  # A

    def weigh(self, node_id: int, num_examples: float) -> float:
        """Record one arrival from ``node_id`` and return its weight w_i."""
        self.examples[node_id] = num_examples
        self.arrivals[node_id] += 1
        self.total_arrivals += 1
        if self.mode == "none":
            return 1.0
        # No client holds data: every share is 0, and so is every weight.
        share = data_shares(self.examples)[node_id]  # p_i
        if self.mode == "data":
            return len(self.examples) * share
        frequency = self.arrivals[node_id] / self.total_arrivals  # q_i
        return share / frequency
