"""The Kubernetes manifests under deploy/k8s as a cluster would receive them: rendered by kustomize, validated
strictly, unknown fields rejected: the core kinds against kubernetes-validate's bundled schemas, the Prometheus
Operator's and cert-manager's kinds against the pydantic models generated from their CRDs
(cloudcoil-models-prometheus-operator, cloudcoil-models-cert-manager), the LeaderWorkerSet against our own schema
in deploy/k8s/schemas (no package carries its CRD).

Used by tests/unit/test_deploy_files.py (every overlay renders and validates; the pieces agree with the code) and
tests/integration/test_hosts.py (which runs the rendered pods).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import jsonschema
import pydantic
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").is_file())
# The one Kubernetes version the manifests are validated against (the newest that every kubernetes-validate in
# the dev extras' range bundles). They need >= 1.28 (the StatefulSet pod-index label); 1.32 has every field they use.
KUBERNETES_VERSION = "1.32"
CORE_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
# apiVersion/kind -> (module, class) of the pydantic model generated from the kind's CRD.
CRD_MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("cloudcoil.models.prometheus_operator.v1", "PodMonitor"),
    ("cert-manager.io/v1", "Certificate"): ("cloudcoil.models.cert_manager.v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"): ("cloudcoil.models.cert_manager.v1", "Issuer"),
}
# apiVersion/kind -> our JSON schema in deploy/k8s/schemas (its README says what it covers).
JSON_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.schema.json",
}


def kustomize_command() -> list[str]:
    """`kubectl kustomize` (the machines' image ships kubectl), else a standalone `kustomize build`."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise RuntimeError("neither kubectl nor kustomize is installed: install one to render deploy/k8s")


@functools.lru_cache(maxsize=None)
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The objects of overlays/`overlay`, with components/`components` added after the overlay's own (as a user's
    kustomization would add them, recommended-labels last)."""
    if not components:
        target = K8S / "overlays" / overlay
        return _build(target)
    with tempfile.TemporaryDirectory(prefix="diffmesh-kustomize-") as tmp:
        # kustomize takes relative paths only, and loads directories outside its root (not files).
        relative = os.path.relpath(K8S, tmp)
        listed = [f"  - {relative}/components/{name}" for name in (*components, "recommended-labels")]
        pathlib.Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {relative}/overlays/{overlay}\ncomponents:\n" + "\n".join(listed) + "\n")
        return _build(pathlib.Path(tmp))


def _build(target: pathlib.Path) -> tuple[dict, ...]:
    result = subprocess.run([*kustomize_command(), str(target)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed on {target}:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict, ...] | list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]


def one(docs: tuple[dict, ...] | list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_template(workload: dict) -> dict:
    if workload["kind"] == "LeaderWorkerSet":
        return workload["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return workload["spec"]["template"]


def container(workload: dict, name: str | None = None) -> dict:
    containers = pod_template(workload)["spec"]["containers"]
    name = name or workload["metadata"]["name"]
    return next(c for c in containers if c["name"] == name)


def env_of(container_spec: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container_spec.get("env", [])}


# -- validation ------------------------------------------------------------------------------------------------


def _core_file(kind: str, api_version: str) -> str:
    # kubernetes-validate's layout: apps/v1 -> apps-v1, networking.k8s.io/v1 -> networking-v1, v1 -> v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/{kind.lower()}-{group_version}.json"


@functools.lru_cache(maxsize=None)
def _registry() -> referencing.Registry:
    definitions = schema_contents(f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/_definitions.json",
                                  KUBERNETES_VERSION)
    return referencing.Registry().with_resource(CORE_DEFINITIONS, referencing.Resource.from_contents(definitions))


@functools.lru_cache(maxsize=None)
def _json_schema_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """The core kinds' strict schema (kubernetes-validate), or ours for the LeaderWorkerSet."""
    ours = JSON_SCHEMAS.get((api_version, kind))
    if ours is not None:
        schema = json.loads((K8S / "schemas" / ours).read_text())
    else:
        try:
            schema = schema_contents(_core_file(kind, api_version), KUBERNETES_VERSION)
        except FileNotFoundError:
            raise LookupError(f"no schema for {api_version} {kind} (Kubernetes {KUBERNETES_VERSION}): add its "
                              f"model to CRD_MODELS or a schema to deploy/k8s/schemas") from None
    return jsonschema.Draft202012Validator(schema, registry=_registry())


@functools.lru_cache(maxsize=None)
def _model(api_version: str, kind: str):
    module, name = CRD_MODELS[(api_version, kind)]
    return getattr(importlib.import_module(module), name)


def load_crd_models() -> None:
    """Import the CRD models now (the Prometheus Operator's take seconds to build), e.g. while kustomize runs."""
    for api_version, kind in CRD_MODELS:
        _model(api_version, kind)


def _dropped(given, kept, path: tuple = ()) -> list[tuple]:
    """Paths in `given` that are missing from `kept`: what a model read past without an error."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [found for key, value in given.items()
                for found in ([(*path, key)] if key not in kept else _dropped(value, kept[key], (*path, key)))]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [found for index, (a, b) in enumerate(zip(given, kept)) for found in _dropped(a, b, (*path, index))]
    return [] if given == kept else [path]


def _model_errors(doc: dict) -> list[tuple[tuple, str]]:
    """A custom resource against the pydantic model generated from its CRD, as strictly as the API server's
    strict field validation: JSON in, no coercion (`strict`), unknown fields rejected (`extra="forbid"`), only
    the API's camelCase names (`by_name=False`). Pydantic still reads a key spelt as a field's Python name
    (`dns_names`) without using it, so the object is also dumped back and any key it lost is an error."""
    model = _model(doc["apiVersion"], doc["kind"])
    text = json.dumps(doc)
    try:
        parsed = model.model_validate_json(text, strict=True, extra="forbid", by_alias=True, by_name=False)
    except pydantic.ValidationError as error:
        return [(tuple(item["loc"]), item["msg"]) for item in error.errors()]
    kept = json.loads(parsed.model_dump_json(by_alias=True, exclude_unset=True))
    return [(path, "not kept by the model: not a field of the API") for path in _dropped(json.loads(text), kept)]


def validation_errors(doc: dict) -> list[str]:
    """What is wrong with `doc` against its kind's schema (empty: valid)."""
    where = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
    if (doc["apiVersion"], doc["kind"]) in CRD_MODELS:
        errors = _model_errors(doc)
    else:
        validator = _json_schema_validator(doc["apiVersion"], doc["kind"])
        errors = [(tuple(error.absolute_path), error.message) for error in validator.iter_errors(doc)]
    return [f"{where}: {'.'.join(str(p) for p in path)}: {message}" for path, message in errors]
