"""The `florist` command: start the whole platform, its pieces alone, and submit experiments."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from florist.server.cli_nodes import local_node_key, make_secure, register_security_commands
from florist.server.cli_tokens import bearer_headers, mode_line, refusal_hint, token_app
from florist.server.db.status import ExperimentStatus
from florist.server.logs import configure_logging
from florist.server.processes import (
    Managed,
    ServerTls,
    Supervisor,
    check_plaintext,
    executor_pool,
    flower_env,
    superlink_command,
    supernode_command,
    supernode_processes,
    tls_env,
    wait_for_port,
)
from florist.server.settings import Settings, get_settings

app = typer.Typer(help="Florist: federated learning on Flower.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.")
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
console = Console()
errors = Console(stderr=True)

# How long `florist up`/`florist server` wait for the SuperLink and the API to listen.
STARTUP_TIMEOUT_S = 120.0

DEMO_EXPERIMENT: dict[str, Any] = {
    "name": "demo-digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {
        "name": "digits",
        "config": {
            "partitioner": {"name": "dirichlet", "alpha": 0.5},
            "seed": 0,
            "model": {"name": "mlp"},
        },
    },
    "rounds": 5,
    "clients": {"min": 3},
}


def load_experiment(path: Path) -> dict[str, Any]:
    """An experiment body from a .toml or .json file."""
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        body: dict[str, Any] = json.loads(text)
        return body
    raise typer.BadParameter(f"{path}: expected a .toml or .json file")


def api_url(settings: Settings) -> str:
    scheme = "https" if settings.api_tls() else "http"
    return f"{scheme}://{settings.api_host}:{settings.api_port}"


def api_verify(settings: Settings) -> ssl.SSLContext | bool:
    """How the CLI checks an HTTPS API: against Florist's CA when the settings name one."""
    ca = settings.tls_file("ca")
    return ssl.create_default_context(cafile=str(ca)) if ca is not None else True


def submit_and_follow(base: str, body: dict[str, Any], *, wait: bool = True) -> dict[str, Any]:
    """POST the experiment; with ``wait``, show a progress bar per round until the run ends."""
    headers = bearer_headers(get_settings())
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        response = client.post("/api/v1/experiments", json=body)
        if hint := refusal_hint(response.status_code):
            errors.print(f"[red]{escape(response.text)}[/red]\n{hint}", soft_wrap=True)
            raise typer.Exit(1)
        if response.status_code == 422:
            console.print("[red]The experiment was refused:[/red]")
            for err in response.json()["detail"]:
                loc = ".".join(str(p) for p in err["loc"][1:])
                console.print(f"  [bold]{loc}[/bold]: {err['msg']}")
            raise typer.Exit(2)
        response.raise_for_status()
        exp: dict[str, Any] = response.json()
        console.print(
            f"Experiment [bold]{exp['id']}[/bold] ({exp['name']}) submitted: "
            f"{base}/experiments/{exp['id']}"
        )
        if not wait:
            return exp
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("rounds", total=exp["num_rounds"], info=exp["status"])
            # The JSON carries the plain value; a StrEnum member compares equal to it.
            while not ExperimentStatus(exp["status"]).terminal:
                time.sleep(1.0)
                exp = client.get(f"/api/v1/experiments/{exp['id']}").json()
                acc = exp.get("best_accuracy")
                info = exp["status"] + (f" · best accuracy {acc:.3f}" if acc is not None else "")
                progress.update(task, completed=exp["current_round"], info=info)
        colour = {ExperimentStatus.COMPLETED: "green", ExperimentStatus.FAILED: "red"}.get(
            exp["status"], "yellow"
        )
        console.print(
            f"[{colour}]Experiment {exp['id']} {exp['status']}[/{colour}]"
            + (f": {exp['error']}" if exp.get("error") else "")
        )
        return exp


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=".toml or .json")],
    api: Annotated[str | None, typer.Option(help="API base URL")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the run with a progress bar")] = True,
) -> None:
    """Submit an experiment through the API and follow it round by round."""
    exp = submit_and_follow(api or api_url(get_settings()), load_experiment(file), wait=wait)
    if exp["status"] == ExperimentStatus.FAILED:
        raise typer.Exit(1)


@app.command("export")
def export(
    experiment_id: Annotated[int, typer.Argument(min=0, help="The experiment's id")],
    server_round: Annotated[
        int | None,
        typer.Option("--round", min=1, help="A kept round's model (default: the latest, final)"),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="safetensors, or pt (a torch state_dict)")
    ] = "safetensors",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: its name)")
    ] = None,
    api: Annotated[str | None, typer.Option(help="API base URL")] = None,
) -> None:
    """Download an experiment's trained model through the API."""
    if format_ not in ("safetensors", "pt"):
        raise typer.BadParameter("safetensors or pt", param_hint="--format")
    params: dict[str, str | int] = {"format": format_}
    if server_round is not None:
        params["round"] = server_round
    base = api or api_url(get_settings())
    with httpx.Client(base_url=base, timeout=120) as client:
        response = client.get(
            f"/api/v1/experiments/{experiment_id}/model",
            params=params,
            headers=bearer_headers(get_settings()),
        )
    if hint := refusal_hint(response.status_code):
        errors.print(f"[red]{escape(response.text)}[/red]\n{hint}", soft_wrap=True)
        raise typer.Exit(1)
    if response.status_code == 404:
        console.print(f"[red]{response.json()['detail']}[/red]")
        raise typer.Exit(1)
    response.raise_for_status()
    kept_round = response.headers["X-Florist-Round"]
    path = output or Path(f"experiment-{experiment_id}-round-{kept_round}.{format_}")
    path.write_bytes(response.content)
    console.print(f"round {kept_round}'s model → {path} ({len(response.content):,} bytes)")


# --- operating experiments through the API: ls, status, logs, cancel ---------------------------

ApiOption = Annotated[
    str | None,
    typer.Option(help="API base URL (default: http://FLORIST_API_HOST:FLORIST_API_PORT)"),
]
ExperimentArg = Annotated[int, typer.Argument(min=0, help="The experiment's id")]


class Api:
    """The REST API as the operating commands use it: every failure is one clear line on
    stderr and a non-zero exit, never a traceback."""

    def __init__(self, base: str | None, *, timeout: float = 30) -> None:
        settings = get_settings()
        self.base = (base or api_url(settings)).rstrip("/")
        self.client = httpx.Client(
            base_url=self.base,
            timeout=timeout,
            headers=bearer_headers(settings),
            verify=api_verify(settings),
        )

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def unreachable(self, exc: Exception) -> typer.Exit:
        errors.print(
            f"[red]cannot reach the Florist API at {escape(self.base)}[/red]: {escape(str(exc))}\n"
            "Is it running (`florist up`, `florist server`, `florist api`)? Point --api at it.",
            soft_wrap=True,
        )
        return typer.Exit(1)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.is_success:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = None
        detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
        if isinstance(detail, list):  # a 422: one line per field
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in detail
            )
        errors.print(f"[red]{escape(str(detail))}[/red] (HTTP {response.status_code})")
        if hint := refusal_hint(response.status_code):
            errors.print(hint, soft_wrap=True)
        raise typer.Exit(1)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paged listing, page after page (``next_cursor``)."""
        cursor = None
        while True:
            page = self.get(path, **params, **({"cursor": cursor} if cursor is not None else {}))
            yield from page["data"]
            cursor = page.get("next_cursor")
            if cursor is None:
                return


def _when(value: str | None) -> str:
    """An API timestamp (UTC) to the second: 2026-12-02 04:40:01."""
    return value[:19].replace("T", " ") if value else "-"


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command("ls")
def list_experiments(
    status: Annotated[
        list[str] | None, typer.Option("--status", "-s", help="Only these statuses (repeatable)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
    api: ApiOption = None,
) -> None:
    """List experiments, newest first."""
    with Api(api) as remote:
        params: dict[str, Any] = {"limit": min(limit, 1000)}
        if status:
            params["status"] = status
        rows = []
        for row in remote.pages("/api/v1/experiments", **params):
            rows.append(row)
            if len(rows) >= limit:
                break
    if as_json:
        for row in rows:
            console.print_json(json.dumps(row), indent=None)
        return
    if not rows:
        console.print("no experiments")
        return
    table = Table("id", "name", "status", "strategy", "round", "best acc")
    table.add_column("created", no_wrap=True)
    for row in rows:
        table.add_row(
            str(row["id"]),
            escape(row["name"]),
            row["status"],
            escape(row["strategy"]["name"]),
            f"{row['current_round']}/{row['num_rounds']}",
            _accuracy(row.get("best_accuracy")),
            _when(row.get("created_at")),
        )
    console.print(table)


@app.command("status")
def experiment_status(
    experiment_id: ExperimentArg,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON")] = False,
    api: ApiOption = None,
) -> None:
    """One experiment: its status, progress, best round and run."""
    with Api(api) as remote:
        exp = remote.get(f"/api/v1/experiments/{experiment_id}")
    if as_json:
        console.print_json(json.dumps(exp))
        return
    best = exp.get("best_round")
    fields = {
        "experiment": f"{exp['id']} ({escape(exp['name'])})",
        "status": exp["status"] + (f": {escape(exp['error'])}" if exp.get("error") else ""),
        "strategy": escape(exp["strategy"]["name"]),
        "workload": escape((exp.get("workload") or {}).get("name", "-")),
        "rounds": f"{exp['current_round']} of {exp['num_rounds']}",
        "accepted updates": str(exp.get("accepted_updates", 0)),
        "best accuracy": _accuracy(exp.get("best_accuracy"))
        + (f" (round {best}, by {exp.get('best_by')})" if best is not None else ""),
        "Flower run": exp.get("flwr_run_id") or "-",
        "created": _when(exp.get("created_at")),
        "started": _when(exp.get("started_at")),
        "finished": _when(exp.get("finished_at")),
    }
    width = max(map(len, fields))
    for name, value in fields.items():
        console.print(f"[bold]{name:<{width}}[/bold]  {value}")


def _event_line(event: dict[str, Any]) -> tuple[str, str]:
    return event["created_at"], f"{_when(event['created_at'])}  {event['kind']:<12} " + escape(
        event["message"]
    )


def _round_line(row: dict[str, Any]) -> tuple[str, str]:
    shown = {k: v for k, v in row["metrics"].items() if k in ("accuracy", "loss")}
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
    text = (
        f"round {row['server_round']}: {metrics + '; ' if metrics else ''}"
        f"{row['num_updates']} accepted, {row['num_rejected']} rejected, "
        f"{row['num_failures']} failed; {row['duration_s']:.1f} s"
    )
    return row["finished_at"], f"{_when(row['finished_at'])}  {'round':<12} {text}"


def _sse(lines: Any) -> Any:
    """(event, id, data) of each server-sent event in a stream of lines."""
    event, event_id, data = "message", None, list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, event_id, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            yield "comment", event_id, ""  # a keep-alive: a moment to read the log on
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


@app.command("logs")
def logs(
    experiment_id: ExperimentArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the experiment ends")
    ] = False,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", "-k", help="Only these event kinds (repeatable)")
    ] = None,
    rounds: Annotated[bool, typer.Option(help="Print each recorded round too")] = True,
    api: ApiOption = None,
) -> None:
    """An experiment's log: its events (submission, the runtime's decisions, the end) and
    rounds, oldest first; with --follow, new ones as they are recorded."""
    log_path = f"/api/v1/experiments/{experiment_id}/log"
    params: dict[str, Any] = {"kind": kind} if kind else {}
    last_event = 0

    def new_events() -> list[tuple[str, str]]:
        nonlocal last_event
        out = []
        for event in remote.pages(log_path, after=last_event, **params):
            last_event = max(last_event, event["id"])
            out.append(_event_line(event))
        return out

    def show(lines: list[tuple[str, str]]) -> None:
        # Both sources are read at the same moment: print them in the order they happened.
        for _, text in sorted(lines, key=lambda line: line[0]):
            console.print(text, highlight=False, soft_wrap=True)

    with Api(api, timeout=60) as remote:
        remote.get(f"/api/v1/experiments/{experiment_id}")  # a clear 404 before anything else
        if not follow:
            lines = new_events()
            if rounds:
                path = f"/api/v1/experiments/{experiment_id}/rounds"
                lines += [_round_line(r) for r in remote.pages(path)]
            show(lines)
            return
        # The event stream replays the rounds recorded so far, then sends each new one; every
        # message (a keep-alive at least every few seconds) is a moment to read the log on.
        last_id: str | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            path = f"/api/v1/experiments/{experiment_id}/events"
            try:
                with remote.client.stream("GET", path, headers=headers, timeout=None) as stream:
                    if not stream.is_success:
                        stream.read()
                        errors.print(f"[red]{escape(stream.text)}[/red]")
                        raise typer.Exit(1)
                    read_at = 0.0
                    for event, event_id, data in _sse(stream.iter_lines()):
                        last_id = event_id or last_id
                        # A replayed history sends an update event per task: the log is read
                        # at a round, the end, a keep-alive, or a second after the last read.
                        lines = []
                        if event != "update" or time.monotonic() - read_at >= 1.0:
                            lines, read_at = new_events(), time.monotonic()
                        if event == "round" and rounds:
                            lines.append(_round_line(json.loads(data)))
                        show(lines)
                        if event == "end":
                            end = json.loads(data)
                            console.print(
                                f"experiment {experiment_id} {end['status']}"
                                + (f": {escape(end['error'])}" if end.get("error") else ""),
                                highlight=False,
                                soft_wrap=True,
                            )
                            return
            except httpx.TransportError as exc:
                raise remote.unreachable(exc) from None
            # The stream closed without an end (its lifetime, a restart): read on after last_id.
            time.sleep(1.0)


@app.command("cancel")
def cancel(experiment_id: ExperimentArg, api: ApiOption = None) -> None:
    """Cancel an experiment: its run is stopped, every round it committed is kept."""
    with Api(api) as remote:
        exp = remote.request("POST", f"/api/v1/experiments/{experiment_id}/cancel")
    console.print(f"experiment {exp['id']} ({escape(exp['name'])}): {exp['status']}")


@app.command("resume")
def resume(experiment_id: ExperimentArg, api: ApiOption = None) -> None:
    """Resume a failed experiment: a new run goes on from its last committed round."""
    with Api(api) as remote:
        exp = remote.request("POST", f"/api/v1/experiments/{experiment_id}/resume")
    console.print(
        f"experiment {exp['id']} ({escape(exp['name'])}): {exp['status']}, "
        f"resumed {exp['resumes']} time(s); it goes on from its last committed round"
    )


@app.command("api")
def run_api(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Serve the REST API and dashboard (needs a SuperLink to run experiments)."""
    import uvicorn

    from florist.server.api.app import create_app

    settings = get_settings()
    settings.api_host = host or settings.api_host
    settings.api_port = port or settings.api_port
    if problems := settings.security_problems():  # --host may have made it unsafe
        for problem in problems:
            errors.print(f"[red]{escape(problem)}[/red]", soft_wrap=True)
        raise typer.Exit(2)
    console.print(mode_line(settings), soft_wrap=True)
    address = f"{settings.api_host}:{settings.api_port}"
    cert, key = settings.tls_file("cert"), settings.tls_file("key")
    https = settings.api_tls() and cert is not None and key is not None
    if not https:
        check_plaintext({"the API": address}, force=settings.force_insecure)
    # log_config=None: uvicorn's loggers reach the handler main() set up (FLORIST_LOG_FORMAT),
    # so its access lines are JSON too, with the experiment id a request's path names.
    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        log_config=None,
        ssl_certfile=str(cert) if https else None,
        ssl_keyfile=str(key) if https else None,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database to the newest schema."""
    from florist.server.db.engine import masked, upgrade_database

    url = get_settings().resolved_database_url()
    upgrade_database(url)
    console.print(f"database at {masked(url)} is up to date")


def _start_server(
    sup: Supervisor, settings: Settings, logs: Path, *, simulation: bool = True
) -> None:
    """SuperLink (and, with ``simulation``, the simulation SuperLink) then API, each waited
    for, so a later failure names the right piece."""
    env = flower_env(
        settings.home,
        {"FLORIST_DATABASE_URL": settings.resolved_database_url(), **tls_env(settings)},
    )
    if simulation:
        _start_simulation_superlink(sup, settings, env, logs)
    else:
        settings.simulation_control = ""  # the API then refuses simulation-mode experiments
    sup.add(
        Managed(
            "superlink",
            superlink_command(
                control=settings.superlink_control,
                fleet=settings.superlink_fleet,
                # A SuperLink the supervisor restarts knows its runs and nodes again.
                database=settings.superlink_state_file(),
                tls=ServerTls.from_settings(settings),
                supernode_auth=settings.supernode_auth,
                force_insecure=settings.force_insecure,
            ),
            env,
            logs / "superlink.log",
        )
    )
    # Generous: on a loaded 2-core machine the SuperLink has been seen to take over 30 s.
    wait_for_port(settings.superlink_control, timeout=STARTUP_TIMEOUT_S)
    wait_for_port(settings.superlink_fleet, timeout=STARTUP_TIMEOUT_S)
    api_env = {
        **env,
        "FLORIST_API_HOST": settings.api_host,
        "FLORIST_API_PORT": str(settings.api_port),
        "FLORIST_SIMULATION_CONTROL": settings.simulation_control,
    }
    sup.add(
        Managed(
            "api", [sys.executable, "-m", "florist.server.cli", "api"], api_env, logs / "api.log"
        )
    )
    # The API imports torch and migrates the database first: on a busy machine that takes a while.
    wait_for_port(f"{settings.api_host}:{settings.api_port}", timeout=STARTUP_TIMEOUT_S)


def _start_simulation_superlink(
    sup: Supervisor, settings: Settings, env: dict[str, str], logs: Path
) -> None:
    """The SuperLink of simulation-mode experiments (docs/simulation.md), Ray bounded by the
    settings; its state stays in memory (a lost run resumes from its last committed round)."""
    from florist.server.simulation import (
        DEFAULT_SIMULATION_CONTROL,
        ray_environment,
        superlink_simulation_command,
    )

    settings.simulation_control = settings.simulation_control or DEFAULT_SIMULATION_CONTROL
    cmd = superlink_simulation_command(
        superlink_command(
            control=settings.simulation_control,
            fleet=settings.superlink_fleet,
        )
    )
    sim_env = {**env, **ray_environment(settings)}
    sup.add(Managed("superlink-simulation", cmd, sim_env, logs / "superlink-simulation.log"))
    wait_for_port(settings.simulation_control, timeout=STARTUP_TIMEOUT_S)


def _add_supernode(
    sup: Supervisor,
    name: str,
    settings: Settings,
    node_config: dict[str, int | float | str],
    port: int,
    logs: Path,
    warm: bool,
    auth_key: Path | None = None,
    executor: bool = True,
    executors_on_host: int = 1,
) -> None:
    """A SuperNode; with ``warm``, tuned polls and a warm executor beside it (both supervised;
    ``executor=False`` leaves the executor to a shared pool). With TLS it verifies the
    SuperLink with the settings' CA; ``auth_key`` is its private key. ``executors_on_host``:
    how many executors this machine runs, which share its cores (client/executor.py)."""
    env = flower_env(settings.home)
    clientappio = f"127.0.0.1:{port}"
    ca = None if settings.insecure else settings.tls_file("ca")
    key = auth_key or settings.supernode_auth_key
    if warm:
        for managed in supernode_processes(
            name,
            superlink=settings.superlink_fleet,
            clientappio=clientappio,
            node_config=node_config,
            env=env,
            log_dir=logs,
            root_certificates=ca,
            auth_key=key,
            force_insecure=settings.force_insecure,
            executor=executor,
            executors_on_host=executors_on_host,
        ):
            sup.add(managed)
        return
    cmd = supernode_command(
        superlink=settings.superlink_fleet,
        clientappio=clientappio,
        node_config=node_config,
        root_certificates=ca,
        auth_key=key,
        force_insecure=settings.force_insecure,
    )
    sup.add(Managed(name, cmd, env, logs / f"{name}.log"))


def _supervise(sup: Supervisor, until: float | None = None) -> None:
    try:
        while until is None or time.monotonic() < until:
            for line in sup.check():
                console.print(f"[yellow]{line}[/yellow]")
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        sup.stop_all()


def _prepare(settings: Settings) -> Path:
    from florist.server.db.engine import upgrade_database

    settings.home.mkdir(parents=True, exist_ok=True)
    settings.home = settings.home.resolve()
    upgrade_database(settings.resolved_database_url())
    return settings.home / "logs"


@app.command()
def up(
    clients: Annotated[int, typer.Option(min=1, help="SuperNodes to start")] = 3,
    demo: Annotated[bool, typer.Option(help="Submit the demo experiment once up")] = True,
    experiment: Annotated[Path | None, typer.Option(help="Submit this experiment instead")] = None,
    exit_after: Annotated[bool, typer.Option(help="Stop once the experiment ends")] = False,
    warm: Annotated[
        bool, typer.Option(help="Warm ClientApp executors (else Flower's process per message)")
    ] = True,
    shared_executors: Annotated[
        bool,
        typer.Option(
            help="One process imports torch once and forks the SuperNodes' warm executors, "
            "which share its memory (else one independent executor process per SuperNode)"
        ),
    ] = True,
    fleet: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Fleet file (examples/fleet.toml): one SuperNode per node, with its device "
            "profile; overrides --clients. Default: the clients cycle through fast, normal, slow.",
        ),
    ] = None,
    simulation: Annotated[
        bool,
        typer.Option(help='Also start the simulation SuperLink (`"mode": "simulation"`)'),
    ] = True,
    secure: Annotated[
        bool,
        typer.Option(
            help="TLS on every link and SuperNode authentication: certificates in "
            "$FLORIST_HOME/certs (made if missing), a key registered per SuperNode"
        ),
    ] = False,
) -> None:
    """Start database, API, SuperLink and N SuperNodes on this machine, and supervise them."""
    from florist.client.fleet import FleetError, load_fleet

    if fleet is not None:
        try:
            profiles = load_fleet(fleet)
        except FleetError as exc:
            raise typer.BadParameter(str(exc), param_hint="--fleet") from None
        clients = len(profiles)
    else:
        mix = ("fast", "normal", "slow")  # florist.client.profiles.PROFILES
        profiles = [{"profile": mix[i % len(mix)]} for i in range(clients)]
    settings = get_settings()
    logs = _prepare(settings)
    if secure:
        make_secure(settings)
    sup = Supervisor(log_to_stdout=settings.log_to_stdout)
    try:
        _start_server(sup, settings, logs, simulation=simulation)
        pooled = warm and shared_executors
        ports = []
        for i, profile in enumerate(profiles):
            node_config = {"partition-id": i, "num-partitions": clients, **profile}
            # Each SuperNode needs its own ClientApp-side API port.
            port = settings.supernode_port + i
            ports.append(port)
            name = f"supernode-{i}"
            key = local_node_key(settings, name) if secure else None
            _add_supernode(
                sup,
                name,
                settings,
                node_config,
                port,
                logs,
                warm,
                auth_key=key,
                executor=not pooled,
                executors_on_host=len(profiles),
            )
        if pooled:
            sup.add(
                executor_pool(
                    [f"127.0.0.1:{port}" for port in ports],
                    env=flower_env(settings.home),
                    log_dir=logs,
                )
            )
    except Exception:
        sup.stop_all()
        raise
    base = api_url(settings)
    console.print(
        f"[green]Florist is up[/green]: dashboard and API at {base} "
        f"(docs {base}/docs), {clients} SuperNodes "
        f"({fleet or ', '.join(str(p['profile']) for p in profiles)}); "
        + ("logs on this console" if settings.log_to_stdout else f"logs in {logs}")
    )
    console.print(mode_line(settings), soft_wrap=True)
    if demo or experiment:
        body = load_experiment(experiment) if experiment else dict(DEMO_EXPERIMENT)
        if body.get("mode", "deployment") == "deployment":  # virtual clients need no SuperNodes
            body.setdefault("clients", {}).setdefault("min", clients)
        try:
            submit_and_follow(base, body)
        except (KeyboardInterrupt, typer.Exit) as exc:
            sup.stop_all()
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    if exit_after:
        sup.stop_all()
        return
    console.print("Press Ctrl-C to stop.")
    _supervise(sup)


@app.command()
def server(
    simulation: Annotated[
        bool,
        typer.Option(help='Also start the simulation SuperLink (`"mode": "simulation"`)'),
    ] = True,
    secure: Annotated[
        bool,
        typer.Option(
            help="TLS and SuperNode authentication: certificates from FLORIST_TLS_DIR, else "
            "$FLORIST_HOME/certs (made if missing, for --hosts); register nodes with "
            "`florist node add`"
        ),
    ] = False,
    hosts: Annotated[
        str | None,
        typer.Option(help="With --secure and no certificates yet: the names clients use, h1,h2"),
    ] = None,
) -> None:
    """Start the server side alone (database, SuperLink, API), as a server container does."""
    settings = get_settings()
    logs = _prepare(settings)
    if secure:
        make_secure(settings, hosts)
    sup = Supervisor(log_to_stdout=settings.log_to_stdout)
    _start_server(sup, settings, logs, simulation=simulation)
    console.print(
        f"[green]server up[/green]: API {api_url(settings)}, "
        f"Fleet API (gRPC) {settings.superlink_fleet}"
    )
    console.print(mode_line(settings), soft_wrap=True)
    _supervise(sup)


@app.command()
def superlink(
    database: Annotated[
        Path | None,
        typer.Option(
            help="The SuperLink's state file (SQLite): runs and node ids survive a restart, so "
            "SuperNodes reconnect as the same nodes. Default: in memory, lost on restart"
        ),
    ] = None,
    health: Annotated[
        str | None,
        typer.Option(help="host:port of Flower's gRPC health server, for probes"),
    ] = None,
) -> None:
    """Run the SuperLink alone in the foreground, as its own container does."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(
        control=settings.superlink_control,
        fleet=settings.superlink_fleet,
        health=health,
        database=database,
        tls=ServerTls.from_settings(settings),
        supernode_auth=settings.supernode_auth,
        force_insecure=settings.force_insecure,
    )
    # The SuperLink starts the ServerApp, which records every round in Florist's database.
    env = flower_env(
        settings.home.resolve(), {"FLORIST_DATABASE_URL": settings.resolved_database_url()}
    )
    # exec, not a supervisor: the container runtime restarts it, its output is the container's,
    # and Flower's own SIGTERM handler shuts it down gracefully.
    os.execvpe(cmd[0], cmd, env)


@app.command()
def client(
    partition_id: Annotated[
        int | None,
        typer.Option(
            min=0, help="This node's slice of a simulated federation (with --num-partitions)"
        ),
    ] = None,
    num_partitions: Annotated[int | None, typer.Option(min=1)] = None,
    data_path: Annotated[
        Path | None,
        typer.Option(
            help="This node's own data folder (node-config data-path): the workload reads it "
            "here and nothing of it leaves the node"
        ),
    ] = None,
    superlink: Annotated[str | None, typer.Option(help="Fleet API host:port")] = None,
    port: Annotated[int, typer.Option(help="This node's ClientApp-side API port")] = 9094,
    profile: Annotated[
        str | None, typer.Option(help="Device profile: fast, normal, slow, flaky")
    ] = None,
    warm: Annotated[
        bool, typer.Option(help="Warm ClientApp executor (else Flower's process per message)")
    ] = True,
    node_config_text: Annotated[
        str | None,
        typer.Option(
            "--node-config",
            help="More node-config in Flower's syntax, e.g. 'seconds-per-step=0.5 "
            'availability-trace="0-120,300-500/600"\' (device-profile keys are checked here)',
        ),
    ] = None,
    root_certificates: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="The CA certificate (ca.crt) the SuperLink's is signed with: TLS. Default "
            "FLORIST_TLS_CA_CERT; without one, plain text (loopback only)",
        ),
    ] = None,
    auth_key: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="This node's private key (`florist node keygen`), its .pub registered with "
            "`florist node add`. Default FLORIST_SUPERNODE_AUTH_KEY",
        ),
    ] = None,
) -> None:
    """Start one SuperNode (a client), as a client container does, and supervise it."""
    from flwr.common.config import parse_config_args

    from florist.client.profiles import ProfileError, profile_from_node_config

    settings = get_settings()
    if superlink:
        settings.superlink_fleet = superlink
    if root_certificates is not None:
        settings.tls_ca_cert, settings.insecure = root_certificates.resolve(), False
    if auth_key is not None:
        settings.supernode_auth_key = auth_key.resolve()
    node_config: dict[str, int | float | str] = {}
    if node_config_text:
        try:
            parsed = parse_config_args([node_config_text])
        except Exception as exc:  # flwr raises plain ValueErrors and TOML errors alike
            raise typer.BadParameter(str(exc), param_hint="--node-config") from None
        if not parsed:
            raise typer.BadParameter(
                f"no key=value pairs in {node_config_text!r}", param_hint="--node-config"
            )
        for key, value in parsed.items():
            # Node-config values are scalars (Flower's ConfigRecord carries nothing else).
            if not isinstance(value, bool | int | float | str):
                raise typer.BadParameter(
                    f"{key}: expected a scalar (number, string, bool), got {value!r}",
                    param_hint="--node-config",
                )
            node_config[key] = value
    if (partition_id is None) != (num_partitions is None):
        raise typer.BadParameter(
            "give --partition-id and --num-partitions together", param_hint="--partition-id"
        )
    if partition_id is not None and num_partitions is not None:
        if partition_id >= num_partitions:
            raise typer.BadParameter(
                f"{partition_id} is not in [0, {num_partitions})", param_hint="--partition-id"
            )
        node_config |= {"partition-id": partition_id, "num-partitions": num_partitions}
    if data_path is not None:
        if not data_path.is_dir():
            raise typer.BadParameter(f"{data_path} is not a folder", param_hint="--data-path")
        node_config["data-path"] = str(data_path.resolve())
    if "partition-id" not in node_config and "data-path" not in node_config:
        raise typer.BadParameter(
            "say where this node's data is: --data-path FOLDER (its own data) or "
            "--partition-id N --num-partitions M (a slice of a simulated federation)",
            param_hint="--data-path / --partition-id",
        )
    if profile:
        node_config["profile"] = profile
    try:
        # A bad profile key would otherwise fail every task this node gets.
        profile_from_node_config(node_config)
    except ProfileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--node-config / --profile") from None
    if not warm:
        cmd = supernode_command(
            superlink=settings.superlink_fleet,
            clientappio=f"127.0.0.1:{port}",
            node_config=node_config,
            root_certificates=None if settings.insecure else settings.tls_file("ca"),
            auth_key=settings.supernode_auth_key,
            force_insecure=settings.force_insecure,
        )
        os.execvpe(cmd[0], cmd, flower_env(settings.home.resolve()))
    settings.home = settings.home.resolve()
    sup = Supervisor(log_to_stdout=settings.log_to_stdout)
    _add_supernode(sup, "supernode", settings, node_config, port, settings.home / "logs", warm)
    data = (
        f"data {node_config['data-path']}"
        if "data-path" in node_config
        else f"partition {partition_id} of {num_partitions}"
    )
    console.print(
        f"[green]client up[/green]: SuperNode ({data}), connecting to {settings.superlink_fleet}"
    )
    _supervise(sup)


register_security_commands(app)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    from pydantic import ValidationError

    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "FLORIST_" + "_".join(str(p) for p in error["loc"]).upper()
            if not error["loc"]:  # Settings.security_problems: the message names the settings
                name = "unsafe settings"
            errors.print(f"[red]{name}[/red]: {escape(error['msg'])}", soft_wrap=True)
        raise SystemExit(2) from None
    configure_logging(settings.log_format, level=settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll drowns the bar
    # A container runtime stops us with SIGTERM: treat it like Ctrl-C so children stop in order.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    app()


if __name__ == "__main__":
    main()
