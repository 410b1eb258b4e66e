"""TLS certificates (a local CA and a server certificate) and SuperNode key pairs, made locally."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The file names Florist and its docs use everywhere; FLORIST_TLS_DIR points at a folder of them.
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CERT_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
# Loopback is always named: the SuperLink's own ServerApp runtime (flower-superexec) connects to
# it over 127.0.0.1 with the same certificate, whatever the public names are.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest a public CA may issue for; browsers refuse longer ones

# Flower's SuperNode auth checks the key is on a NIST curve; P-384 is what its docs make.
NODE_KEY_CURVE = ec.SECP384R1()


class CertError(ValueError):
    """Certificates cannot be made as asked (files in the way, a bad host name)."""


class NodeKeyError(ValueError):
    """A SuperNode public key Flower would not accept."""


@dataclass(frozen=True)
class CertPaths:
    """Where a CA and a server certificate live in one folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def complete(self) -> bool:
        """All four files exist (what ``florist up --secure`` needs to use them as they are)."""
        return all((self.folder / name).is_file() for name in CERT_FILES)


def parse_hosts(text: str) -> list[str]:
    """``h1,h2,10.0.0.5`` → the names, loopback added, duplicates dropped, order kept."""
    names = [h.strip() for h in text.split(",") if h.strip()]
    for name in names:
        _check_host(name)
    return list(dict.fromkeys([*names, *LOOPBACK_NAMES]))


def _check_host(name: str) -> None:
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    ok = all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )
    if not ok or name.startswith("-"):
        raise CertError(f"{name!r} is neither an IP address nor a DNS name")


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not change a file that was already there


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(folder: Path, hosts: list[str], *, force: bool = False) -> CertPaths:
    """A new CA and a server certificate for ``hosts`` (its SANs) in ``folder``.

    Refuses when any of the files exists, unless ``force``: a new CA would orphan every
    SuperNode that trusts the old one.
    """
    paths = CertPaths(folder)
    present = [name for name in CERT_FILES if (folder / name).exists()]
    if present and not force:
        raise CertError(
            f"{folder} already holds {', '.join(present)}; pass --force to replace them "
            "(every SuperNode then needs the new ca.crt)"
        )
    if not hosts:
        raise CertError("name at least one host")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=5)  # a little slack for clocks that lag

    ca_key = ec.generate_private_key(NODE_KEY_CURVE)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Florist"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Florist local CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(NODE_KEY_CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Florist"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=SERVER_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def certificate_names(path: Path) -> list[str]:
    """The SANs of a PEM certificate, as text (for `florist certs` to show what it made)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


# --- SuperNode keys ------------------------------------------------------------------------------


def make_node_key(path: Path, *, force: bool = False) -> Path:
    """An ECDSA P-384 key pair as ``ssh-keygen -t ecdsa -b 384`` writes it: the private key at
    ``path`` (OpenSSH format, 0600; ``flower-supernode --auth-supernode-private-key``), the
    public key at ``path.pub`` (one OpenSSH line; ``florist node add``). Returns the .pub."""
    public = path.with_name(path.name + ".pub")
    if not force and (path.exists() or public.exists()):
        raise CertError(f"{path} or {public} exists; pass --force to replace the pair")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(NODE_KEY_CURVE)
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return public


@dataclass(frozen=True)
class NodePublicKey:
    """A SuperNode's public key, checked: the OpenSSH line as given, and Flower's form of it."""

    openssh: str
    pem: bytes  # what Flower's Control API stores and its ListNodes returns (SubjectPublicKeyInfo)
    fingerprint: str  # SHA256:… over the OpenSSH key blob, as `ssh-keygen -l` prints it


def parse_node_public_key(text: str) -> NodePublicKey:
    """A public key as ``ssh-keygen -t ecdsa -b 384`` writes it (``ecdsa-sha2-nistp384 AAAA…``).

    Raises NodeKeyError for anything Flower's SuperLink would refuse: not OpenSSH, not an
    elliptic-curve key, not on a NIST curve.
    """
    line = text.strip()
    if not line:
        raise NodeKeyError("the public key is empty")
    if "PRIVATE KEY" in line:
        raise NodeKeyError("this is a private key: give the .pub file")
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise NodeKeyError(
            f"not an OpenSSH public key (expected 'ecdsa-sha2-nistp384 AAAA…'): {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError(
            f"not an elliptic-curve key ({type(key).__name__}); "
            "make one with `florist node keygen` or `ssh-keygen -t ecdsa -b 384`"
        )
    if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
        raise NodeKeyError(f"curve {key.curve.name} is not a NIST curve Flower accepts")
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    return NodePublicKey(
        openssh=blob.decode(),
        pem=key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        fingerprint=f"SHA256:{digest}",
    )
