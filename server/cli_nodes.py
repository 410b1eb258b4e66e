"""`florist certs` and `florist node …`: certificates, SuperNode keys and their registration."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from florist.server.certs import (
    CertError,
    CertPaths,
    NodeKeyError,
    certificate_names,
    make_certs,
    make_node_key,
    parse_hosts,
    parse_node_public_key,
)
from florist.server.settings import Settings, get_settings, is_loopback

if TYPE_CHECKING:
    from florist.server.cli import Api

node_app = typer.Typer(help="SuperNode keys: make them, and register them with the SuperLink.")
console = Console()
errors = Console(stderr=True)

ApiOption = Annotated[
    str | None,
    typer.Option(help="API base URL (default: http://FLORIST_API_HOST:FLORIST_API_PORT)"),
]


def _api(base: str | None) -> Api:
    # Imported here: florist.server.cli registers these commands while it is being imported.
    from florist.server.cli import Api

    return Api(base)


def certs(
    hosts: Annotated[
        str,
        typer.Option(
            help="Comma-separated DNS names and IP addresses clients reach the server by "
            "(localhost, 127.0.0.1 and ::1 are always added)"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the files (default: $FLORIST_HOME/certs)")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace certificates that exist")] = False,
) -> None:
    """Make a local CA and a server certificate for the SuperLink and the API."""
    folder = out or get_settings().home / "certs"
    try:
        paths = make_certs(folder, parse_hosts(hosts), force=force)
    except CertError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"CA {paths.ca_cert}, server certificate {paths.server_cert} for "
        f"{', '.join(certificate_names(paths.server_cert))}; keys are readable by you only.\n"
        f"Server: FLORIST_TLS_DIR={folder} florist server --secure\n"
        f"Clients need {paths.ca_cert}: florist client --root-certificates ca.crt ...",
        soft_wrap=True,
    )


@node_app.command("keygen")
def keygen(
    path: Annotated[Path, typer.Argument(help="The private key's file; the public key is .pub")],
    force: Annotated[bool, typer.Option(help="Replace a key pair that exists")] = False,
) -> None:
    """Make a SuperNode key pair (ECDSA P-384, OpenSSH format, as ssh-keygen makes)."""
    try:
        public = make_node_key(path, force=force)
    except CertError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    fingerprint = parse_node_public_key(public.read_text()).fingerprint
    console.print(
        f"private key {path} (keep it on the node), public key {public} ({fingerprint})\n"
        f"Register it: florist node add {public} --name NAME; start the node with "
        f"--auth-key {path}",
        soft_wrap=True,
    )


@node_app.command("add")
def add(
    keyfile: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The node's public key (.pub)")
    ],
    name: Annotated[str, typer.Option(help="Who the node is: a site, a machine")],
    api: ApiOption = None,
) -> None:
    """Register a SuperNode's public key: the SuperLink admits the node from now on."""
    try:
        text = parse_node_public_key(keyfile.read_text(errors="replace")).openssh
    except NodeKeyError as exc:
        errors.print(f"[red]{escape(str(keyfile))}: {escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    with _api(api) as remote:
        key = remote.request("POST", "/api/v1/node-keys", json={"name": name, "public_key": text})
    console.print(
        f"key {key['id']} ({escape(key['name'])}, {key['fingerprint']}) registered: "
        f"the node that connects with it is node {key['node_id']}",
        soft_wrap=True,
    )


@node_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON")] = False,
    api: ApiOption = None,
) -> None:
    """The registered keys, and the node connected with each."""
    with _api(api) as remote:
        keys = remote.get("/api/v1/node-keys")
    if as_json:
        console.print_json(json.dumps(keys))
        return
    if not keys["supernode_auth"]:
        console.print(
            "[yellow]The SuperLink runs without SuperNode authentication: any node may "
            "connect, registered or not.[/yellow]"
        )
    if keys["superlink"] != "ok":
        console.print(f"[yellow]SuperLink: {escape(keys['superlink'])}[/yellow]")
    if not keys["data"]:
        console.print("no node keys registered")
        return
    table = Table("id", "name", "fingerprint", "node", "status", "added")
    for key in keys["data"]:
        node = key.get("node") or {}
        table.add_row(
            str(key["id"]),
            escape(key["name"]),
            key["fingerprint"],
            key["node_id"],
            node.get("status", "-"),
            key["added_at"][:19].replace("T", " "),
        )
    console.print(table)


@node_app.command("remove")
def remove(
    key_id: Annotated[int, typer.Argument(min=0, help="The key's id (`florist node list`)")],
    api: ApiOption = None,
) -> None:
    """Unregister a key: its node is refused from now on."""
    with _api(api) as remote:
        key = remote.request("DELETE", f"/api/v1/node-keys/{key_id}")
    console.print(f"key {key['id']} ({escape(key['name'])}) removed; node {key['node_id']} refused")


# --- the local secure stack (`florist up --secure`, `florist server --secure`) -----------------


def make_secure(settings: Settings, hosts: str | None = None) -> None:
    """Switch ``settings`` to TLS and SuperNode authentication, making certificates in
    $FLORIST_HOME/certs when no FLORIST_TLS_* names any."""
    if settings.insecure:
        folder = settings.home / "certs"
        paths = CertPaths(folder)
        if not paths.complete():
            names = hosts or ",".join(_own_names(settings))
            try:
                make_certs(folder, parse_hosts(names), force=False)
            except CertError as exc:
                raise typer.BadParameter(str(exc), param_hint="--hosts") from None
            console.print(f"made a CA and a server certificate in {folder}")
        settings.tls_dir = folder
        settings.insecure = False
    settings.supernode_auth = True


def _own_names(settings: Settings) -> list[str]:
    """The names this server is reached by: its configured hosts and this machine's name."""
    hosts = [a.rsplit(":", 1)[0] for a in (settings.superlink_fleet, settings.superlink_control)]
    hosts += [settings.api_host, socket.gethostname()]
    return [h.strip("[]") for h in hosts if h not in ("0.0.0.0", "::") and not is_loopback(h)]


def local_node_key(settings: Settings, name: str) -> Path:
    """The key of one of `florist up`'s SuperNodes ($FLORIST_HOME/node-keys/NAME), made if
    missing and registered through the API if it is not yet; returns the private key's path."""
    from florist.server.cli import api_url

    path = settings.home / "node-keys" / name
    if not path.exists():
        make_node_key(path)
    public = parse_node_public_key(path.with_name(path.name + ".pub").read_text())
    with _api(api_url(settings)) as remote:
        keys: list[dict[str, Any]] = remote.get("/api/v1/node-keys")["data"]
        if all(key["fingerprint"] != public.fingerprint for key in keys):
            remote.request(
                "POST", "/api/v1/node-keys", json={"name": name, "public_key": public.openssh}
            )
    return path


def register_security_commands(app: typer.Typer) -> None:
    """Add `certs` and `node` to the `florist` command."""
    app.command("certs")(certs)
    app.add_typer(node_app, name="node")
