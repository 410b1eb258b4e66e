"""Unit tests for florist.client.models: output shapes, input checks and a quick training run."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from florist.client.models import CnnSpec, LogRegSpec, MlpSpec, ModelSpec, build_model
from florist.datasets import DigitsSpec, SyntheticSpec, dataset_info, load_test, load_train

DIGITS = DigitsSpec()
SYNTHETIC = SyntheticSpec(num_features=60, num_classes=10)


@pytest.mark.parametrize(
    "spec",
    [LogRegSpec(), MlpSpec(), MlpSpec(hidden=[32, 16], dropout=0.2), MlpSpec(hidden=[]), CnnSpec()],
    ids=["logreg", "mlp", "mlp-deep", "mlp-empty", "cnn"],
)
def test_output_shape_on_digits(spec: LogRegSpec | MlpSpec | CnnSpec) -> None:
    # Prepare
    info = dataset_info(DIGITS)
    model = build_model(spec, info)

    # Execute
    logits = model(torch.rand(5, *info.input_shape))

    # Assert
    assert logits.shape == (5, 10)


@pytest.mark.parametrize("spec", [LogRegSpec(), MlpSpec()], ids=["logreg", "mlp"])
def test_output_shape_on_synthetic(spec: LogRegSpec | MlpSpec) -> None:
    info = dataset_info(SYNTHETIC)
    model = build_model(spec, info)

    logits = model(torch.rand(7, *info.input_shape))

    assert logits.shape == (7, 10)


def test_cnn_refuses_non_image_input() -> None:
    with pytest.raises(ValueError, match=r"needs image input \(C, H, W\).*\(60,\)"):
        build_model(CnnSpec(), dataset_info(SYNTHETIC))


def test_model_spec_validation_names_fields() -> None:
    adapter: TypeAdapter[LogRegSpec | MlpSpec | CnnSpec] = TypeAdapter(ModelSpec)

    with pytest.raises(ValidationError) as err:
        adapter.validate_python({"name": "mlp", "hidden": [0]})
    assert err.value.errors()[0]["loc"] == ("mlp", "hidden", 0)
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "resnet"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "cnn", "chanels": 8})


def test_build_model_uses_callers_seed() -> None:
    info = dataset_info(DIGITS)

    torch.manual_seed(0)
    a = build_model(MlpSpec(), info)
    torch.manual_seed(0)
    b = build_model(MlpSpec(), info)

    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_logreg_trains_on_digits() -> None:
    # Prepare
    torch.manual_seed(0)
    info = dataset_info(DIGITS)
    train, test = load_train(DIGITS), load_test(DIGITS)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    model = build_model(LogRegSpec(), info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()

    # Execute: plain minibatch SGD, a few epochs.
    for _ in range(15):
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test.x)).argmax(dim=1)

    # Assert
    accuracy = (predicted == torch.from_numpy(test.y)).float().mean().item()
    assert accuracy >= 0.9
