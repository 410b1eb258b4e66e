"""Simulation mode: experiments of virtual clients on Flower's Simulation Engine (Ray).

A second SuperLink, started with ``--simulation`` (no Fleet API, no SuperNodes), takes every
``"mode": "simulation"`` run. The API submits Florist's own app to it through the same Control
API client as a deployment run, with a per-run ``SimulationConfig`` (how many virtual clients,
the CPUs Ray may use); the SuperLink's executor then starts ``flwr-simulation``, which runs
Florist's ServerApp in a thread and its ClientApp in Ray actors, one virtual client's message at
a time per actor. docs/simulation.md says why this design and what it costs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from flwr.proto.federation_config_pb2 import SimulationConfig

from florist.client.plugins import PluginRegistryError
from florist.client.simulation import (
    RUN_CONFIG_KEY,
    ProfileMixError,
    check_entry,
    check_mix,
    encode_mix,
)
from florist.server.control import ControlClient, RunState, SuperLinkNode, SuperLinkUnavailable
from florist.server.settings import Settings
from florist.server.spec import ExperimentSpec
from florist.strategies import default_registry

# Where `florist up`/`florist server` start the simulation SuperLink unless told otherwise:
# beside Flower's own defaults (8000 Control API, 9092-9094 Fleet and node APIs).
DEFAULT_SIMULATION_CONTROL = "127.0.0.1:8010"
# The mix virtual clients are drawn from when the experiment declares none: `florist up`'s.
DEFAULT_PROFILE_MIX: dict[str, float] = {"fast": 1.0, "normal": 1.0, "slow": 1.0}
SIMULATION_ONLY = ("virtual", "per_round", "profiles")
# Sampling fields a simulation run does not read: `per_round` replaces them.
DEPLOYMENT_ONLY = ("min", "fraction_train")


def _error(loc: tuple[str | int, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def simulation_errors(
    spec: ExperimentSpec, *, max_virtual: int, enabled: bool = True
) -> list[dict[str, Any]]:
    """What is wrong with ``spec``'s mode and virtual clients, as pydantic-style errors whose
    ``loc`` names the field (under the body); empty when nothing is. ``enabled``: whether this
    server has a simulation SuperLink."""
    clients = spec.clients
    if spec.mode == "deployment":
        return [
            _error(("clients", name), "only with mode 'simulation'", "simulation_only")
            for name in SIMULATION_ONLY
            if getattr(clients, name) is not None
        ]
    errors = []
    if not enabled:
        errors.append(
            _error(
                ("mode",),
                "this server has no simulation SuperLink (FLORIST_SIMULATION_CONTROL is empty)",
                "simulation_disabled",
            )
        )
    errors += [
        _error(
            ("clients", name),
            "not read in mode 'simulation': clients.per_round says how many take part",
            "deployment_only",
        )
        for name in DEPLOYMENT_ONLY
        if name in clients.model_fields_set
    ]
    if clients.virtual is None:
        errors.append(_error(("clients", "virtual"), "mode 'simulation' needs it", "missing"))
    elif clients.virtual > max_virtual:
        errors.append(
            _error(
                ("clients", "virtual"),
                f"{clients.virtual:,} virtual clients, more than this server takes "
                f"({max_virtual:,}; FLORIST_SIMULATION_MAX_VIRTUAL_CLIENTS)",
                "too_many_virtual_clients",
            )
        )
    if clients.per_round is None:
        errors.append(_error(("clients", "per_round"), "mode 'simulation' needs it", "missing"))
    elif clients.virtual is not None and clients.per_round > clients.virtual:
        errors.append(
            _error(
                ("clients", "per_round"),
                f"{clients.per_round} per round, more than the {clients.virtual} virtual clients",
                "per_round_above_virtual",
            )
        )
    for name, weight in (clients.profiles or {}).items():
        try:
            check_entry(name, weight)
        except ProfileMixError as exc:
            errors.append(_error(("clients", "profiles", name), str(exc), "unknown_profile"))
    if clients.profiles is not None and not any(w > 0 for w in clients.profiles.values()):
        errors.append(
            _error(
                ("clients", "profiles"),
                "at least one profile needs a positive weight",
                "no_profile",
            )
        )
    try:
        asynchronous = "async" in default_registry().get(spec.strategy.name).tags
    except PluginRegistryError:
        asynchronous = False  # an unknown name is check_spec's to report
    if asynchronous:
        errors.append(
            _error(
                ("strategy", "name"),
                f"{spec.strategy.name} is asynchronous: it would keep every virtual client busy "
                "at once; mode 'simulation' runs strategies of synchronous rounds",
                "simulation_unsupported",
            )
        )
    return errors


def ray_limits(settings: Settings) -> SimulationConfig:
    """What every simulation run gets besides its virtual clients: Ray held to this machine's
    CPUs (one per virtual client's ClientApp at a time), no GPU, quiet workers."""
    cpus = settings.simulation_cpus or os.cpu_count() or 1
    return SimulationConfig(
        backend="ray",
        init_args_num_cpus=cpus,
        init_args_num_gpus=0,
        client_resources_num_cpus=min(settings.simulation_client_cpus, cpus),
        client_resources_num_gpus=0.0,
        init_args_log_to_driver=False,
        init_args_logging_level="warning",
        verbose=False,
    )


def simulation_submission(
    spec: Mapping[str, Any],
) -> tuple[dict[str, int | float | str | bool], SimulationConfig] | None:
    """For a stored spec in simulation mode, what its run is started with besides the
    follower's run config: the profile mix (run config) and the virtual clients (the run's
    ``SimulationConfig``); None for a deployment spec."""
    if public_mode(spec) != "simulation":
        return None
    parsed = ExperimentSpec.model_validate(spec)
    if parsed.clients.virtual is None:
        raise ValueError("a simulation experiment without clients.virtual")
    mix = encode_mix(check_mix(parsed.clients.profiles or DEFAULT_PROFILE_MIX))
    return {RUN_CONFIG_KEY: mix}, SimulationConfig(num_supernodes=parsed.clients.virtual)


def ray_environment(settings: Settings) -> dict[str, str]:
    """Environment of the simulation SuperLink, inherited by ``flwr-simulation`` and Ray: a
    bounded object store, no dashboard or usage report, and Ray's OOM killer left on."""
    return {
        # Ray's object store is a memory-mapped file sized at start; without a cap it takes
        # 30 % of the machine's memory (here 7 GiB) for a few MB of model per message.
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(
            settings.simulation_object_store_mb * 1024 * 1024
        ),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        # flwr-simulation would otherwise let Ray build a uv runtime environment per run.
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }


def superlink_simulation_command(superlink_command: Sequence[str]) -> list[str]:
    """A deployment SuperLink's command line turned into the simulation SuperLink's: the same
    flags, ``--simulation`` added, the Fleet API's (which simulation does not start) dropped,
    run under server/simulation_link.py so that its runs end when it does."""
    cmd: list[str] = []
    skip = False
    for arg in superlink_command:
        if skip:
            skip = False
            continue
        if arg in ("--fleet-api-type", "--fleet-api-address"):
            skip = True
            continue
        cmd.append(arg)
    return [sys.executable, "-m", "florist.server.simulation_link", *cmd, "--simulation"]


class RoutedControl(ControlClient):
    """The follower's Control API client over two SuperLinks: deployment runs on the first,
    simulation runs (``start_run`` with a ``SimulationConfig``, completed with ``limits``) on
    the second. A ControlClient in every call the follower and the API make, built from two.

    Flower's run ids are random 64-bit numbers, each SuperLink's own; a run id seen here is
    remembered with its SuperLink. An unknown one is looked up on both, and an unreachable
    SuperLink that might know it makes the lookup fail (SuperLinkUnavailable) instead of
    answering "no such run", which the follower would take for a lost run.
    """

    def __init__(
        self, deployment: ControlClient, simulation: ControlClient, limits: SimulationConfig
    ) -> None:
        # No ControlClient.__init__: every call goes to one of the two clients.
        self.deployment = deployment
        self.simulation = simulation
        self.address = deployment.address
        self.limits = limits
        self._where: dict[int, ControlClient] = {}

    def _links(self) -> tuple[ControlClient, ControlClient]:
        return self.deployment, self.simulation

    def start_run(
        self,
        run_config: dict[str, int | float | str | bool],
        federation: SimulationConfig | None = None,
    ) -> int:
        if federation is None:
            link, run_id = self.deployment, self.deployment.start_run(run_config)
        else:
            full = SimulationConfig()
            full.CopyFrom(self.limits)
            full.MergeFrom(federation)
            link, run_id = self.simulation, self.simulation.start_run(run_config, full)
        self._where[run_id] = link
        return run_id

    def _find(self, run_id: int) -> tuple[ControlClient | None, RunState | None]:
        if run_id in self._where:
            link = self._where[run_id]
            return link, _run_state(link, run_id)
        unreachable: SuperLinkUnavailable | None = None
        for link in self._links():
            try:
                state = _run_state(link, run_id)
            except SuperLinkUnavailable as exc:
                unreachable = exc
                continue
            if state is not None:
                self._where[run_id] = link
                return link, state
        if unreachable is not None:
            raise unreachable
        return None, None

    def run_state(self, run_id: int) -> RunState | None:
        return self._find(run_id)[1]

    def stop_run(self, run_id: int) -> bool:
        link, _ = self._find(run_id)
        return False if link is None else link.stop_run(run_id)

    def run_log(self, run_id: int) -> str:
        link, _ = self._find(run_id)
        if link is None:
            raise SuperLinkUnavailable(f"no SuperLink knows run {run_id}")
        return link.run_log(run_id)

    def list_runs(self) -> list[RunState]:
        """Every run of both SuperLinks. Either unreachable fails the call: the follower
        settles an unrecorded submission by the runs listed, and a run missing from the list
        only because its SuperLink did not answer would be started a second time."""
        runs: list[RunState] = []
        for link in self._links():
            found = link.list_runs()
            for run in found:
                self._where.setdefault(run.run_id, link)
            runs += found
        return runs

    def list_nodes(self) -> Sequence[SuperLinkNode]:
        """The deployment SuperLink's SuperNodes: virtual clients are no SuperNodes."""
        return self.deployment.list_nodes()

    # SuperNodes, and so their keys, belong to the deployment SuperLink alone.
    def register_node(self, public_key_pem: bytes, *, name: str | None = None) -> int:
        return self.deployment.register_node(public_key_pem, name=name)

    def unregister_node(self, node_id: int) -> None:
        self.deployment.unregister_node(node_id)

    def close(self) -> None:
        for link in self._links():
            link.close()


def _run_state(link: ControlClient, run_id: int) -> RunState | None:
    """The run as ``link`` reports it; None when it does not know the run. Over HTTP the
    SuperLink answers an unknown run id with 404, which ControlClient reports as unavailable."""
    try:
        return link.run_state(run_id)
    except SuperLinkUnavailable as exc:
        cause = exc.__cause__
        if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 404:
            return None
        raise


def control_for(settings: Settings) -> ControlClient:
    """The Control API client the API's follower uses: routed when simulation is enabled."""
    deployment = ControlClient.from_settings(settings)
    if not settings.simulation_control:
        return deployment
    # The simulation SuperLink listens on loopback only, in plain text (no SuperNode reaches it).
    simulation = ControlClient(settings.simulation_control, insecure=True)
    return RoutedControl(deployment, simulation, ray_limits(settings))


def public_mode(spec: Mapping[str, Any]) -> str:
    """The mode a stored spec names (deployment when it names none: specs before this field)."""
    mode = spec.get("mode", "deployment")
    return mode if isinstance(mode, str) else "deployment"
