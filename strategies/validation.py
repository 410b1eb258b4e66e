"""Checks on client replies before anything is aggregated: a malformed reply is rejected."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from florist.client.protocol import EvaluateReport, TrainReport

# Defined with the task, which the ClientApp writes by; re-exported for the server.
from florist.client.task import NODE_CONFIG_KEY as NODE_CONFIG_KEY

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
WEIGHT_KEY = TrainReport.key("num_examples")  # an update's weight
# No honest loss, accuracy or duration comes near this; bounding metrics keeps every
# example-weighted sum of them (≤ 10⁹ examples × nodes) finite in float64.
METRIC_LIMIT = 1e15

Weights = dict[str, np.ndarray]


class MalformedReply(ValueError):
    """A reply that must not reach a strategy; the message is the reason recorded with it."""


class NormBoundExceeded(MalformedReply):
    """An update whose L2 norm is beyond the experiment's norm bound."""


class NoNormBound(BaseModel):
    """No bound on the size of an update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["none"]


class AbsoluteNormBound(BaseModel):
    """‖x_i − x_sent(i)‖₂ ≤ ``max_norm`` for every update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["absolute"]
    max_norm: float = Field(
        gt=0, allow_inf_nan=False, description="Largest L2 norm of an update accepted."
    )


class MedianNormBound(BaseModel):
    """‖x_i − x_sent(i)‖₂ ≤ ``factor`` × the median norm of the last ``window`` accepted updates.

    One running window serves synchronous rounds (it holds this round's earlier arrivals and
    the previous rounds') and asynchronous strategies that aggregate one arrival at a time. Until
    ``warmup`` updates were accepted there is no median to trust: only ``max_norm`` applies.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["median_multiple"]
    # Honest updates reached 12× the running median under quantity skew (digits, cnn, five
    # nodes whose step counts differ as their data do): 50 leaves room, and still stops a
    # boosted or overflowing update.
    factor: float = Field(
        default=50.0,
        ge=1,
        le=1e6,
        allow_inf_nan=False,
        description="Multiple of the recent median update norm an update may reach.",
    )
    window: int = Field(
        default=100, ge=1, le=10_000, description="Accepted updates the median is taken over."
    )
    warmup: int = Field(
        default=3,
        ge=1,
        le=10_000,
        description="Accepted updates needed before the median applies (at most `window`).",
    )
    max_norm: float | None = Field(
        default=1e6,
        gt=0,
        allow_inf_nan=False,
        description="An absolute ceiling that always applies, during the warm-up too (null: none).",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> Self:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        return self


NormBound = Annotated[
    NoNormBound | AbsoluteNormBound | MedianNormBound, Field(discriminator="kind")
]


def _default_norm_bound() -> MedianNormBound:
    return MedianNormBound(kind="median_multiple")


class ReplyChecks(BaseModel):
    """What a client's reply must satisfy to be aggregated (ExperimentSpec.reply_checks).

    Always checked: exactly the expected records (a training reply: ArrayRecord ``arrays``,
    MetricRecord ``metrics``, optionally ConfigRecord ``node-config``; an evaluation reply:
    MetricRecord ``metrics`` only), the model's array keys, shapes and dtypes, finite values,
    scalar finite metrics, the protocol's report. Configured here: the norm bound and the cap on
    a reply's example count.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    norm_bound: NormBound = Field(
        default_factory=_default_norm_bound,
        description="Bound on an update's L2 norm (returned weights − weights sent): "
        '{"kind": "none"}, {"kind": "absolute", "max_norm": x}, or {"kind": "median_multiple", '
        '"factor": 50, "window": 100, "warmup": 3, "max_norm": 1e6} (the default).',
    )
    max_examples: int = Field(
        default=10**7,
        ge=1,
        le=10**9,
        description="Largest example count a reply may report (its weight in every mean).",
    )


class UpdateNorms:
    """The running state of a norm bound: the norms of recently accepted updates."""

    def __init__(self, bound: NoNormBound | AbsoluteNormBound | MedianNormBound) -> None:
        self.bound = bound
        window = bound.window if isinstance(bound, MedianNormBound) else 1
        self.recent: deque[float] = deque(maxlen=window)

    def limit(self) -> tuple[float, str] | None:
        """The largest norm an update may have now, and how it came about (None: no bound)."""
        bound = self.bound
        if isinstance(bound, NoNormBound):
            return None
        if isinstance(bound, AbsoluteNormBound):
            return bound.max_norm, "the absolute bound"
        ceiling = (bound.max_norm, "the absolute ceiling") if bound.max_norm is not None else None
        if len(self.recent) < bound.warmup:
            return ceiling
        median = float(np.median(np.fromiter(self.recent, dtype=np.float64)))
        relative = (
            bound.factor * median,
            f"{bound.factor:g} × the median {median:.4g} of the last {len(self.recent)} "
            "accepted updates",
        )
        return relative if ceiling is None or relative[0] <= ceiling[0] else ceiling

    def observe(self, norm: float) -> None:
        """An accepted update's norm. A zero norm says nothing about scale: a window of zeros
        would bound every later update to 0."""
        if norm > 0 and math.isfinite(norm):
            self.recent.append(norm)


@dataclass(frozen=True)
class SoundTrainReply:
    """A training reply that passed every check, decoded."""

    weights: Weights  # in the model's key order
    metrics: dict[str, float]
    report: TrainReport
    update_norm: float


@dataclass(frozen=True)
class SoundEvaluateReply:
    """An evaluation reply that passed every check, decoded."""

    num_examples: int
    metrics: dict[str, float]


def check_records(content: RecordDict, *, arrays: bool, node_config: bool) -> None:
    """Exactly the records a reply may carry: ``arrays`` (if ``arrays``), ``metrics``, and
    ``node-config`` (if ``node_config``, optionally). Anything else is refused: a strategy such as
    Flower's FedAvg would trip over an extra record, and nothing else reads one."""
    expected_arrays = {ARRAYS_KEY} if arrays else set()
    found = {
        "ArrayRecord": set(content.array_records),
        "MetricRecord": set(content.metric_records),
        "ConfigRecord": set(content.config_records),
    }
    allowed = {
        "ArrayRecord": expected_arrays,
        "MetricRecord": {METRICS_KEY},
        "ConfigRecord": {NODE_CONFIG_KEY} if node_config else set(),
    }
    for kind, keys in found.items():
        extra = sorted(keys - allowed[kind])
        if extra:
            raise MalformedReply(f"unexpected {kind} {', '.join(map(repr, extra))}")
    for kind, required in (("ArrayRecord", expected_arrays), ("MetricRecord", {METRICS_KEY})):
        missing = sorted(required - found[kind])
        if missing:
            raise MalformedReply(f"reply has no {kind} {', '.join(map(repr, missing))}")


def check_metrics(record: MetricRecord) -> dict[str, float]:
    """Every metric a finite scalar of sane size (lists are refused: nothing aggregates them)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedReply(f"metric {key!r} is not a number ({type(value).__name__})")
        number = float(value)
        if not math.isfinite(number):
            raise MalformedReply(f"metric {key!r} is not finite")
        if abs(number) > METRIC_LIMIT:
            raise MalformedReply(f"metric {key!r} = {number:g} is beyond ±{METRIC_LIMIT:g}")
        out[key] = number
    return out


def check_example_count(value: Any, max_examples: int) -> int:
    """A reply's weight: a positive integer (not 0.5, which would weigh as 0) up to the cap."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedReply(f"metric {WEIGHT_KEY!r} = {value!r} is not an integer")
    if not 0 < value <= max_examples:
        raise MalformedReply(f"metric {WEIGHT_KEY!r} = {value} is out of range 1..{max_examples}")
    return value


def _protocol_error(exc: ValidationError, keyed: type[TrainReport] | type[EvaluateReport]) -> str:
    return "metrics break the protocol: " + "; ".join(
        f"{keyed.key(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors()
    )


def _same_keys(keys: Iterable[str], reference: Mapping[str, np.ndarray]) -> None:
    got = set(keys)
    if got != set(reference):
        missing, extra = sorted(set(reference) - got), sorted(got - set(reference))
        raise MalformedReply(
            f"arrays do not match the model: missing {missing}, unexpected {extra}"
        )


def check_weights(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Weights that are the model's: its keys, shapes and dtypes, and only finite values."""
    _same_keys(weights.keys(), reference)
    for key, ref in reference.items():
        got = weights[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise MalformedReply(
                f"array {key!r} has shape {got.shape} {got.dtype}, expected {ref.shape} {ref.dtype}"
            )
        if got.dtype.kind in "fc" and not np.isfinite(got).all():
            raise MalformedReply(f"array {key!r} holds NaN or infinite values")


def check_arrays(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> Weights:
    """The arrays decoded, in the model's key order, if they pass :func:`check_weights`."""
    _same_keys(arrays.keys(), reference)
    out: Weights = {}
    for key in reference:
        try:
            out[key] = arrays[key].numpy()
        except Exception as exc:  # a corrupt buffer must reject the update, not crash the round
            raise MalformedReply(f"array {key!r} cannot be decoded: {exc}") from exc
    check_weights(out, reference)
    return out


def update_norm(weights: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """‖x_i − x_sent‖₂ over the floating-point arrays, in float64 (float32 values near 3e38
    would overflow in their own type). Integer buffers (step counters) are left out."""
    total = 0.0
    for key, ref in sent.items():
        if ref.dtype.kind not in "fc":
            continue
        delta = weights[key].astype(np.float64) - ref.astype(np.float64)
        total += float(np.vdot(delta, delta).real)
    return math.sqrt(total)


def check_update_norm(norm: float, limit: tuple[float, str] | None) -> None:
    if not math.isfinite(norm):
        raise NormBoundExceeded("update norm is not finite")
    if limit is not None and norm > limit[0]:
        raise NormBoundExceeded(
            f"update norm {norm:.4g} exceeds the bound {limit[0]:.4g} ({limit[1]})"
        )


def parse_train_reply(
    content: RecordDict,
    sent: Mapping[str, np.ndarray],
    *,
    max_examples: int = 10**7,
    norm_limit: tuple[float, str] | None = None,
) -> SoundTrainReply:
    """The reply decoded, or :class:`MalformedReply` saying why it must not be aggregated.

    ``sent`` is the global model the node was sent; ``norm_limit`` is the norm bound now
    (:meth:`UpdateNorms.limit`)."""
    check_records(content, arrays=True, node_config=True)
    metrics = check_metrics(content.metric_records[METRICS_KEY])
    check_example_count(content.metric_records[METRICS_KEY].get(WEIGHT_KEY), max_examples)
    try:
        report = TrainReport.from_metrics(metrics)
    except ValidationError as exc:
        raise MalformedReply(_protocol_error(exc, TrainReport)) from exc
    weights = check_arrays(content.array_records[ARRAYS_KEY], sent)
    norm = update_norm(weights, sent)
    check_update_norm(norm, norm_limit)
    return SoundTrainReply(weights, metrics, report, norm)


def check_train_reply(
    content: RecordDict,
    reference: Mapping[str, np.ndarray],
    max_examples: int = 10**7,
    norm_limit: tuple[float, str] | None = None,
) -> str | None:
    """Why a training reply must not be aggregated, or None when it is sound."""
    try:
        parse_train_reply(content, reference, max_examples=max_examples, norm_limit=norm_limit)
    except MalformedReply as exc:
        return str(exc)
    return None


def parse_evaluate_reply(content: RecordDict, *, max_examples: int = 10**7) -> SoundEvaluateReply:
    """A federated-evaluation reply decoded, or :class:`MalformedReply`: only a MetricRecord
    ``metrics`` of finite scalars with a positive integer ``num-examples`` up to the cap."""
    check_records(content, arrays=False, node_config=False)
    record = content.metric_records[METRICS_KEY]
    metrics = check_metrics(record)
    count = check_example_count(record.get(WEIGHT_KEY), max_examples)
    try:
        EvaluateReport.from_metrics(metrics)
    except ValidationError as exc:
        raise MalformedReply(_protocol_error(exc, EvaluateReport)) from exc
    return SoundEvaluateReply(count, metrics)


def common_metric_keys(metrics: list[Mapping[str, float]]) -> set[str]:
    """The metric keys every reply of an aggregation shares: the only ones a strategy that
    demands one key set (Flower's FedAvg) can aggregate."""
    if not metrics:
        return set()
    keys = set(metrics[0])
    for m in metrics[1:]:
        keys &= set(m)
    return keys
