"""A development CA for mutual TLS (`diffmesh dev-ca DIR`, `diffmesh up --tls`): a CA certificate, a server
certificate every process of a mesh can serve and present, and a client certificate.

For development and tests only: the CA's private key is never written, so nothing else can be signed by it;
make a new directory to change names. Production certificates come from your own CA or cert-manager
(deploy/k8s/components/cert-manager).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclasses.dataclass(frozen=True)
class DevCA:
    """Where the files are."""

    ca: pathlib.Path                 # ca.pem: what clients and servers verify peers against (--tls-ca)
    server_cert: pathlib.Path        # server.pem / server-key.pem: every stage and the gateway
    server_key: pathlib.Path
    client_cert: pathlib.Path        # client.pem / client-key.pem: a client calling a stage directly
    client_key: pathlib.Path


def default_names() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def _subject_alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):      # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(common_name: str, issuer: x509.Name, issuer_key, public_key, now: datetime.datetime,
           usages: list, names: list[str] | None = None, ca: bool = False) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffmesh development"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))   # tolerate a little clock skew between hosts
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if names:
        builder = builder.add_extension(_subject_alt_names(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_ca(directory: str | os.PathLike, names: list[str] | None = None) -> DevCA:
    """Write ca.pem, server.pem + server-key.pem (SANs: localhost, 127.0.0.1, ::1, this host's name and `names`;
    usable as a server and as a client, since the gateway presents it to the stages) and client.pem +
    client-key.pem (client only) into `directory`."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffmesh development"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "diffmesh development CA")])
    ca_cert = _issue("diffmesh development CA", ca_name, ca_key, ca_key.public_key(), now, [], ca=True)
    files = DevCA(ca=root / "ca.pem", server_cert=root / "server.pem", server_key=root / "server-key.pem",
                  client_cert=root / "client.pem", client_key=root / "client-key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for common_name, cert_path, key_path, usages, sans in (
        ("diffmesh server", files.server_cert, files.server_key,
         [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], default_names() + list(names or ())),
        ("diffmesh client", files.client_cert, files.client_key, [ExtendedKeyUsageOID.CLIENT_AUTH], None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(common_name, ca_name, ca_key, key.public_key(), now, usages, sans)
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files
