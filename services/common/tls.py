"""TLS for every link: the flags (and env) that name a certificate, its key and a CA, and the credentials gRPC,
uvicorn and the standard library build from them.

A server with a certificate serves TLS; a stage with a CA as well requires every client to present a certificate
signed by it (mutual TLS). A client with a CA verifies the server against it and, when it has a certificate of its
own, presents it: the gateway presents its certificate to the stages. Files are read once, at start-up, so a
missing or unreadable file fails there, naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import ssl

import grpc

from services.common.settings import bind_env

ENV = {"cert": "DIFFMESH_TLS_CERT", "key": "DIFFMESH_TLS_KEY", "ca": "DIFFMESH_TLS_CA"}


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Paths of a PEM certificate (chain), its private key and a CA bundle; any may be absent."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    def read(self, part: str) -> bytes | None:
        path = getattr(self, part)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            raise ValueError(f"--tls-{part} {path}: {error.strerror or error}") from None


def add_tls_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(
        "TLS", "with a certificate the server serves TLS; a stage given a CA too requires client certificates "
        "signed by it (mutual TLS); the gateway verifies the stages against the CA and presents its certificate")
    group.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="certificate chain to serve (and present as a client) (default: none, plaintext)")
    group.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert (default: none)")
    group.add_argument("--tls-ca", default=None, metavar="PEM",
                       help="CA bundle that peers' certificates must chain to (default: none)")
    # Read through the settings (services/common/settings.py): flags > env > the --config file > defaults.
    return bind_env(parser, tls_cert=ENV["cert"], tls_key=ENV["key"], tls_ca=ENV["ca"])


def tls_from_args(args: argparse.Namespace, server: bool = True) -> TlsFiles | None:
    """The TLS files the flags name, checked and readable; None when none is given (plaintext, as before).

    A stage (`server`) with a CA but no certificate is refused: it could not check clients without serving TLS."""
    files = TlsFiles(cert=getattr(args, "tls_cert", None) or None, key=getattr(args, "tls_key", None) or None,
                     ca=getattr(args, "tls_ca", None) or None)
    if files == TlsFiles():
        return None
    if (files.cert is None) != (files.key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if server and files.ca is not None and files.cert is None:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key: a server checks client certificates only over TLS")
    for part in ("cert", "key", "ca"):
        files.read(part)
    return files


def server_credentials(tls: TlsFiles, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """TLS with the process's certificate; with a CA (and `require_client_cert`), mutual TLS: a client without a
    certificate signed by the CA fails the handshake and never reaches a handler."""
    ca = tls.read("ca") if require_client_cert else None
    return grpc.ssl_server_credentials([(tls.read("key"), tls.read("cert"))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Verify the server against the CA (the system's roots when none is given); present our certificate if any."""
    return grpc.ssl_channel_credentials(root_certificates=tls.read("ca"), private_key=tls.read("key"),
                                        certificate_chain=tls.read("cert"))


def uvicorn_options(tls: TlsFiles | None) -> dict:
    """uvicorn.Config's keywords for HTTPS with the process's certificate. REST clients present no certificate:
    they authenticate with API keys."""
    if tls is None or not tls.serves_tls:
        return {}
    return {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """An ssl context for HTTPS clients of the standard library (health checks): verify against the CA, present
    our certificate if any."""
    context = ssl.create_default_context(cafile=tls.ca)
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context
