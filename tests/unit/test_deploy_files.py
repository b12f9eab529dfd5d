"""The deploy files parse, and they turn TLS and API keys on: every service gets the TLS files, the gateway a key
source, compose publishes on loopback only, and no probe relies on plaintext gRPC."""

from __future__ import annotations

import pathlib

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
TLS_ENV = {"DIFFMESH_TLS_CERT", "DIFFMESH_TLS_KEY", "DIFFMESH_TLS_CA"}


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        list(yaml.safe_load_all(path.read_text()))


def test_compose_turns_tls_and_keys_on_and_binds_loopback():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("encoder", "denoiser", "decoder", "gateway"):
        assert TLS_ENV <= set(services[name]["environment"]), name
        assert services[name]["depends_on"]["tls-init"]["condition"] == "service_completed_successfully"
    assert "DIFFMESH_API_KEYS" in services["gateway"]["environment"]
    assert services["gateway"]["healthcheck"]["test"][-1].startswith("https://")
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${DIFFMESH_BIND:-127.0.0.1}:"), (name, port)


def kubernetes_containers():
    for path in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] in ("Deployment", "StatefulSet"):
                spec = document["spec"]["template"]["spec"]
                for container in spec["containers"]:
                    yield document["metadata"]["name"], container, spec


def test_kubernetes_pods_mount_the_tls_secret_and_never_probe_plaintext_grpc():
    names = set()
    for name, container, pod in kubernetes_containers():
        names.add(name)
        assert TLS_ENV <= {env["name"] for env in container["env"]}, name
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "diffmesh-tls", name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe], f"{name} {probe}: kubelet's gRPC probes cannot speak TLS"
            if "httpGet" in container[probe]:
                assert container[probe]["httpGet"]["scheme"] == "HTTPS", (name, probe)
        if name == "gateway":
            keys = next(env for env in container["env"] if env["name"] == "DIFFMESH_API_KEYS")
            assert keys["valueFrom"]["secretKeyRef"]["name"] == "diffmesh-api-keys"
    assert names == {"encoder", "denoiser", "decoder", "gateway"}


def test_the_gang_component_fences_the_rendezvous_with_a_network_policy():
    component = DEPLOY / "k8s" / "components" / "denoiser-gang"
    assert "network-policy.yaml" in yaml.safe_load((component / "kustomization.yaml").read_text())["resources"]
    policy = yaml.safe_load((component / "network-policy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
