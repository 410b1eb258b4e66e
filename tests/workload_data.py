"""Node folders of CSV files for the third-party workload fixture (tests/fixtures/thirdparty)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

THIRD_PARTY = Path(__file__).parent / "fixtures" / "thirdparty"
NUM_FEATURES = 4
NUM_CLASSES = 3


def write_node_csv(folder: Path, train_rows: int, test_rows: int, seed: int) -> Path:
    """``folder``/train.csv and test.csv: features and a label a linear rule gives them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.arange(NUM_FEATURES * NUM_CLASSES).reshape(NUM_FEATURES, NUM_CLASSES) % 5 - 2.0
    for name, rows in (("train.csv", train_rows), ("test.csv", test_rows)):
        x = rng.normal(size=(rows, NUM_FEATURES))
        y = np.argmax(x @ weights, axis=1)
        header = ",".join([f"f{i}" for i in range(NUM_FEATURES)] + ["label"])
        lines = [header] + [
            ",".join([f"{v:.6f}" for v in row] + [str(label)])
            for row, label in zip(x, y, strict=True)
        ]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def csv_workload(**config: object) -> dict[str, object]:
    """The experiment body's ``workload`` for the CSV plugin."""
    return {
        "name": "csv-tabular",
        "config": {"num_features": NUM_FEATURES, "num_classes": NUM_CLASSES, **config},
    }
