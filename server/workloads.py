"""What the server reads off a workload besides its model: the extent of the data it knows."""

from __future__ import annotations

from florist.client.workloads import WorkloadConfig, WorkloadPlugin


def known_extent(plugin: WorkloadPlugin, config: WorkloadConfig) -> tuple[float, float] | None:
    """The smallest and largest input value of ``plugin``'s data as far as the server can know:
    the workload's own extent (generated data), else its server-held test and validation splits,
    else None (every node's data stays on the node)."""
    if plugin.data_extent is not None:
        return plugin.data_extent(config)
    held = [load(config) for load in (plugin.load_test, plugin.load_validation) if load is not None]
    values = [data.x for data in held if data.x.size]
    if not values:
        return None
    return float(min(v.min() for v in values)), float(max(v.max() for v in values))
