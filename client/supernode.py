"""``flower-supernode`` with Florist's shorter polls (client/flower_tuning.py) applied first.

Run it exactly like Flower's command: ``python -m florist.client.supernode --insecure
--grpc-rere --superlink HOST:PORT --isolation process ...``. It patches, in this process only,
the SuperNode's idle poll of the SuperLink (3 s → ``FLORIST_SUPERNODE_IDLE_POLL``, 0.2 s by
default), its reply waits (0.5 s → 0.02 s) and the first back-off of its object pulls (1 s →
0.02 s), then hands over to Flower's own ``flower_supernode()``. With any other flwr than the
version the patches were written for it warns and runs Flower unchanged.
"""

from __future__ import annotations

import logging

from flwr.supernode.cli import flower_supernode

from florist.client.flower_tuning import tune_supernode


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tune_supernode()
    flower_supernode()


if __name__ == "__main__":
    main()
