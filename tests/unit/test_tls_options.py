"""TLS options: flags and env name the files, bad combinations fail naming the flag, the dev CA's certificates
verify against its CA with the names a local mesh needs."""

from __future__ import annotations

import argparse
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common import settings
from services.common.devca import make_dev_ca
from services.common.tls import TlsFiles, add_tls_arguments, client_ssl_context, tls_from_args, uvicorn_options


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory):
    return make_dev_ca(tmp_path_factory.mktemp("ca"), ["gateway.internal", "10.1.2.3"])


def parse(argv: list[str]) -> argparse.Namespace:
    """As every server parses them: flags, then their environment variables (services/common/settings.py)."""
    return settings.parse_args(add_tls_arguments(argparse.ArgumentParser()), argv)


def test_no_tls_flags_means_plaintext(monkeypatch):
    for name in ("DIFFMESH_TLS_CERT", "DIFFMESH_TLS_KEY", "DIFFMESH_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    assert tls_from_args(parse([])) is None
    assert uvicorn_options(None) == {}


def test_flags_name_the_files(dev_ca):
    args = parse(["--tls-cert", str(dev_ca.server_cert), "--tls-key", str(dev_ca.server_key), "--tls-ca",
                  str(dev_ca.ca)])
    tls = tls_from_args(args)
    assert tls == TlsFiles(str(dev_ca.server_cert), str(dev_ca.server_key), str(dev_ca.ca))
    assert uvicorn_options(tls) == {"ssl_certfile": str(dev_ca.server_cert), "ssl_keyfile": str(dev_ca.server_key)}


def test_env_gives_the_defaults_and_flags_win(dev_ca, monkeypatch):
    monkeypatch.setenv("DIFFMESH_TLS_CERT", str(dev_ca.client_cert))
    monkeypatch.setenv("DIFFMESH_TLS_KEY", str(dev_ca.client_key))
    monkeypatch.setenv("DIFFMESH_TLS_CA", str(dev_ca.ca))
    assert tls_from_args(parse([])) == TlsFiles(str(dev_ca.client_cert), str(dev_ca.client_key), str(dev_ca.ca))
    flagged = tls_from_args(parse(["--tls-cert", str(dev_ca.server_cert), "--tls-key", str(dev_ca.server_key)]))
    assert flagged.cert == str(dev_ca.server_cert) and flagged.ca == str(dev_ca.ca)


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "KEY"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "CA"], "--tls-ca needs --tls-cert"),
])
def test_bad_combinations_name_the_flags(argv, message, monkeypatch):
    for name in ("DIFFMESH_TLS_CERT", "DIFFMESH_TLS_KEY", "DIFFMESH_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        tls_from_args(parse(argv))


def test_a_client_may_have_a_ca_alone(dev_ca, monkeypatch):
    monkeypatch.delenv("DIFFMESH_TLS_CERT", raising=False)
    monkeypatch.delenv("DIFFMESH_TLS_KEY", raising=False)
    assert tls_from_args(parse(["--tls-ca", str(dev_ca.ca)]), server=False) == TlsFiles(ca=str(dev_ca.ca))


def test_a_missing_file_fails_naming_flag_and_path(dev_ca, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"--tls-ca {missing}"):
        tls_from_args(parse(["--tls-cert", str(dev_ca.server_cert), "--tls-key", str(dev_ca.server_key),
                             "--tls-ca", str(missing)]))


def test_dev_ca_server_certificate_names_and_usages(dev_ca):
    cert = x509.load_pem_x509_certificate(dev_ca.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gateway.internal"} <= set(sans.get_values_for_type(x509.DNSName))
    ips = set(sans.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3")} <= ips
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # The gateway presents the server certificate to the stages, so it must serve as a client certificate too.
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    ca = x509.load_pem_x509_certificate(dev_ca.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate(dev_ca.client_cert.read_bytes()).verify_directly_issued_by(ca)


def test_dev_ca_keys_are_private_and_load(dev_ca):
    for key in (dev_ca.server_key, dev_ca.client_key):
        assert key.stat().st_mode & 0o077 == 0
    assert not any(path.name.startswith("ca-key") for path in dev_ca.ca.parent.iterdir())
    client_ssl_context(TlsFiles(str(dev_ca.client_cert), str(dev_ca.client_key), str(dev_ca.ca)))
