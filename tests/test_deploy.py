"""Deployment assets: compose, Kubernetes, Prometheus files against the server's real settings, the
Redis Cluster init script on real redis-server processes, and the local cluster demo end to end.

Ports, setting names and metric names are read from ``kvstore.config`` / ``kvstore.metrics``, so a
renamed flag or metric fails here instead of in a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore.config import ENV_PREFIX, ServerConfig, load_config
from kvstore.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
RUNBOOK = ROOT / "docs" / "operator-runbook.md"
FIELDS = set(ServerConfig.__dataclass_fields__)


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


DEFAULT_GRPC_PORT = _port(ServerConfig().listen)


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _exported_metric_names() -> set[str]:
    """Every sample name the server exports (``kvstream_requests_total``, ``..._bucket``, ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def _env_settings(env: dict[str, str]) -> dict[str, str]:
    """The ``KVSTREAM_*`` settings of an environment block; each must name a ServerConfig field."""
    out = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name not in ("KVSTREAM_CONFIG", "KVSTREAM_DATA"):
            field = name.removeprefix(ENV_PREFIX).lower()
            assert field in FIELDS, f"{name} is not a server setting (fields: {sorted(FIELDS)})"
            out[name] = str(value)
    return out


# ----- every file parses ----------------------------------------------------------------------------


def test_every_yaml_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(files) >= 8
    for path in files:
        assert _docs(path), f"{path} is empty"


def test_shell_scripts_parse() -> None:
    for script in sorted((K8S / "config").glob("*.sh")):
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"


def test_redis_conf_keeps_pinned_keys() -> None:
    conf = dict(
        line.split(None, 1)
        for line in (K8S / "config" / "redis.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert conf["maxmemory-policy"] == "volatile-lru"  # pinned keys have no TTL: never evicted
    assert conf["cluster-enabled"] == "yes"
    assert conf["cluster-config-file"].startswith("/data/")


# ----- docker compose -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _docs(COMPOSE)[0]
    assert isinstance(doc, dict)
    return doc


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = [f"redis-{i}" for i in range(6)]
    front_ends = [f"kvstream-{i}" for i in (1, 2, 3)]
    assert set(services) == {*redis, "cluster-init", *front_ends, "prometheus"}
    volumes = set()
    for name in redis:
        svc = services[name]
        assert svc["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
        assert svc["hostname"] == name
        (volume,) = svc["volumes"]
        assert volume.endswith(":/data")
        volumes.add(volume.split(":")[0])
    assert len(volumes) == 6 and volumes <= set(compose["volumes"])
    init = services["cluster-init"]
    assert init["depends_on"] == {n: {"condition": "service_healthy"} for n in redis}
    assert init["environment"]["NODES"].split() == redis
    assert init["restart"] == "no"
    for name in front_ends:
        deps = services[name]["depends_on"]
        assert deps["cluster-init"]["condition"] == "service_completed_successfully"
    assert set(services["prometheus"]["depends_on"]) == set(front_ends)
    for cfg in compose["configs"].values():
        assert (COMPOSE.parent / cfg["file"]).is_file(), cfg["file"]
    dockerfile = COMPOSE.parent.parent.parent / services["kvstream-1"]["build"]["dockerfile"]
    assert dockerfile == ROOT / "deploy" / "compose" / "Dockerfile" and dockerfile.is_file()


def test_compose_front_ends_match_server_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    host_ports = set()
    for name in ("kvstream-1", "kvstream-2", "kvstream-3"):
        svc = services[name]
        env = _env_settings(svc["environment"])
        config = load_config(env=env)  # validates every value like the server does
        assert config.backend == "redis+cluster://" + ",".join(f"redis-{i}:6379" for i in range(6))
        assert _port(config.listen) == DEFAULT_GRPC_PORT and config.listen.startswith("0.0.0.0:")
        assert config.metrics_port > 0 and config.metrics_addr == "0.0.0.0"
        (mapping,) = svc["ports"]
        host, container = mapping.split(":")
        assert int(container) == DEFAULT_GRPC_PORT
        host_ports.add(int(host))
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{DEFAULT_GRPC_PORT}" in probe and "HealthStub" in probe
    assert len(host_ports) == 3
    # The Dockerfile exposes the same ports and pins the CPU build of torch.
    dockerfile = (DEPLOY / "compose" / "Dockerfile").read_text()
    assert set(re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()) == {  # type: ignore[union-attr]
        str(DEFAULT_GRPC_PORT),
        str(config.metrics_port),
    }
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.index("torch==2.13.0") < dockerfile.index("pip install .")


# ----- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_scrapes_every_front_end(compose: dict[str, Any]) -> None:
    prom = _docs(PROMETHEUS / "prometheus.yml")[0]
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "kvstream"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, svc in compose["services"].items():
        if name.startswith("kvstream-"):
            metrics_port = load_config(env=_env_settings(svc["environment"])).metrics_port
            expected.add(f"{svc['hostname']}:{metrics_port}")
    assert targets == expected
    mounted = {c["target"] for c in compose["services"]["prometheus"]["configs"]}
    assert set(prom["rule_files"]) <= mounted


def test_alerted_counters_exist_at_zero_from_the_start() -> None:
    # increase()/rate() take a series' first sample as its baseline: one born at 1 never alerts.
    registry = Metrics().registry
    for name, label, values in (
        ("kvstream_corrupt_records_total", "kind", ("chunk", "chunk_record", "manifest", "context_info")),
        ("kvstream_streams_truncated_total", "reason", ("deadline", "missing_or_corrupt")),
        ("kvstream_rejected_total", "reason", ("data_streams", "buffered_puts", "namespace_busy")),
    ):
        for value in values:
            assert registry.get_sample_value(name, {label: value}) == 0.0, (name, value)


def test_alerts_and_runbook_use_exported_metrics() -> None:
    exported = _exported_metric_names()
    rules = [r for g in _docs(PROMETHEUS / "alerts.yml")[0]["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    used = set()
    for rule in rules:
        assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
        used |= set(re.findall(r"kvstream_[a-z_]+", rule["expr"]))
    used |= set(re.findall(r"kvstream_[a-z_]+", RUNBOOK.read_text()))
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"


# ----- Kubernetes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Objects of the kustomization's resources, by (kind, name)."""
    kust = _docs(K8S / "kustomization.yaml")[0]
    objs = {}
    for res in kust["resources"]:
        for doc in _docs(K8S / res):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{res}: {doc}"
            assert doc["metadata"]["name"]
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


def test_k8s_workloads(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    workloads = [o for (kind, _), o in k8s.items() if kind in ("Deployment", "StatefulSet", "Job")]
    assert len(workloads) == 3
    for w in workloads:
        if w["kind"] != "Job":
            assert _selects(w["spec"]["selector"]["matchLabels"], w)
        for c in _containers(w):
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
    # Every Service and PDB selects a workload, and Service target ports are named container ports.
    for (kind, name), obj in k8s.items():
        if kind not in ("Service", "PodDisruptionBudget"):
            continue
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        (target,) = [w for w in workloads if w["kind"] != "Job" and _selects(sel, w)]
        if kind == "Service":
            ports = {p["name"]: p["containerPort"] for c in _containers(target) for p in c["ports"]}
            for p in obj["spec"]["ports"]:
                assert p["targetPort"] in ports, f"Service {name}: no container port {p['targetPort']}"
                assert p["port"] == ports[p["targetPort"]]


def test_k8s_redis_cluster(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    sts = k8s[("StatefulSet", "redis-cluster")]
    assert sts["spec"]["replicas"] == 6
    headless = k8s[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    pods = [f"redis-cluster-{i}.{headless['metadata']['name']}" for i in range(6)]
    job = k8s[("Job", "redis-cluster-init")]
    env = {e["name"]: e.get("value") for e in _containers(job)[0]["env"]}
    assert env["NODES"].split() == pods and env["REPLICAS"] == "1"
    backend = {e["name"]: e.get("value") for e in _containers(k8s[("Deployment", "kvstream")])[0]["env"]}
    assert backend["KVSTREAM_BACKEND"] == "redis+cluster://" + ",".join(f"{p}:6379" for p in pods)
    assert k8s[("PodDisruptionBudget", "redis-cluster")]["spec"]["maxUnavailable"] == 1


def test_k8s_front_ends_match_server_settings(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    dep = k8s[("Deployment", "kvstream")]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    (c,) = _containers(dep)
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # KVSTREAM_CONFIG points into the mounted ConfigMap, generated from config/kvstream.yaml.
    (cfg_volume,) = [n for n, path in mounts.items() if env["KVSTREAM_CONFIG"].startswith(path + "/")]
    generators = {g["name"]: g["files"] for g in _docs(K8S / "kustomization.yaml")[0]["configMapGenerator"]}
    files = generators[volumes[cfg_volume]["configMap"]["name"]]
    assert Path(env["KVSTREAM_CONFIG"]).name in {Path(f).name for f in files}
    config_file = K8S / next(f for f in files if Path(f).name == Path(env["KVSTREAM_CONFIG"]).name)
    config = load_config(config_file, env=_env_settings(env))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == _port(config.listen) and config.listen.startswith("0.0.0.0:")
    assert ports["metrics"] == config.metrics_port and config.metrics_addr == "0.0.0.0"
    # Only readiness follows the backend (gRPC health): a pod must not be restarted for a Redis outage.
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] in ("grpc", ports["grpc"]), probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    # In-flight RPCs get grace_seconds after the preStop sleep, inside the pod's termination grace.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + config.grace_seconds < pod["spec"]["terminationGracePeriodSeconds"]
    assert k8s[("PodDisruptionBudget", "kvstream")]["spec"]["minAvailable"] < dep["spec"]["replicas"]
    monitor = _docs(K8S / "servicemonitor.yaml")[0]
    service = k8s[("Service", "kvstream")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # Every configMap volume is one the kustomization generates.
    for w in (dep, k8s[("StatefulSet", "redis-cluster")], k8s[("Job", "redis-cluster-init")]):
        for v in w["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in v:
                assert v["configMap"]["name"] in generators


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders() -> None:
    res = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == 3 and "StatefulSet" in kinds and "Deployment" in kinds
    maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for d in docs:
        assert d["metadata"].get("namespace", "kvstream") == "kvstream"
        for v in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in maps  # hashed names rewritten consistently


# ----- real processes -------------------------------------------------------------------------------


def _alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line contains ``marker`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker in cmdline


def _assert_all_gone(state: dict[str, Any]) -> None:
    for node in state["redis_nodes"]:
        assert not _alive(node["pid"], str(node["port"])), f"redis-server {node} still running"
    for fe in state["front_ends"]:
        assert not _alive(fe["pid"], fe["address"]), f"kvstore serve {fe} still running"


def test_redis_cluster_init_script(redis_bin: str) -> None:
    """The compose/k8s init script forms a 3+3 cluster on real nodes, and a second run is a no-op."""
    from deploy.redis_cluster import _cluster_ready, start_server

    nodes = [start_server(cluster=True) for _ in range(6)]
    try:
        env = {**os.environ, "NODES": " ".join(f"127.0.0.1:{n.port}" for n in nodes), "REPLICAS": "1"}
        script = str(K8S / "config" / "redis-cluster-init.sh")
        first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert _cluster_ready(nodes, 3) is None
        again = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already formed" in again.stdout
    finally:
        for n in nodes:
            n.stop()


def _demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "demo.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cluster_demo", "--front-ends", "2", "--json", str(out), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its redis-servers and front ends share this process group
    )
    return proc, out


def _stop_demo(proc: subprocess.Popen[str]) -> None:
    """After a failed assertion: let the demo shut its children down, else kill its whole group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_cluster_demo_smoke(redis_bin: str, tmp_path: Path) -> None:
    proc, out = _demo(tmp_path)
    try:
        log, _ = proc.communicate(timeout=120)
    finally:
        _stop_demo(proc)
    assert proc.returncode == 0, log
    assert "smoke OK" in log and "identical bytes" in log
    ready = re.findall(r"front end \d: grpc 127\.0\.0\.1:\d+ +metrics http://\S+/metrics +SERVING", log)
    assert len(ready) == 2
    state = json.loads(out.read_text())
    assert state["exit_code"] == 0 and state["front_end_exit_codes"] == [0, 0]
    assert len(state["redis_nodes"]) == 6
    _assert_all_gone(state)


def test_cluster_demo_stops_on_sigterm(redis_bin: str, tmp_path: Path) -> None:
    proc, out = _demo(tmp_path, "--no-smoke", "--seconds", "300")
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        lines = []
        # "running for" comes once every front end is SERVING and the demo is holding (exit 0 on a signal);
        # a signal before that is an interrupted start (130).
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("running for") or time.monotonic() > deadline:
                break
        assert any(line.startswith("running for") for line in lines), "".join(lines)
        state = json.loads(out.read_text())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        _stop_demo(proc)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "interrupted: stopping" in rest
    _assert_all_gone(state)
    assert json.loads(out.read_text())["front_end_exit_codes"] == [0, 0]
