"""The deploy files: every Kubernetes overlay renders (kustomize) and validates strictly (the Kubernetes schemas, the
CRDs' models, our LeaderWorkerSet schema); the pieces of a complete package are there (budgets, network policies,
monitors, autoscalers, the LeaderWorkerSet gang, GPU scheduling, the gateway's config, a model volume, labels) and
agree with the code's ports, probes, settings and gang environment; compose binds loopback, turns TLS and keys on
and limits resources."""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import os
import pathlib
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.k8s_manifests import (
    OVERLAYS,
    ROOT,
    container,
    env_of,
    find,
    load_crd_models,
    one,
    pod_template,
    render,
    validation_errors,
)

DEPLOY = ROOT / "deploy"
TLS_ENV = {"DIFFMESH_TLS_CERT", "DIFFMESH_TLS_KEY", "DIFFMESH_TLS_CA"}
STAGES = ("encoder", "denoiser", "decoder")
# The metrics port Kubernetes gives every stage (DIFFMESH_METRICS_PORT; the code's default 0 picks a free one).
METRICS_PORT = 9464
# Overlays with every optional component added, as users combine them; rendered and validated like the overlays.
COMBINATIONS = {
    "cuda+volume+lws+monitoring+cert-manager+gateway-ha":
        ("cuda", ("model-volume", "denoiser-lws", "monitoring", "cert-manager", "gateway-ha")),
    "cpu-gang+monitoring+cert-manager": ("cpu-gang", ("monitoring", "cert-manager")),
}
ALL_RENDERS = {**{name: (name, ()) for name in OVERLAYS}, **COMBINATIONS}


@functools.lru_cache(maxsize=1)
def all_rendered() -> dict[str, tuple[dict, ...]]:
    """Every render, once per session. The kustomize runs are processes of their own, run in parallel, and the
    CRD models (seconds of class building) load meanwhile."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = pool.submit(load_crd_models)
        futures = {name: pool.submit(render, *ALL_RENDERS[name]) for name in ALL_RENDERS}
        models.result()
        return {name: future.result() for name, future in futures.items()}


def rendered(name: str) -> tuple[dict, ...]:
    return all_rendered()[name]


@functools.lru_cache(maxsize=None)
def stage_default_port(stage: str) -> int:
    """The stage's DEFAULT_PORT, read from its module's source: importing it would load torch and diffusers."""
    tree = ast.parse((ROOT / "services" / stage / "server.py").read_text())
    for node in tree.body:
        names = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
        if isinstance(node, ast.Assign) and names == ["DEFAULT_PORT"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"services/{stage}/server.py has no DEFAULT_PORT")


def workloads(docs) -> dict[str, dict]:
    found = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet",
                                                                               "LeaderWorkerSet")}
    assert set(found) == {*STAGES, "gateway"}, sorted(found)
    return found


# -- rendering and schemas -------------------------------------------------------------------------------------


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 30
    for path in files:
        list(yaml.safe_load_all(path.read_text()))


def test_there_is_an_overlay_per_device_and_gang_variant():
    assert set(OVERLAYS) == {"cpu", "cpu-gang", "cuda", "cuda-gang", "cuda-lws", "xpu", "xpu-xe"}


@pytest.mark.parametrize("name", sorted(ALL_RENDERS))
def test_every_overlay_renders_and_validates_strictly_against_the_schemas(name):
    docs = rendered(name)
    assert len(docs) >= 15
    errors = [error for doc in docs for error in validation_errors(doc)]
    assert errors == []


# For each kind: a misspelt key (an unknown field) and a bad value, each of which a cluster's API server rejects.
@pytest.mark.parametrize("kind, path, value", [
    ("StatefulSet", ("spec", "template", "spec", "containers", 0, "imagePullPolcy"), "Always"),
    ("StatefulSet", ("spec", "replicas"), "2"),
    ("HorizontalPodAutoscaler", ("spec", "maxReplica"), 3),
    ("PodDisruptionBudget", ("spec", "maxUnavailable"), []),
    ("NetworkPolicy", ("spec", "ingress", 0, "form"), []),
    ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate", "sise"), 2),
    ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate", "workerTemplate", "spec", "containers", 0, "imagee"), "x"),
    ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate", "workerTemplate", "metadata", "labelz"), {}),
    ("LeaderWorkerSet", ("spec", "startupPolicy"), "WhenReady"),
    ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate", "size"), 0),
    ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate", "restartPolicy"), "Always"),
    ("LeaderWorkerSet", ("spec", "rolloutStrategy", "rollingUpdateConfiguration", "maxSurge"), "150%"),
    ("LeaderWorkerSet", ("spec", "networkConfig", "subdomainPolicy"), "PerReplica"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "prot"), "metrics"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "scheme"), "htp"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "15 seconds"),
    ("ServiceMonitor", ("spec", "endpoints", 0, "tlsConfig", "serverNmae"), "gateway"),
    ("ServiceMonitor", ("metadata", "labelz"), {}),
    ("ServiceMonitor", ("spec", "endpoints", 0, "port"), 8000),
    ("Certificate", ("spec", "dnsName"), ["gateway"]),
    ("Certificate", ("spec", "dns_names"), ["gateway"]),         # the model's Python name, not the API's
    ("Certificate", ("spec", "isCA"), "true"),
    ("Certificate", ("spec", "privateKey", "algorithm"), "RSB"),
    ("Issuer", ("spec", "selfSigned", "crlDistributionPoint"), ["http://ca.example/crl"]),
    ("Issuer", ("spec", "selfSigned"), "yes"),
])
def test_the_validation_rejects_unknown_fields_and_bad_values(kind, path, value):
    docs = rendered("cuda+volume+lws+monitoring+cert-manager+gateway-ha")
    doc = copy.deepcopy(find(docs, kind)[0])
    assert validation_errors(doc) == []
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = validation_errors(doc)
    assert errors, f"{kind}: {'.'.join(map(str, path))}={value!r} was accepted"
    # The error names the corrupted field: its path, or (an unexpected key) its object's path and the key.
    full, parent = ".".join(map(str, path)), ".".join(map(str, path[:-1]))
    assert any(f": {full}: " in error or (f": {parent}: " in error and f"'{path[-1]}'" in error)
               for error in errors), errors


def test_every_object_and_pod_carries_the_recommended_labels():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in ALL_RENDERS:
        for doc in rendered(name):
            labels = [doc["metadata"].get("labels", {})]
            if doc["kind"] in ("Deployment", "StatefulSet", "LeaderWorkerSet"):
                labels.append(pod_template(doc)["metadata"]["labels"])
            for found in labels:
                where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
                assert found.get("app.kubernetes.io/name") == "diffmesh", where
                assert found.get("app.kubernetes.io/component"), where
                assert found.get("app.kubernetes.io/part-of") == "diffmesh", where
                assert found.get("app.kubernetes.io/version") == version, where


# -- the pieces agree with the code --------------------------------------------------------------------------


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_stage_ports_and_probes_agree_with_the_code_defaults():
    from services.common.stage import add_stage_arguments

    for name in ALL_RENDERS:
        docs = rendered(name)
        found = workloads(docs)
        for stage in STAGES:
            port = stage_default_port(stage)
            spec = container(found[stage])
            args = spec["args"]
            assert args[:2] == ["serve", stage] and args[args.index("--port") + 1] == str(port), (name, stage)
            assert args[args.index("--host") + 1] == "0.0.0.0", (name, stage)
            ports = {item["name"]: item["containerPort"] for item in spec["ports"]}
            assert ports["grpc"] == port and ports["metrics"] == METRICS_PORT, (name, stage)
            assert env_of(spec)["DIFFMESH_METRICS_PORT"]["value"] == str(METRICS_PORT), (name, stage)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert spec[probe]["exec"]["command"] == ["diffmesh-healthcheck", "grpc", f"127.0.0.1:{port}"], \
                    (name, stage, probe)
            service = one(docs, "Service", stage)
            assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
            assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "grpc")]
            # The stage drains for --grace seconds; Kubernetes must wait longer before it kills.
            grace = add_stage_arguments(argparse.ArgumentParser(), port).get_default("grace")
            assert pod_template(found[stage])["spec"]["terminationGracePeriodSeconds"] > grace
        gateway_env = env_of(container(found["gateway"]))
        for stage in STAGES:
            addresses = gateway_env[f"DIFFMESH_{stage.upper()}_ADDR"]["value"].split(",")
            for index, address in enumerate(addresses):
                assert host_port(address) == (f"{stage}-{index}.{stage}", stage_default_port(stage)), (name, address)


def test_gateway_ports_probes_and_config_agree_with_the_code(monkeypatch, tmp_path):
    from services.gateway.config import parse_config

    for key in [key for key in os.environ if key.startswith("DIFFMESH_")]:
        monkeypatch.delenv(key)
    defaults, _ = parse_config([])
    docs = rendered("cpu")
    gateway = one(docs, "Deployment", "gateway")
    spec = container(gateway)
    args = spec["args"]
    assert args[args.index("--http-port") + 1] == str(defaults.http_port) == "8000"
    assert args[args.index("--grpc-port") + 1] == str(defaults.grpc_port) == "50051"
    ports = {item["name"]: item["containerPort"] for item in spec["ports"]}
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port}
    service_ports = {p["name"]: p["port"] for p in one(docs, "Service", "gateway")["spec"]["ports"]}
    assert service_ports == ports
    # Readiness needs every stage (/health); liveness only the HTTP server (/metrics), both over HTTPS.
    assert spec["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    for probe in ("startupProbe", "livenessProbe"):
        assert spec[probe]["httpGet"] == {"path": "/metrics", "port": "http", "scheme": "HTTPS"}

    # The ConfigMap holds gateway.toml, mounted where DIFFMESH_GATEWAY_CONFIG points, and the gateway reads it.
    config_map = find(docs, "ConfigMap")[0]
    volume = next(v for v in pod_template(gateway)["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in spec["volumeMounts"] if m["name"] == "config")
    config_path = env_of(spec)["DIFFMESH_GATEWAY_CONFIG"]["value"]
    assert config_path == f"{mount['mountPath']}/gateway.toml" and set(config_map["data"]) == {"gateway.toml"}
    text = config_map["data"]["gateway.toml"]
    shipped, _ = parse_config(["--config", str(write(tmp_path / "shipped.toml", text))])
    assert shipped.grace_seconds < pod_template(gateway)["spec"]["terminationGracePeriodSeconds"]
    # Every key the file sets reaches the config: changed in the file, it changes what the gateway runs with.
    fields = {"request_timeout": "request_timeout_s", "stage_wait": "stage_wait_s", "grace": "grace_seconds",
              "stage_stall_timeout": "stage_stall_timeout_s", "max_queued_jobs": "max_queued_jobs",
              "retention_age": "retention_age_s", "retention_bytes": "retention_bytes"}
    assert set(tomllib.loads(text)) == set(fields)
    changed = re.sub(r"^(\w+) = (\d+)", r"\1 = \g<2>7", text, flags=re.M)
    changed = changed.replace('"24h"', '"36h"').replace('"10G"', '"12G"')
    edited, _ = parse_config(["--config", str(write(tmp_path / "edited.toml", changed))])
    for key, field in fields.items():
        assert getattr(edited, field) != getattr(shipped, field), key


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def test_the_tls_certificate_names_every_address_the_gateway_dials():
    docs = rendered("cpu-gang+monitoring+cert-manager")
    certificate = one(docs, "Certificate", "diffmesh-tls")
    names = set(certificate["spec"]["dnsNames"])
    assert "127.0.0.1" in certificate["spec"]["ipAddresses"]          # the stages' exec probes dial it
    for name in ALL_RENDERS:
        env = env_of(container(workloads(rendered(name))["gateway"]))
        for stage in STAGES:
            for address in env[f"DIFFMESH_{stage.upper()}_ADDR"]["value"].split(","):
                assert host_port(address)[0] in names, (name, address)
    assert "gateway" in names
    monitor = one(docs, "ServiceMonitor", "diffmesh-gateway")
    assert monitor["spec"]["endpoints"][0]["tlsConfig"]["serverName"] in names


# -- the pieces of a complete package ------------------------------------------------------------------------


def test_disruption_budgets_cover_every_stage_and_hold_a_gang_whole():
    for name in ALL_RENDERS:
        docs = rendered(name)
        budgets = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "PodDisruptionBudget")}
        assert set(budgets) == {*STAGES, "gateway"}, name
        for component, budget in budgets.items():
            assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        denoiser = workloads(docs)["denoiser"]
        is_gang = "WORLD_SIZE" in env_of(container(denoiser))
        # A gang cannot lose a rank: no voluntary eviction of any of its pods; a single rank may move.
        assert budgets["denoiser"] == {**budgets["denoiser"], "maxUnavailable": 0 if is_gang else 1}, name
        assert budgets["encoder"]["maxUnavailable"] == 1


def ingress_rules(docs, component: str) -> list[dict]:
    rules = []
    for policy in find(docs, "NetworkPolicy"):
        if policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == component:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            rules.extend(policy["spec"]["ingress"])
    return rules


def peers(rule: dict) -> list[str]:
    found = []
    for source in rule.get("from", [{"anywhere": True}]):
        if "podSelector" in source:
            found.append("pod:" + source["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
        elif "namespaceSelector" in source:
            found.append("namespace:" + source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        else:
            found.append("anywhere")
    return found


def test_network_policies_admit_only_the_gateway_gang_peers_and_monitoring():
    for name in ALL_RENDERS:
        docs = rendered(name)
        is_gang = "WORLD_SIZE" in env_of(container(workloads(docs)["denoiser"]))
        for stage in STAGES:
            admitted = sorted((peer, tuple(p["port"] for p in rule.get("ports", [])))
                              for rule in ingress_rules(docs, stage) for peer in peers(rule))
            expected = [("namespace:monitoring", (METRICS_PORT,)), ("pod:gateway", (stage_default_port(stage),))]
            if stage == "denoiser" and is_gang:
                expected.append(("pod:denoiser", ()))          # every port: rendezvous, collectives
            assert admitted == sorted(expected), (name, stage)
        gateway = [(peer, tuple(p["port"] for p in rule["ports"])) for rule in ingress_rules(docs, "gateway")
                   for peer in peers(rule)]
        assert gateway == [("anywhere", (8000, 50051))], name


def test_monitors_scrape_every_stage_pod_and_the_gateway():
    docs = rendered("cpu-gang+monitoring+cert-manager")
    pod_monitor = one(docs, "PodMonitor", "diffmesh-stages")["spec"]
    expression = pod_monitor["selector"]["matchExpressions"][0]
    assert expression["key"] == "app.kubernetes.io/component" and sorted(expression["values"]) == sorted(STAGES)
    endpoint = pod_monitor["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("metrics", "/metrics", "http")
    service_monitor = one(docs, "ServiceMonitor", "diffmesh-gateway")["spec"]
    assert service_monitor["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    endpoint = service_monitor["endpoints"][0]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("http", "/metrics", "https")
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "diffmesh-tls", "key": "ca.crt"}


def test_autoscalers_scale_the_stateless_stages_over_the_addresses_the_gateway_knows():
    for name in ("cpu", "cpu-gang"):
        docs = rendered(name)
        scalers = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "HorizontalPodAutoscaler")}
        assert set(scalers) == {"encoder", "decoder"}, name     # not the gang, not the SQLite gateway
        env = env_of(container(one(docs, "Deployment", "gateway")))
        for stage, scaler in scalers.items():
            assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": stage}
            addresses = env[f"DIFFMESH_{stage.upper()}_ADDR"]["value"].split(",")
            assert len(addresses) == scaler["maxReplicas"] > scaler["minReplicas"] >= 1
            assert scaler["metrics"][0]["resource"]["name"] == "cpu"
            requests = container(one(docs, "StatefulSet", stage))["resources"]["requests"]
            assert "cpu" in requests                             # utilization is relative to the request


def test_the_gateway_scales_only_on_a_shared_database_and_volume():
    docs = rendered("cuda")
    gateway = one(docs, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] == 1 and gateway["spec"]["strategy"] == {"type": "Recreate"}
    assert "DIFFMESH_DATABASE_URL" not in env_of(container(gateway))
    assert find(docs, "HorizontalPodAutoscaler", "gateway") == []

    docs = rendered("cuda+volume+lws+monitoring+cert-manager+gateway-ha")
    gateway = one(docs, "Deployment", "gateway")
    env = env_of(container(gateway))
    assert env["DIFFMESH_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "diffmesh-database", "key": "url"}
    assert env["DIFFMESH_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert one(docs, "PersistentVolumeClaim", "gateway-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    scaler = one(docs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert scaler["scaleTargetRef"]["kind"] == "Deployment" and scaler["minReplicas"] >= 2
    assert gateway["spec"]["strategy"]["type"] == "RollingUpdate"


def test_replicas_spread_over_nodes_and_zones():
    docs = rendered("cpu")
    for stage in ("encoder", "decoder"):
        spec = pod_template(one(docs, "StatefulSet", stage))["spec"]
        term = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == stage
        spread = spec["topologySpreadConstraints"][0]
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == stage
    # A gang's ranks stay close instead: one zone.
    gang = pod_template(one(rendered("cpu-gang"), "StatefulSet", "denoiser"))["spec"]
    term = gang["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"


@pytest.mark.parametrize("overlay, resource, node_label", [
    ("cuda", "nvidia.com/gpu", "nvidia.com/gpu.present"),
    ("cuda-gang", "nvidia.com/gpu", "nvidia.com/gpu.present"),
    ("cuda-lws", "nvidia.com/gpu", "nvidia.com/gpu.present"),
    ("xpu", "gpu.intel.com/i915", "intel.feature.node.kubernetes.io/gpu"),
    ("xpu-xe", "gpu.intel.com/xe", "intel.feature.node.kubernetes.io/gpu"),
])
def test_gpu_overlays_request_the_device_on_gpu_nodes(overlay, resource, node_label):
    found = workloads(rendered(overlay))
    for stage in ("denoiser", "decoder"):
        spec = pod_template(found[stage])["spec"]
        limits = container(found[stage])["resources"]["limits"]
        assert limits[resource] == 1 and not [key for key in limits if "gpu" in key and key != resource]
        assert spec["nodeSelector"] == {node_label: "true"}
        assert {"key": resource, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert env_of(container(found[stage]))["DIFFMESH_DEVICE"]["value"] == ("cuda" if "cuda" in overlay else "xpu")
    for stage in ("encoder", "gateway"):                  # on CPU nodes
        spec = pod_template(found[stage])["spec"]
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert not [key for key in container(found[stage])["resources"]["limits"] if "gpu" in key]


def test_the_model_volume_is_mounted_read_only_in_every_stage():
    docs = rendered("cuda+volume+lws+monitoring+cert-manager+gateway-ha")
    claim = one(docs, "PersistentVolumeClaim", "diffmesh-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    found = workloads(docs)
    model = env_of(container(found["gateway"]))["DIFFMESH_MODEL"]["value"]
    for stage in STAGES:
        spec = container(found[stage])
        volume = next(v for v in pod_template(found[stage])["spec"]["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"] == {"claimName": "diffmesh-models", "readOnly": True}
        mount = next(m for m in spec["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True and model.startswith(mount["mountPath"] + "/")
        assert env_of(spec)["DIFFMESH_MODEL"]["value"] == model


# -- the gang's environment ----------------------------------------------------------------------------------


def expand(env: list[dict], known: dict[str, str]) -> dict[str, str]:
    """Kubernetes' $(VAR) expansion: a reference to a variable defined earlier in the list (or by the platform
    before it) is replaced; anything else stays as written."""
    resolved = dict(known)
    for item in env:
        value = item.get("value", "")
        resolved[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: resolved.get(m.group(1), m.group(0)), value)
    return resolved


def test_the_statefulset_gang_gives_each_pod_torch_distributed_environment():
    docs = rendered("cpu-gang")
    denoiser = one(docs, "StatefulSet", "denoiser")
    env = env_of(container(denoiser))
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["WORLD_SIZE"]["value"] == str(denoiser["spec"]["replicas"]) == "2"
    assert denoiser["spec"]["podManagementPolicy"] == "Parallel"
    gateway_env = env_of(container(one(docs, "Deployment", "gateway")))
    # Rank 0 hosts the rendezvous and serves Denoise: the gateway's only denoiser address.
    assert env["MASTER_ADDR"]["value"] == host_port(gateway_env["DIFFMESH_DENOISER_ADDR"]["value"])[0]
    ports = {item["name"]: item["containerPort"] for item in container(denoiser)["ports"]}
    assert ports["rendezvous"] == int(env["MASTER_PORT"]["value"])


def test_the_leaderworkerset_maps_its_environment_onto_torch_distributed(monkeypatch):
    from services.denoiser.gang.distributed import env_rank

    docs = rendered("cuda-lws")
    assert find(docs, "StatefulSet", "denoiser") == []
    lws = one(docs, "LeaderWorkerSet", "denoiser")
    group = lws["spec"]["leaderWorkerTemplate"]
    # The workers start with the leader: it turns ready only once the whole gang has joined.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated" and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    size = group["size"]
    env = container(lws)["env"]
    for index in range(size):
        # What the LWS controller injects ahead of the container's own variables (pkg/utils/pod AddLWSVariables).
        injected = {"LWS_LEADER_ADDRESS": "denoiser-0.denoiser.ns", "LWS_GROUP_SIZE": str(size),
                    "LWS_WORKER_INDEX": str(index)}
        resolved = expand(env, injected)
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.setenv(name, resolved[name])
        assert env_rank() == (index, size, 0)
        assert resolved["MASTER_ADDR"] == "denoiser-0.denoiser.ns"
    # The leader of group 0 is pod denoiser-0 in subdomain denoiser: the name the gateway dials.
    gateway_env = env_of(container(one(docs, "Deployment", "gateway")))
    assert gateway_env["DIFFMESH_DENOISER_ADDR"]["value"] == "denoiser-0.denoiser:50062"
    assert one(docs, "Service", "denoiser")["spec"]["publishNotReadyAddresses"] is True
    # The pod is the StatefulSet gang's, GPU and all, but for where the gang's environment comes from.
    statefulset = pod_template(one(rendered("cuda-gang"), "StatefulSet", "denoiser"))
    copied = pod_template(lws)
    gang_env = {"MASTER_ADDR", "RANK", "WORLD_SIZE"}
    strip = lambda template: {**template["spec"], "containers": [  # noqa: E731
        {**c, "env": [e for e in c["env"] if e["name"] not in gang_env]} for c in template["spec"]["containers"]]}
    assert strip(copied) == strip(statefulset)


# -- compose and the image ------------------------------------------------------------------------------------


def test_compose_turns_tls_and_keys_on_binds_loopback_and_limits_resources():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("encoder", "denoiser", "decoder", "gateway"):
        assert TLS_ENV <= set(services[name]["environment"]), name
        assert services[name]["depends_on"]["tls-init"]["condition"] == "service_completed_successfully"
        limits = services[name]["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", str(limits["memory"])), name
    assert "DIFFMESH_API_KEYS" in services["gateway"]["environment"]
    assert services["gateway"]["healthcheck"]["test"][-1].startswith("https://")
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${DIFFMESH_BIND:-127.0.0.1}:"), (name, port)


def test_kubernetes_pods_mount_the_tls_secret_and_never_probe_plaintext_grpc():
    for name, workload in workloads(rendered("cpu")).items():
        spec, pod = container(workload), pod_template(workload)["spec"]
        assert TLS_ENV <= set(env_of(spec)), name
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "diffmesh-tls", name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in spec[probe], f"{name} {probe}: kubelet's gRPC probes cannot speak TLS"
            if "httpGet" in spec[probe]:
                assert spec[probe]["httpGet"]["scheme"] == "HTTPS", (name, probe)
        if name == "gateway":
            keys = env_of(spec)["DIFFMESH_API_KEYS"]
            assert keys["valueFrom"]["secretKeyRef"]["name"] == "diffmesh-api-keys"


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def matches(pattern: str, path: str) -> bool:
        # Docker's rule (Go's filepath.Match, plus `**` for any number of directories): `*` stays within one
        # directory, so `*.png` is the root's PNGs only.
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return re.fullmatch(regex.replace(r"\?", "[^/]"), path) is not None

    def ignored(path: str) -> bool:
        verdict = False
        parts = path.split("/")
        for pattern in patterns:
            negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
            # A pattern that matches a directory excludes everything in it.
            if any(matches(pattern, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                verdict = not negate
        return verdict

    for kept in ("pyproject.toml", "README.md", "proto/diffmesh/v1/tensor.proto", "tools/gen_protos.py",
                 "diffmesh/v1/gateway_pb2.py", "diffmesh/cli.py", "services/gateway/server.py",
                 "deploy/docker/healthcheck.py"):
        assert (ROOT / kept).exists() and not ignored(kept), kept
    for dropped in (".git/config", "services/gateway/__pycache__/server.cpython-311.pyc", "diffmesh.egg-info/PKG-INFO",
                    ".venv/bin/python", "tests/unit/test_deploy_files.py", "bench/results/run.json", "out.png",
                    "services/x/cat.png", "deploy/k8s/base/gateway.yaml"):
        assert ignored(dropped), dropped
