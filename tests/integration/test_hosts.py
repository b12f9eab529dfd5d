"""Several hosts, for real: the pods of deploy/k8s/overlays/cpu-gang, each in its own Linux network namespace with
its own address, started from the rendered manifests as a kubelet would start them.

The test is the cluster: it renders the overlay with kustomize, gives every pod a network namespace joined to one
bridge (a veth pair each; the bridge lives in a namespace of its own, so nothing is added to the host's network),
an /etc/hosts in which the pod names resolve as the headless Services make them resolve (encoder-1.encoder, ...)
and the pod's hostname resolves to its own address (as in a pod), the volumes the pod spec names (the TLS Secret
from a development CA, the gateway's ConfigMap, emptyDirs), and its container's args and env (the pod index,
the API key Secret). Each process is `diffmesh <args>`, the container's command with only the mount paths mapped
into a temporary directory and a 2 s `--grace` added (a quick teardown). Probes run as the manifests define them.
The gateway reaches the stages only through the addresses its env names, across the bridge:

  - a generation through the gateway succeeds;
  - two encoder replicas (the StatefulSet scaled to 2, as its HPA would) in two namespaces share the load;
  - the denoiser gang's two ranks, in two namespaces, form through MASTER_ADDR/MASTER_PORT (rank 0's rendezvous
    on its own address only) and serve the generations.

One set of pods for the module, the fewest the checks need (two encoders, two ranks, a decoder, the gateway),
started together; a mesh start costs about half a minute. Namespaces, veths and the per-namespace /etc files are
removed afterwards. Skipped, saying why, only where network namespaces cannot be made.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tests.k8s_manifests import ROOT, container, env_of, find, one, pod_template, render

pytestmark = pytest.mark.slow

OVERLAY = "cpu-gang"
# Inside the test's own namespaces only: no host interface gets an address in it, and no namespace has a route
# beyond it (so nothing here can send a packet off this machine).
SUBNET = "10.213.7"
START_TIMEOUT_S = 300
# Appended to every pod's command, the one change to it: a 2 s drain on SIGTERM instead of 30, so the module's
# teardown is quick (nothing is in flight then; draining is tested in tests/integration/test_failover.py).
GRACE_ARGS = ("--grace", "2")
API_KEY = "hosts-test-key"
ENCODER_REPLICAS = 2
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
IP = shutil.which("ip") or "/usr/sbin/ip"


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if not os.path.exists(IP):
        return "iproute2's `ip` is not installed (scripts/setup.sh installs it with apt)"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"dmprobe{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, text=True)


class Lan:
    """Hosts (network namespaces) on one bridge, which sits in a namespace of its own."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}       # host name -> address
        self.switch = self._namespace("lan")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def _namespace(self, name: str) -> str:
        namespace = f"{self.tag}-{name}"
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def add_host(self, name: str) -> str:
        """A namespace with eth0 on the bridge and the next address; returns the namespace."""
        number = len(self.addresses) + 1
        namespace = self._namespace(name)
        inside, outside = f"{self.tag}i{number}", f"{self.tag}o{number}"
        ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        ip("link", "set", inside, "netns", namespace)
        ip("link", "set", outside, "netns", self.switch)
        ip("-n", namespace, "link", "set", inside, "name", "eth0")
        ip("-n", namespace, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", self.switch, "link", "set", outside, "master", "br0")
        ip("-n", self.switch, "link", "set", outside, "up")
        self.addresses[name] = f"{SUBNET}.{number}"
        return namespace

    def write_names(self, names: dict[str, str]) -> None:
        """Every host's /etc/hosts (`ip netns exec` binds /etc/netns/NS/* over /etc/*): `names` (DNS name ->
        host), and this machine's hostname as the host's own address, as a pod's /etc/hosts has it. No resolver
        beyond that: a name that is not listed does not resolve (a pod the HPA has not made)."""
        for host, address in self.addresses.items():
            etc = pathlib.Path("/etc/netns") / f"{self.tag}-{host}"
            etc.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost", f"{address} {socket.gethostname()}"]
            lines += [f"{self.addresses[target]} {name}" for name, target in names.items()]
            (etc / "hosts").write_text("\n".join(lines) + "\n")
            (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")

    def close(self) -> None:
        for namespace in reversed(self.namespaces):     # a namespace's veth ends go with it
            subprocess.run([IP, "netns", "del", namespace], capture_output=True)
            shutil.rmtree(pathlib.Path("/etc/netns") / namespace, ignore_errors=True)
        with_netns = pathlib.Path("/etc/netns")
        if with_netns.is_dir() and not any(with_netns.iterdir()):
            with_netns.rmdir()


@dataclasses.dataclass
class Pod:
    name: str                   # encoder-1, denoiser-0, gateway
    workload: dict
    index: int
    namespace: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    argv: list[str] = dataclasses.field(default_factory=list)
    mounts: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    process: subprocess.Popen | None = None
    log: pathlib.Path | None = None

    @property
    def container(self) -> dict:
        return container(self.workload)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def exec_in(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([IP, "netns", "exec", self.namespace, *argv], env=self.env, capture_output=True,
                              text=True, timeout=timeout)


class Kubelet:
    """Turns a rendered pod template into a process in the pod's namespace: volumes, env, args."""

    def __init__(self, root: pathlib.Path, docs: tuple[dict, ...], model_dir: pathlib.Path) -> None:
        self.root = root
        self.docs = docs
        self.model_dir = model_dir
        self.tls = root / "tls-secret"
        ca = make_dev_ca_for(root / "dev-ca", docs)
        self.tls.mkdir()
        # The diffmesh-tls Secret's keys, as cert-manager or `kubectl create secret` make them.
        for key, source in (("tls.crt", ca.server_cert), ("tls.key", ca.server_key), ("ca.crt", ca.ca)):
            shutil.copy(source, self.tls / key)

    def prepare(self, pod: Pod) -> None:
        spec = pod_template(pod.workload)["spec"]
        home = self.root / pod.name
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if mount["mountPath"] == "/dev/shm":           # the host's /dev/shm serves as the pod's
                continue
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "diffmesh-tls", volume
                path = self.tls
            elif "configMap" in volume:
                config_map = one(self.docs, "ConfigMap", volume["configMap"]["name"])
                path = home / mount["name"]
                path.mkdir(parents=True)
                for key, text in config_map["data"].items():
                    (path / key).write_text(text)
            else:                                          # emptyDir, or the gateway's claim
                assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
                path = home / mount["name"]
                path.mkdir(parents=True)
            pod.mounts[mount["mountPath"]] = path
        # The image's environment (deploy/docker/Dockerfile), then the container's, in order, with $(VAR) references
        # expanded as Kubernetes does.
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "DIFFMESH_MODEL": str(self.model_dir), "DIFFMESH_HOME": str(home / "diffmesh")}
        env.update({key: value for key, value in os.environ.items() if key.startswith("OPENBLAS_")})
        for item in pod.container.get("env", []):
            if "value" in item:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            else:
                value = self.value_from(pod, item["valueFrom"])
            env[item["name"]] = self.mapped(pod, value)
        pod.env = env
        pod.argv = [sys.executable, "-m", "diffmesh.cli", *(self.mapped(pod, arg) for arg in pod.container["args"]),
                    *GRACE_ARGS]

    def value_from(self, pod: Pod, source: dict) -> str:
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {"metadata.labels['apps.kubernetes.io/pod-index']": str(pod.index), "metadata.name": pod.name}
            return values[field]
        secret = source["secretKeyRef"]
        assert (secret["name"], secret["key"]) == ("diffmesh-api-keys", "keys"), secret
        return API_KEY

    @staticmethod
    def mapped(pod: Pod, value: str) -> str:
        for mount_path in sorted(pod.mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(pod.mounts[mount_path]) + value[len(mount_path):]
        return value

    @staticmethod
    def start(pod: Pod) -> None:
        pod.log = pathlib.Path(pod.mounts.get("/tmp", pathlib.Path(tempfile.gettempdir()))) / "log.txt"
        with open(pod.log, "w") as log:
            pod.process = subprocess.Popen([IP, "netns", "exec", pod.namespace, *pod.argv], env=pod.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def probe(pod: Pod, name: str) -> bool:
        """Run the pod's exec probe `name` (diffmesh-healthcheck is deploy/docker/healthcheck.py in the image)."""
        command = pod.container[name]["exec"]["command"]
        assert command[0] == "diffmesh-healthcheck"
        return pod.exec_in([sys.executable, str(HEALTHCHECK), *command[1:]]).returncode == 0


def make_dev_ca_for(directory: pathlib.Path, docs: tuple[dict, ...]):
    """A development CA whose certificate names every address the gateway dials (the manifests' own list)."""
    from services.common.devca import make_dev_ca

    gateway_env = env_of(container(one(docs, "Deployment", "gateway")))
    names = {"gateway"}
    for stage in ("encoder", "denoiser", "decoder"):
        names |= {address.rpartition(":")[0] for address in gateway_env[f"DIFFMESH_{stage.upper()}_ADDR"]["value"]
                  .split(",")}
    return make_dev_ca(directory, sorted(names))


# The client: runs in a namespace of its own (or the gateway's), prints one JSON object.
CLIENT = textwrap.dedent('''
    import json, socket, sys
    import httpx
    action, ca, key = sys.argv[1], sys.argv[2], sys.argv[3]
    out = {}
    if action == "health":
        # As kubelet's readiness probe: HTTPS, certificate not verified.
        try:
            out["status"] = httpx.get("https://gateway:8000/health", verify=False, timeout=10).status_code
        except httpx.HTTPError as error:
            out["status"] = repr(error)
    elif action == "generate":
        with httpx.Client(verify=ca, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            out["responses"] = []
            for seed in range(int(sys.argv[4])):
                reply = client.post("https://gateway:8000/v1/images/generations", json={
                    "prompt": f"a lighthouse on host {seed}", "size": "32x32", "num_inference_steps": 2,
                    "seed": seed, "response_format": "b64_json"})
                body = reply.json()
                out["responses"].append({"status": reply.status_code, "images": [
                    item.get("b64_json", "")[:8] for item in body.get("data", [])], "error": body.get("error")})
    elif action == "metrics":
        out["texts"] = [httpx.get(url, timeout=10).text for url in sys.argv[4:]]
    elif action == "connect":
        out["connected"] = {}
        for port in sys.argv[4:]:
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()
                out["connected"][port] = True
            except OSError as error:
                out["connected"][port] = str(error)
    print(json.dumps(out))
''')


@dataclasses.dataclass
class Cluster:
    lan: Lan
    pods: dict[str, Pod]
    client_namespace: str
    root: pathlib.Path
    ca: pathlib.Path

    def client(self, action: str, *args: str, namespace: str | None = None, timeout: float = 300) -> dict:
        result = subprocess.run([IP, "netns", "exec", namespace or self.client_namespace, sys.executable, "-c",
                                 CLIENT, action, str(self.ca), API_KEY, *args],
                                capture_output=True, text=True, timeout=timeout,
                                env={"PATH": os.environ["PATH"], "HOME": str(self.root)})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    def logs(self, tail: int = 30) -> str:
        return "\n".join(f"--- {name}\n" + "\n".join(pod.log_text().splitlines()[-tail:])
                         for name, pod in self.pods.items())


# What a server logs once its drain is over (services/common/server.py run_server).
STOPPED_LINE = "services.common.server: stopped"


def stop(pods: list[Pod]) -> None:
    """SIGTERM every pod at once (they drain in parallel, for at most their 2 s --grace), and SIGKILL each as soon
    as it has exited or logged that its server stopped: what is left then is the interpreter's final garbage
    collection of torch's heap, seconds of CPU on a loaded machine for nothing (nothing is asserted about it)."""
    for pod in pods:
        if pod.process is not None and pod.process.poll() is None:
            os.killpg(pod.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + float(GRACE_ARGS[1]) + 3
    pending = [pod for pod in pods if pod.process is not None]
    while pending and time.monotonic() < deadline:
        pending = [pod for pod in pending if pod.process.poll() is None and STOPPED_LINE not in pod.log_text()]
        time.sleep(0.1)
    for pod in pods:
        if pod.process is not None and pod.process.poll() is None:
            os.killpg(pod.process.pid, signal.SIGKILL)
            pod.process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"several hosts need network namespaces: {reason}")
    started = time.monotonic()
    docs = render(OVERLAY)
    root = tmp_path_factory.mktemp("hosts")
    kubelet = Kubelet(root, docs, model_dir)

    # The pods the cluster would run: each StatefulSet's replicas (the encoder's as its HPA scaled it), the gateway.
    pods: dict[str, Pod] = {}
    for workload in find(docs, "StatefulSet"):
        name = workload["metadata"]["name"]
        replicas = ENCODER_REPLICAS if name == "encoder" else workload["spec"]["replicas"]
        for index in range(replicas):
            pods[f"{name}-{index}"] = Pod(f"{name}-{index}", workload, index)
    pods["gateway"] = Pod("gateway", one(docs, "Deployment", "gateway"), 0)

    lan = Lan(f"dmt{os.getpid() % 100000}")
    try:
        for pod in pods.values():
            pod.namespace = lan.add_host(pod.name)
        client_namespace = lan.add_host("client")
        # The headless Services' per-pod names, and the gateway Service's.
        names = {f"{pod.name}.{pod.workload['metadata']['name']}": pod.name for pod in pods.values()
                 if pod.workload["kind"] == "StatefulSet"}
        names["gateway"] = "gateway"
        lan.write_names(names)
        for pod in pods.values():
            kubelet.prepare(pod)
            kubelet.start(pod)
        running = Cluster(lan, pods, client_namespace, root, kubelet.tls / "ca.crt")
        wait_ready(running, kubelet, started)
        print(f"\nhosts: {len(pods)} pods in {len(lan.namespaces)} namespaces ready in "
              f"{time.monotonic() - started:.1f}s")
        yield running
    finally:
        stopping = time.monotonic()
        stop(list(pods.values()))
        lan.close()
        print(f"\nhosts: teardown {time.monotonic() - stopping:.1f}s, module {time.monotonic() - started:.1f}s")


def wait_ready(cluster: Cluster, kubelet: Kubelet, started: float) -> None:
    """Until every stage pod passes its readiness probe and the gateway's /health (its readiness) is 200. A pod is
    probed only once its port listens (`ss` in its namespace, which starts no Python): the probes and the client
    are Python processes that would otherwise compete with the pods' own start for the CPU."""
    waiting = {name for name in cluster.pods if name != "gateway"}
    while True:
        for name, pod in cluster.pods.items():
            if pod.process.poll() is not None:
                raise RuntimeError(f"pod {name} exited with {pod.process.returncode}:\n{cluster.logs(60)}")
        for name in sorted(waiting):
            pod = cluster.pods[name]
            if listens_on(pod, "grpc") and kubelet.probe(pod, "readinessProbe"):
                waiting.discard(name)
        if not waiting and listens_on(cluster.pods["gateway"], "http") and cluster.client("health")["status"] == 200:
            return
        if time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"not ready after {START_TIMEOUT_S}s: {sorted(waiting) or 'gateway'}\n"
                               f"{cluster.logs(60)}")
        time.sleep(0.5)


def listens_on(pod: Pod, port_name: str) -> bool:
    """Whether the pod's container port `port_name` (from the manifest) is listening in its namespace."""
    port = next(str(item["containerPort"]) for item in pod.container["ports"] if item["name"] == port_name)
    return any(listened == port for _, listened in listening(pod))


def endpoint(text: str) -> tuple[str, str]:
    """ss's ADDRESS:PORT as (IPv4 address, port); an IPv4-mapped IPv6 address ([::ffff:a.b.c.d]) as its IPv4."""
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]")) if host not in ("*", "0.0.0.0", "[::]") else None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address or host), port


def established_peers(pod: Pod) -> set[str]:
    """The remote addresses of the pod's established TCP connections, as its namespace sees them."""
    listing = pod.exec_in(["ss", "-Htn", "state", "established"]).stdout
    return {endpoint(line.split()[-1])[0] for line in listing.splitlines() if line.strip()}


def listening(pod: Pod) -> set[tuple[str, str]]:
    listing = pod.exec_in(["ss", "-Htln"]).stdout
    return {endpoint(line.split()[3]) for line in listing.splitlines() if line.strip()}


def test_a_generation_crosses_the_hosts_and_two_encoder_replicas_share_the_load(cluster):
    encoders = [cluster.pods[f"encoder-{index}"] for index in range(ENCODER_REPLICAS)]
    before = [pod.log_text().count("Encode called") for pod in encoders]
    replies = cluster.client("generate", "4")["responses"]
    assert [reply["status"] for reply in replies] == [200] * 4, replies
    # A PNG, base64: iVBORw0K is the signature.
    assert all(reply["images"] == ["iVBORw0K"] for reply in replies), replies
    served = [pod.log_text().count("Encode called") - count for pod, count in zip(encoders, before)]
    assert sum(served) == 4 and min(served) >= 1, f"Encode calls per replica: {served}\n{cluster.logs()}"
    # Each encoder's own metrics endpoint (DIFFMESH_METRICS_PORT from the manifest) answers across the bridge.
    texts = cluster.client("metrics", *(f"http://{pod.name}.encoder:9464/metrics" for pod in encoders))["texts"]
    assert len(texts) == ENCODER_REPLICAS and all("diffmesh_" in text for text in texts)


def test_the_gang_spans_two_namespaces_through_master_addr(cluster):
    leader, worker = cluster.pods["denoiser-0"], cluster.pods["denoiser-1"]
    leader_address = cluster.lan.addresses["denoiser-0"]
    assert leader.env["MASTER_ADDR"] == "denoiser-0.denoiser" and worker.env["RANK"] == "1"
    assert "gang rank 0 of 2" in leader.log_text()
    # Rank 0's rendezvous listens on its own address only (MASTER_ADDR resolved), not on every interface.
    assert (leader_address, leader.env["MASTER_PORT"]) in listening(leader)
    # The worker holds connections to the leader's address: the rendezvous and the collectives cross the bridge.
    assert leader_address in established_peers(worker)
    # Both ranks answer their probes: a worker reports SERVING only once the gang has formed.
    assert Kubelet.probe(worker, "readinessProbe") and Kubelet.probe(leader, "livenessProbe")
    # And the gang serves: a generation goes through it.
    replies = cluster.client("generate", "1")["responses"]
    assert replies[0]["status"] == 200, replies


def test_the_gateway_reaches_the_stages_only_through_their_addresses(cluster):
    gateway = cluster.pods["gateway"]
    # Nothing listens on the gateway host's loopback: the stages are on other hosts.
    connected = cluster.client("connect", "50061", "50062", "50063", namespace=gateway.namespace)["connected"]
    assert all(result is not True for result in connected.values()), connected
    # It is connected to every stage pod its env names that exists (encoder-2 and -3, decoder-1 to -3 do not: the
    # autoscalers have not made them), at that pod's address.
    dialed = {address.rpartition(":")[0].split(".")[0] for stage in ("ENCODER", "DENOISER", "DECODER")
              for address in gateway.env[f"DIFFMESH_{stage}_ADDR"].split(",")}
    expected = {cluster.lan.addresses[name] for name in dialed if name in cluster.pods}
    assert len(expected) == ENCODER_REPLICAS + 2
    peers = established_peers(gateway)
    assert expected <= peers, f"gateway connected to {sorted(peers)}, expected {sorted(expected)}"
