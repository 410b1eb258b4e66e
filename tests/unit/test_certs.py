"""`florist certs` and SuperNode keys: what the files hold, who may read them, which keys pass."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from florist.server.certs import (
    CertError,
    NodeKeyError,
    make_certs,
    make_node_key,
    parse_hosts,
    parse_node_public_key,
)
from florist.server.cli import app


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_names_every_host_and_verifies_against_the_ca(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "certs", parse_hosts("florist.example.org, 10.0.0.5,fleet"))

    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["florist.example.org", "fleet", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    # The CA signed the server certificate (verify_directly_issued_by checks the signature),
    # and is a CA; the server certificate is not, and serves TLS.
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    # The key file holds the key of the certificate.
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    # Another CA's certificate does not verify: the check above can fail.
    other = make_certs(tmp_path / "other", ["localhost"])
    with pytest.raises(InvalidSignature):
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(other.ca_cert.read_bytes()))


def test_private_keys_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, ["localhost"])
    assert _mode(paths.ca_key) == _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) & 0o044  # certificates are public
    make_node_key(tmp_path / "node")
    assert _mode(tmp_path / "node") == 0o600


def test_certs_are_not_replaced_without_force(tmp_path: Path) -> None:
    first = make_certs(tmp_path, ["localhost"]).ca_cert.read_bytes()
    with pytest.raises(CertError, match="--force"):
        make_certs(tmp_path, ["localhost"])
    assert (tmp_path / "ca.crt").read_bytes() == first
    # A key file left world-readable is tightened when replaced.
    (tmp_path / "server.key").chmod(0o644)
    assert make_certs(tmp_path, ["localhost"], force=True).ca_cert.read_bytes() != first
    assert _mode(tmp_path / "server.key") == 0o600


def test_hosts_are_checked_and_loopback_always_named() -> None:
    assert parse_hosts("a.example, a.example,127.0.0.1") == [
        "a.example",
        "127.0.0.1",
        "localhost",
        "::1",
    ]
    for bad in ("bad host", "-x", "a..b", "ex*mple.org"):
        with pytest.raises(CertError):
            parse_hosts(bad)


def test_node_key_is_p384_openssh_and_parses_as_flower_wants(tmp_path: Path) -> None:
    public_path = make_node_key(tmp_path / "node_key")
    private = serialization.load_ssh_private_key((tmp_path / "node_key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    line = public_path.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ")

    key = parse_node_public_key(line)
    # What Flower's own `flwr supernode register` sends for this key, byte for byte.
    assert key.pem == public_key_to_bytes(private.public_key())
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert key.fingerprint == f"SHA256:{digest}"
    with pytest.raises(CertError, match="--force"):
        make_node_key(tmp_path / "node_key")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_a_key_from_ssh_keygen_parses_with_its_fingerprint(tmp_path: Path) -> None:
    key_path = tmp_path / "k"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key_path)], check=True
    )
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{key_path}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    assert parse_node_public_key(Path(f"{key_path}.pub").read_text()).fingerprint == printed


def _openssh(key: object) -> str:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("ecdsa-sha2-nistp384 not-base64!", "not an OpenSSH public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc", "private key"),
        (_openssh(ed25519.Ed25519PrivateKey.generate().public_key()), "not an elliptic-curve"),
        (
            _openssh(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),
            "not an elliptic-curve",
        ),
    ],
    # Fixed ids: the generated keys differ per collection, and parallel workers must agree.
    ids=["empty", "not-base64", "private-key", "ed25519", "rsa"],
)
def test_keys_flower_would_refuse_are_refused(text: str, message: str) -> None:
    with pytest.raises(NodeKeyError, match=message):
        parse_node_public_key(text)


def test_a_p256_key_passes_and_secp256k1_does_not() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert parse_node_public_key(_openssh(p256)).pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    # secp256k1 has no OpenSSH name at all: refused before the curve check.
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(ValueError):
        _openssh(k1)


def test_cli_certs_and_keygen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    made = runner.invoke(app, ["certs", "--hosts", "server.lan,192.168.1.10"])
    assert made.exit_code == 0, made.output
    assert "server.lan" in made.output and "192.168.1.10" in made.output
    assert (tmp_path / "home" / "certs" / "server.crt").is_file()
    again = runner.invoke(app, ["certs", "--hosts", "server.lan"])
    assert again.exit_code == 1 and "--force" in again.output
    bad = runner.invoke(app, ["certs", "--hosts", "no such host", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and not (tmp_path / "x").exists()

    key = runner.invoke(app, ["node", "keygen", str(tmp_path / "keys" / "site")])
    assert key.exit_code == 0, key.output
    assert "SHA256:" in key.output and (tmp_path / "keys" / "site.pub").is_file()
