"""The production deployment agrees with the code it deploys.

- ``docker-compose config`` (Debian's compose 1.29; CI apt-installs it) accepts the file,
  and a missing required variable stops it with the message that names the fix;
- compose, ``Settings``, the model repository and the model card agree on ports, model
  name, tensor names and dims;
- Prometheus scrapes the compose services on their ports; the Grafana dashboard reads only
  metric names (and labels) that the gateway and Triton export;
- the gateway image's dependency list (the [gateway] extra as uv.lock pins it) covers every
  module the image imports, without torch; the subcommands of the other roles say which
  extra they need.

The Triton inference metric names are checked against a live tritonserver in
tests/integration/test_deploy_metrics.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from harness.configs import config_tensors
from imgsearch import model_card
from imgsearch.export.triton_config import parse_config
from imgsearch.gateway.memory import BASE_BYTES, memory_budget
from imgsearch.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "imgsearch.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DOCKERFILE = ROOT / "gateway" / "Dockerfile"
# What the image installs: the [gateway] extra, exported from uv.lock (tests/unit/test_dependencies.py
# checks it is the lock's)
REQUIREMENTS = ROOT / "requirements" / "gateway.txt"

# What a user puts in .env for the required variables (any non-empty values).
REQUIRED_VALUES = {
    "IMGSEARCH_API_KEY": "k3y-for-tests",
    "MINIO_ACCESS_KEY": "imgsearch",
    "MINIO_SECRET_KEY": "minio-secret-for-tests",
    "GRAFANA_ADMIN_PASSWORD": "grafana-for-tests",
}

# Triton's GPU metrics (nv_gpu_*) are only exported when Triton sees a GPU, so the local
# CPU server cannot show them. Names and labels as documented in Triton's metrics guide
# (docs/user_guide/metrics.md, "GPU Metrics"), unchanged from 2.2x through 2.5x.
TRITON_GPU_METRICS = {
    "nv_gpu_utilization": {"gpu_uuid"},
    "nv_gpu_memory_total_bytes": {"gpu_uuid"},
    "nv_gpu_memory_used_bytes": {"gpu_uuid"},
    "nv_gpu_power_usage": {"gpu_uuid"},
    "nv_gpu_power_limit": {"gpu_uuid"},
    "nv_energy_consumption": {"gpu_uuid"},
}

# The Triton metric names the project's contract relies on (docs/design.md).
TRITON_CONTRACT = {
    "nv_inference_request_success", "nv_inference_exec_count", "nv_inference_count",
    "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_gpu_utilization", "nv_gpu_memory_used_bytes",
}


# ------------------------------------------------------------------ helpers

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} ($$ is a literal $)."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        if op and op.endswith("?") and not val:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and not val:
            return arg
        return val or ""
    return _VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def compose_vars() -> dict[str, tuple[str | None, str | None]]:
    """Every ${VAR} in docker-compose.yml -> (operator, argument)."""
    return {m.group(1): (m.group(2), m.group(3)) for m in _VAR.finditer(COMPOSE.read_text())}


def required_vars() -> set[str]:
    return {name for name, (op, _) in compose_vars().items() if op and op.endswith("?")}


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml with defaults applied, as compose would read it with a minimal .env."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), REQUIRED_VALUES))


def services(compose: dict) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published(service: dict) -> dict[int, str]:
    """container port -> host part ("127.0.0.1:8001" or "8080")."""
    out = {}
    for p in service.get("ports") or []:
        parts = str(p).rsplit(":", 1)
        out[int(parts[-1].split("/")[0])] = parts[0] if len(parts) > 1 else ""
    return out


def flag(command: list[str], name: str) -> str | None:
    for arg in command:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration)):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) for short-syntax volumes."""
    out = {}
    for v in service.get("volumes") or []:
        parts = str(v).split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        out[parts[1]] = (parts[0], mode)
    return out


def pbtxt_name(text: str) -> str:
    name = parse_config(text).name
    assert name, "config without a model name"
    return name


# ----------------------------------------------------- docker-compose config

def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_compose_config(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    # A clean environment: variables of the developer's shell would override the env file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [*cmd, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_compose_config_accepts_the_file(tmp_path):
    res = run_compose_config(tmp_path, REQUIRED_VALUES)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    svc = resolved["services"]
    assert {"triton", "etcd", "minio", "milvus", "gateway", "indexer", "locust-master", "locust-worker",
            "prometheus", "grafana"} <= set(svc)
    # the values compose resolved are the ones the other tests read with our interpolation
    assert env_of(svc["gateway"])["IMGSEARCH_API_KEY"] == REQUIRED_VALUES["IMGSEARCH_API_KEY"]
    assert env_of(svc["milvus"])["MINIO_SECRET_ACCESS_KEY"] == REQUIRED_VALUES["MINIO_SECRET_KEY"]
    assert env_of(svc["gateway"])["IMGSEARCH_TRITON_URL"] == "triton:8001"
    devices = svc["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)


@pytest.mark.parametrize("missing", sorted(REQUIRED_VALUES))
def test_compose_config_stops_on_a_missing_required_variable(tmp_path, missing):
    values = {k: v for k, v in REQUIRED_VALUES.items() if k != missing}
    res = run_compose_config(tmp_path, values)
    assert res.returncode != 0
    assert f"set {missing} in .env" in res.stderr, res.stderr


def test_env_example_alone_stops_with_a_clear_message(tmp_path):
    """`cp .env.example .env` without editing must not start a stack with no secrets."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip()
    res = run_compose_config(tmp_path, values)
    assert res.returncode != 0
    assert re.search(r"set \w+ in \.env", res.stderr), res.stderr


# ------------------------------------------------------ variables and .env.example

def test_required_variables_are_the_documented_ones():
    assert required_vars() == set(REQUIRED_VALUES)


def test_every_compose_variable_is_documented_in_env_example():
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    missing = set(compose_vars()) - documented
    assert not missing, f"variables used in docker-compose.yml but not in .env.example: {sorted(missing)}"


def test_env_example_defaults_match_compose_defaults():
    """`#NAME=value` lines in .env.example show the default compose applies."""
    shown = dict(re.findall(r"^#([A-Z][A-Z0-9_]*)=(\S+)$", ENV_EXAMPLE.read_text(), re.M))
    for name, (op, arg) in compose_vars().items():
        if op and op.endswith("-") and name in shown:
            assert shown[name] == arg, f"{name}: .env.example says {shown[name]}, compose defaults to {arg}"


def test_interpolation_matches_compose_semantics():
    assert interpolate("${A:-x} ${B} $${C}", {"B": "b"}) == "x b ${C}"
    with pytest.raises(KeyError, match="say why"):
        interpolate("${A:?say why}", {"A": ""})


# ----------------------------------------------------------- Triton service

def test_triton_serves_the_mounted_repository_with_its_default_config(compose):
    t = services(compose)["triton"]
    image = t["image"]
    assert image.startswith("nvcr.io/nvidia/tritonserver:") and image.endswith("-py3")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image), "pin a release, not latest"
    cmd = t["command"]
    assert cmd[0] == "tritonserver"
    assert not any(a.startswith("--model-config-name") for a in cmd), "production uses config.pbtxt (GPU)"
    assert flag(cmd, "--model-control-mode") == "none"
    repo = flag(cmd, "--model-repository")
    # the encoder model's folder of model_repository/, read-only, under its own name
    name = Settings.model_fields["model_name"].default
    source, mode = mounts(t)[f"{repo}/{name}"]
    assert (ROOT / source).resolve() == ROOT / "model_repository" / name and mode == "ro"
    assert (ROOT / source / "config.pbtxt").exists()
    served = [target for target in mounts(t) if target.startswith(repo + "/")]
    assert served == [f"{repo}/{name}"], f"Triton would load {served}"


def test_triton_ports_and_the_gateway_url_agree(compose):
    svc = services(compose)
    t, g = svc["triton"], svc["gateway"]
    http, grpc, metrics = (int(flag(t["command"], f"--{n}-port")) for n in ("http", "grpc", "metrics"))
    assert (http, grpc, metrics) == (8000, 8001, 8002)
    assert {http, grpc, metrics} <= set(published(t))
    host, port = env_of(g)["IMGSEARCH_TRITON_URL"].rsplit(":", 1)
    assert host == "triton" and int(port) == grpc
    assert env_of(g).get("IMGSEARCH_TRITON_PROTOCOL", Settings.model_fields["triton_protocol"].default) == "grpc"
    test = " ".join(t["healthcheck"]["test"])
    assert "/v2/health/ready" in test and f"/{http}" in test


def test_triton_drains_before_compose_kills_it(compose):
    t = services(compose)["triton"]
    drain = int(flag(t["command"], "--exit-timeout-secs"))
    grace = seconds(t["stop_grace_period"])
    assert 0 < drain < grace, f"--exit-timeout-secs={drain} must end inside stop_grace_period={grace}s"
    # and the health check leaves room for a first TensorRT engine build
    assert seconds(t["healthcheck"]["start_period"]) >= 300


def test_triton_reserves_a_gpu(compose):
    devices = services(compose)["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_trt_cache_volume_is_where_config_pbtxt_puts_engines(compose):
    cfg = (ROOT / "model_repository" / Settings.model_fields["model_name"].default / "config.pbtxt").read_text()
    paths = [a.parameters["trt_engine_cache_path"]
             for a in parse_config(cfg).optimization.execution_accelerators.gpu_execution_accelerator
             if "trt_engine_cache_path" in a.parameters]
    assert paths, "config.pbtxt has no TensorRT engine cache path"
    assert paths[0] in mounts(services(compose)["triton"])
    assert mounts(services(compose)["triton"])[paths[0]][0] in compose["volumes"]


# ----------------------------------------------------- model name and tensors

def test_model_name_agrees_across_compose_settings_and_repository(compose, settings_env):
    name = Settings(_env_file=None).model_name
    for svc in ("gateway", "indexer"):
        assert env_of(services(compose)[svc]).get("IMGSEARCH_MODEL_NAME", name) == name
    # the folder Triton serves (TRITON_MODEL) defaults to the same model
    assert compose_vars()["TRITON_MODEL"] == (":-", name)
    assert compose_vars()["IMGSEARCH_MODEL_NAME"] == (":-", name)
    cfg = ROOT / "model_repository" / name / "config.pbtxt"
    assert cfg.exists(), f"{cfg} missing: compose's Triton would serve nothing under {name}"
    assert pbtxt_name(cfg.read_text()) == name


def test_checked_in_config_uses_the_model_card_tensor_names():
    cfg = (ROOT / "model_repository" / Settings.model_fields["model_name"].default / "config.pbtxt").read_text()
    tensors = config_tensors(parse_config(cfg))
    assert tensors[model_card.INPUT_NAME] == ("TYPE_UINT8", [224, 224, 3])
    assert tensors[model_card.EMBEDDING_NAME][0] == "TYPE_FP32"
    assert set(tensors) <= {model_card.INPUT_NAME, model_card.EMBEDDING_NAME, model_card.PROBS_NAME}
    parsed = parse_config(cfg)
    assert parsed.platform == "onnxruntime_onnx"
    assert [g.kind for g in parsed.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_exported_config_dims_match_its_model_card(repo18):
    """A real export (resnet18, random weights): both configs say what the card says."""
    name = Settings.model_fields["model_name"].default
    card = model_card.read_card(repo18, name)
    for path in (repo18 / name / "config.pbtxt", repo18 / name / "configs" / "cpu.pbtxt"):
        text = path.read_text()
        t = config_tensors(parse_config(text))
        assert pbtxt_name(text) == card.name == name
        assert t[card.input_name] == ("TYPE_UINT8", [card.input_size, card.input_size, 3]), path
        assert t[model_card.EMBEDDING_NAME] == ("TYPE_FP32", [card.embedding_dim]), path
        assert (model_card.PROBS_NAME in t) == card.has_probs, path
        if card.has_probs:
            assert t[model_card.PROBS_NAME] == ("TYPE_FP32", [card.num_classes]), path
        assert sorted(card.outputs) == sorted(k for k in t if k != card.input_name), path


# ------------------------------------------------------------ gateway service

def test_gateway_env_names_are_settings_fields(compose, settings_env):
    """extra="ignore" would silently drop a misspelt IMGSEARCH_ variable: check every one."""
    fields = set(Settings.model_fields)
    for name in ("gateway", "indexer"):
        env = env_of(services(compose)[name])
        unknown = [k for k in env if k.startswith("IMGSEARCH_") and k[len("IMGSEARCH_"):].lower() not in fields]
        assert not unknown, f"{name}: not Settings fields: {unknown}"
        for k, v in env.items():
            settings_env.setenv(k, v)
        s = Settings(_env_file=None)
        assert s.triton_url == "triton:8001"
        assert s.triton_input == "pixels"  # the compose Triton serves the encoder only, no ensemble
        assert s.milvus_uri == "http://milvus:19530"
        if name == "gateway":
            assert s.api_key is not None and s.api_key.get_secret_value() == REQUIRED_VALUES["IMGSEARCH_API_KEY"]
        for k in env:
            settings_env.delenv(k)


def test_gateway_milvus_address_is_the_milvus_service(compose):
    svc = services(compose)
    uri = env_of(svc["gateway"])["IMGSEARCH_MILVUS_URI"]
    m = re.fullmatch(r"http://(\w+):(\d+)", uri)
    assert m and m.group(1) == "milvus" and int(m.group(2)) in published(svc["milvus"])
    assert env_of(svc["indexer"])["IMGSEARCH_MILVUS_URI"] == uri


def test_gateway_waits_for_healthy_backends_and_checks_readyz(compose):
    g = services(compose)["gateway"]
    for dep in ("triton", "milvus"):
        assert g["depends_on"][dep]["condition"] == "service_healthy"
    port = int(env_of(g)["IMGSEARCH_PORT"])
    assert port in published(g) and published(g)[port].endswith("8080")
    assert f":{port}/readyz" in " ".join(g["healthcheck"]["test"])
    assert env_of(g)["IMGSEARCH_HOST"] == "0.0.0.0"


def test_services_that_compose_waits_on_have_healthchecks(compose):
    svc = services(compose)
    for name, s in svc.items():
        deps = s.get("depends_on") or {}
        if isinstance(deps, dict):
            for dep, cond in deps.items():
                if cond.get("condition") == "service_healthy":
                    assert "healthcheck" in svc[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_milvus_keeps_its_data_in_named_volumes(compose):
    declared = set(compose["volumes"])
    for name in ("etcd", "minio", "milvus"):
        sources = {src for src, _ in mounts(services(compose)[name]).values()}
        assert sources & declared, f"{name} keeps no named volume"
        assert "healthcheck" in services(compose)[name]
    env = env_of(services(compose)["milvus"])
    assert env["MINIO_ACCESS_KEY_ID"] == env_of(services(compose)["minio"])["MINIO_ROOT_USER"]


def test_profiles(compose):
    svc = services(compose)
    assert svc["indexer"]["profiles"] == ["index"]
    assert svc["indexer"]["command"][:2] == ["imgsearch", "index"]
    images = svc["indexer"]["command"][2]
    assert images in mounts(svc["indexer"]) and mounts(svc["indexer"])[images][1] == "ro"
    for name in ("locust-master", "locust-worker"):
        assert svc[name]["profiles"] == ["loadtest"] and svc[name]["image"].startswith("locustio/locust:")
    for name in ("prometheus", "grafana"):
        assert svc[name]["profiles"] == ["monitoring"]
    for name in ("triton", "etcd", "minio", "milvus", "gateway"):
        assert "profiles" not in svc[name], f"{name} must start with a plain `up`"


def test_locust_runs_the_project_locustfile_against_the_gateway(compose):
    svc = services(compose)
    gateway_port = env_of(svc["gateway"])["IMGSEARCH_PORT"]
    for name in ("locust-master", "locust-worker"):
        s = svc[name]
        args = s["command"].split()
        files = args[args.index("-f") + 1].split(",")
        src, _ = mounts(s)["/mnt/locust"]
        for f in files:
            assert (ROOT / src / Path(f).relative_to("/mnt/locust")).exists(), f
    master = svc["locust-master"]["command"].split()
    assert master[master.index("--host") + 1] == f"http://gateway:{gateway_port}"
    assert 8089 in published(svc["locust-master"])
    # the Locust UI starts load against the gateway: internal only, like Triton's and Milvus' ports
    assert published(svc["locust-master"])[8089].startswith("127.0.0.1:"), published(svc["locust-master"])
    worker = svc["locust-worker"]["command"].split()
    assert worker[worker.index("--master-host") + 1] == "locust-master"


# ------------------------------------------------------ Prometheus and Grafana

def test_prometheus_scrapes_the_compose_services_on_their_ports(compose):
    svc = services(compose)
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    targets = {j["job_name"]: t for j in cfg["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]}
    metrics_port = flag(svc["triton"]["command"], "--metrics-port")
    assert targets["triton"] == f"triton:{metrics_port}"
    assert targets["gateway"] == f"gateway:{env_of(svc['gateway'])['IMGSEARCH_PORT']}"
    assert targets["milvus"] == "milvus:9091"
    src, _ = mounts(svc["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert (ROOT / src).resolve() == PROMETHEUS


def test_grafana_provisioning_is_mounted_and_consistent(compose):
    g = services(compose)["grafana"]
    m = mounts(g)
    assert (ROOT / m["/etc/grafana/provisioning"][0]).resolve() == ROOT / "deploy" / "grafana" / "provisioning"
    dash_dir = (ROOT / m["/etc/grafana/dashboards"][0]).resolve()
    assert DASHBOARD.parent == dash_dir
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/imgsearch.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and 9090 in published(services(compose)["prometheus"])
    uids = {p["datasource"]["uid"] for p in panels(json.loads(DASHBOARD.read_text())) if "datasource" in p}
    assert uids == {ds["uid"]}


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(expr, legendFormat) of every query in the dashboard, templating included."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(t["expr"], t.get("legendFormat", "")) for p in panels(dash) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        out.append((q["query"] if isinstance(q, dict) else q, ""))
    return out


_METRIC = re.compile(r"\b((?:nv|imgsearch)_[a-z0-9_]+)\b")


def dashboard_metric_names() -> set[str]:
    return {m for expr, _ in dashboard_exprs() for m in _METRIC.findall(expr)}


def expr_labels(expr: str, legend: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    labels.discard("le")
    return labels


def gateway_metrics() -> dict[str, set[str]]:
    """Sample names the gateway exports (gateway/metrics.py) -> their label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from imgsearch.gateway.metrics import Metrics

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                "gauge": [""], "summary": ["", "_count", "_sum", "_created"], "info": ["_info"]}
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            for s in suffixes.get(family.type, [""]):
                out[family.name + s] = set(metric._labelnames)
    return out


def test_dashboard_covers_what_the_issue_asks():
    exprs = " ".join(e for e, _ in dashboard_exprs())
    for needed in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_inference_queue_duration_us",
                   "nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                   "imgsearch_stage_duration_seconds_bucket", "imgsearch_errors_total", "imgsearch_shed_total"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.5" in exprs and "histogram_quantile(0.99" in exprs
    assert "by (le, stage)" in exprs


def test_dashboard_gateway_metrics_exist_in_the_gateway():
    exported = gateway_metrics()
    assert {"imgsearch_stage_duration_seconds_bucket", "imgsearch_errors_total", "imgsearch_shed_total"} <= set(exported)
    used = {m for m in dashboard_metric_names() if m.startswith("imgsearch_")}
    assert used, "the dashboard shows no gateway metric"
    assert not used - set(exported), f"not exported by gateway/metrics.py: {sorted(used - set(exported))}"
    for expr, legend in dashboard_exprs():
        names = [m for m in _METRIC.findall(expr) if m.startswith("imgsearch_")]
        if names:
            have = set().union(*(exported[n] for n in names))
            assert expr_labels(expr, legend) <= have, f"labels {expr_labels(expr, legend) - have} unknown in {expr}"


def test_dashboard_gpu_metrics_are_triton_gpu_metrics():
    used = {m for m in dashboard_metric_names() if m.startswith(("nv_gpu_", "nv_energy_"))}
    assert used and not used - set(TRITON_GPU_METRICS), sorted(used - set(TRITON_GPU_METRICS))
    for expr, legend in dashboard_exprs():
        names = [m for m in _METRIC.findall(expr) if m in TRITON_GPU_METRICS]
        if names:
            assert expr_labels(expr, legend) <= set().union(*(TRITON_GPU_METRICS[n] for n in names)), expr


def test_dashboard_uses_the_triton_metrics_of_the_contract():
    used = {m for m in dashboard_metric_names() if m.startswith("nv_")}
    assert TRITON_CONTRACT <= used | {"nv_inference_compute_infer_duration_us"}


def test_label_parser_sees_selectors_groupings_and_legends():
    expr = 'sum by (le, stage) (rate(x_bucket{route=~"/v1/.*", code!="x"}[1m]))'
    assert expr_labels(expr, "p50 {{stage}} {{gpu_uuid}}") == {"stage", "route", "code", "gpu_uuid"}


# ------------------------------------------------------------- gateway image

def locked(requirements: Path) -> list[str]:
    """``name==version ; marker`` of each requirement in a file ``uv export`` wrote (hashes dropped)."""
    return [line.rstrip(" \\") for line in requirements.read_text().splitlines()
            if line and not line[0].isspace() and not line.startswith(("#", "-"))]


def test_dockerfile_is_slim_and_torch_free():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base.startswith("python:3.11-slim"), base
    pins = {re.split(r"[\[=<>!~; ]", r, maxsplit=1)[0].lower(): r for r in locked(REQUIREMENTS)}
    assert not set(pins) & {"torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton",
                            "locust", "matplotlib", "scikit-image"}
    for needed in ("fastapi", "uvicorn", "tritonclient", "pymilvus", "pillow", "numpy", "pydantic-settings",
                   "prometheus-client", "python-multipart"):
        assert needed in pins, needed
    assert all("==" in r for r in pins.values()), "every version pinned"
    assert re.match(r"numpy==1\.", pins["numpy"]), "numpy<2 across the project (docs/design.md)"
    # installed from the lock, hashes checked; the project itself adds no dependency
    assert f"COPY {REQUIREMENTS.relative_to(ROOT)} " in text
    assert re.search(r"pip install --require-hashes -r \S+", text)
    assert "pip install --no-deps ." in text
    assert re.search(r'^CMD \["imgsearch", "serve"\]', text, re.M)
    assert re.search(r"^USER \S+", text, re.M), "run as an unprivileged user"


def test_dockerfile_copies_nothing_dockerignore_excludes():
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = [src for src, _ in dockerfile_copies()]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not any(src == pat or src.startswith(pat + "/") for pat in ignored), f"{src} is in .dockerignore"
    for secret in (".env", ".venv", "data/", "model_repository/"):
        assert secret.rstrip("/") in ignored


# the folders of the wheel's packages (setuptools package-dir): the image copies them all
PACKAGE_DIRS = sorted(set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()))


def dockerfile_copies() -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context."""
    out = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            *sources, dest = line.split()[1:]
            out += [(src, dest) for src in sources]
    return out


def test_image_copies_every_package_of_the_wheel():
    """`pip install --no-deps .` builds the wheel, and setuptools fails on a missing package folder."""
    copied = {src: dest for src, dest in dockerfile_copies()}
    assert "export" in PACKAGE_DIRS and "gateway" in PACKAGE_DIRS
    for folder in PACKAGE_DIRS:
        assert copied.get(folder) == f"./{folder}", f"gateway/Dockerfile does not COPY {folder} ./{folder}"
    assert copied.get("pyproject.toml") == "./" and copied.get("README.md") == "./"


def _image_env_check(pins: list[str]) -> str:
    """Python run in a child: only the distributions pinned in ``pins`` (and the stdlib) import,
    and importlib.metadata sees no other: ``pip install 'imgsearch[gateway]'``, as in the image."""
    return textwrap.dedent(f"""
        import importlib, importlib.abc, importlib.metadata as md, io, pkgutil, sys
        from contextlib import redirect_stderr
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name as canon

        allowed_dists = {{canon(r.name) for r in map(Requirement, {pins!r}) if r.marker is None or r.marker.evaluate()}}
        allowed_dists.add("imgsearch")
        provided = {{}}
        for top, dists in md.packages_distributions().items():
            provided.setdefault(top, set()).update(canon(d) for d in dists)
        blocked = {{top for top, dists in provided.items() if not dists & allowed_dists and top != "imgsearch"}}
        blocked |= {{"harness", "bench", "tests"}}  # not in the wheel

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in blocked):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not in the gateway image)", name=name)
                return None

        real_distribution = md.distribution
        def distribution(name):
            if canon(name) not in allowed_dists:
                raise md.PackageNotFoundError(name)
            return real_distribution(name)

        sys.meta_path.insert(0, Block())
        md.distribution = distribution
        import imgsearch.cli
        parser = imgsearch.cli.build_parser()
        for pkg in ("imgsearch.gateway", "imgsearch.indexer"):
            mod = importlib.import_module(pkg)
            for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
                importlib.import_module(info.name)
        print("commands:", " ".join(sorted(parser._subparsers._group_actions[0].choices)))
        for line in parser.format_help().splitlines():
            print("help:", line)
        for argv in (["export", "--weights", "random"], ["loadtest", "--run-time", "5s"], ["finetune"]):
            err = io.StringIO()
            with redirect_stderr(err):
                code = imgsearch.cli.main(argv)
            print(f"ran {{argv[0]}}: exit {{code}}: {{err.getvalue().strip()}}")
        assert "torch" not in sys.modules, "torch was imported"
    """)


def _run_image_check(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}, timeout=120)


def test_gateway_image_requirements_cover_what_it_imports(tmp_path):
    """Simulates the image: imports the CLI and every gateway/indexer module with every installed
    distribution hidden except the [gateway] extra's locked ones; the other roles' subcommands
    are listed and say which extra they need, without importing torch."""
    res = _run_image_check(_image_env_check(locked(REQUIREMENTS)), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    commands = res.stdout.split("commands:", 1)[1].split("\n", 1)[0].split()
    assert {"index", "collection", "export", "loadtest", "finetune", "eval"} <= set(commands)
    if (ROOT / "gateway" / "cli.py").exists():
        assert "serve" in commands
    help_ = {line.split()[1]: line for line in res.stdout.splitlines() if re.match(r"help:\s+[a-z-]+\s{2}", line)}
    assert help_["export"].endswith("[needs the export extra]"), help_
    assert help_["loadtest"].endswith("[needs the loadtest extra]"), help_
    assert "[needs" not in help_["index"], help_
    for command, extra in (("export", "export"), ("loadtest", "loadtest"), ("finetune", "export")):
        expected = f"ran {command}: exit 2: imgsearch {command} needs the [{extra}] extra: pip install 'imgsearch[{extra}]'"
        assert expected in res.stdout, res.stdout[-2000:]


def test_image_check_would_catch_a_missing_requirement(tmp_path):
    """The simulation is not vacuous: without fastapi in the list, the gateway cannot import."""
    pins = [r for r in locked(REQUIREMENTS) if not r.startswith("fastapi==")]
    assert len(pins) == len(locked(REQUIREMENTS)) - 1
    res = _run_image_check(_image_env_check(pins), tmp_path)
    assert res.returncode != 0
    assert "No module named 'fastapi" in res.stderr and "not in the gateway image" in res.stderr, res.stderr[-2000:]


# ------------------------------------------------------------ Kubernetes
#
# Every manifest under deploy/kubernetes/ is validated offline and strictly (unknown fields
# are errors) against the Kubernetes JSON schemas that the kubernetes-validate package
# carries, for the oldest and the newest Kubernetes we support; then checked against
# Settings, compose, the gateway's routes and metrics, and the CLI's own parser.

K8S = ROOT / "deploy" / "kubernetes"
HELM = ROOT / "deploy" / "helm"
ADAPTER_VALUES = HELM / "prometheus-adapter-values.yaml"
MILVUS_VALUES = HELM / "milvus-values.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# 1.29: the oldest release where the indexer Job's backoffLimitPerIndex is on by default (beta)
OLDEST_K8S = "1.29"
# The Prometheus operator's custom resources: their schemas live in the operator's CRDs, which
# kubernetes-validate does not carry. They are checked structurally below instead.
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    """What `kubectl apply -k` applies, then the on-demand Jobs."""
    return [K8S / r for r in kustomization()["resources"]] + sorted((K8S / "jobs").glob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict]:
    return [d for f in manifest_files() for d in load_docs(f)]


def k8s_obj(kind: str, name: str) -> dict:
    found = [d for d in k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads() -> list[dict]:
    return [d for d in k8s_objects() if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def container_env(obj: dict, configmaps: dict[str, dict] | None = None) -> dict[str, str | dict]:
    """name -> value (or the valueFrom dict), envFrom ConfigMaps first, as the kubelet merges them."""
    c = pod_spec(obj)["containers"][0]
    env: dict[str, str | dict] = {}
    for src in c.get("envFrom", []):
        cm = k8s_obj("ConfigMap", src["configMapRef"]["name"])
        env.update(cm["data"])
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e["valueFrom"]
    return env


def expand(arg: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command/args: only variables the container declares."""
    return re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]) if m.group(1) in env else m.group(0), arg)


def quantity(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def secret_refs() -> set[tuple[str, str]]:
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(k8s_objects())
    return refs


# --- the files and the schemas

def test_kustomization_lists_every_stack_manifest():
    k = kustomization()
    assert set(k) == {"apiVersion", "kind", "resources"}, "only resources: the checks below read that list"
    listed = {K8S / r for r in k["resources"]}
    on_disk = set(K8S.glob("*.yaml")) - {K8S / "kustomization.yaml"}
    assert listed == on_disk, f"not applied by kustomize: {sorted(map(str, on_disk - listed))}"
    assert all(f.exists() for f in manifest_files())
    assert set((K8S / "jobs").glob("*.yaml")) == {K8S / "jobs" / "index.yaml", K8S / "jobs" / "sync.yaml"}


def test_kustomize_renders_exactly_the_listed_objects():
    """With kubectl on PATH (not a test requirement): `kubectl kustomize` gives the same objects."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed; the stack is the listed files (resources only)")
    res = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rendered = [d for d in yaml.safe_load_all(res.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    ours = [d for f in manifest_files() if f.parent == K8S for d in load_docs(f)]
    assert sorted(rendered, key=key) == sorted(ours, key=key)


@pytest.mark.parametrize("version", [OLDEST_K8S, "latest"])
def test_every_manifest_is_valid_kubernetes_strictly(version):
    import kubernetes_validate as kv

    version = kv.latest_version() if version == "latest" else version
    checked = skipped = 0
    for obj in k8s_objects():
        if (obj["apiVersion"], obj["kind"]) in OPERATOR_KINDS:
            # honest about the gap: no schema offline; if one appears, validate it here instead
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(obj, version, strict=True)
            skipped += 1
            continue
        kv.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 10 and skipped == 2, (checked, skipped)


def test_strict_validation_catches_a_misspelt_field_and_a_wrong_type():
    import copy

    import kubernetes_validate as kv

    good = k8s_obj("Deployment", "gateway")
    typo = copy.deepcopy(good)
    c = pod_spec(typo)["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(typo, kv.latest_version(), strict=True)
    wrong = copy.deepcopy(good)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, kv.latest_version(), strict=True)


def test_no_secret_values_in_files_and_every_secret_is_documented():
    assert not [d for d in k8s_objects() if d["kind"] == "Secret"], "Secrets are created with kubectl, not kept in git"
    doc = DEPLOY_DOC.read_text()
    refs = secret_refs() | {(yaml.safe_load(MILVUS_VALUES.read_text())["minio"]["existingSecret"], key)
                            for key in ("accesskey", "secretkey")}
    assert ("imgsearch-api", "api-key") in refs
    commands = re.findall(r"^(kubectl create secret generic (?:[^\n]*\\\n)*[^\n]*)", doc, re.M)
    for name, key in sorted(refs):
        cmd = [c for c in commands if c.split()[4] == name]
        assert len(cmd) == 1, f"docs/deploy.md: no `kubectl create secret generic {name}`"
        assert f"--from-literal={key}=" in cmd[0] or f"--from-file={key}=" in cmd[0], (name, key)
    for obj in workloads():
        for e in pod_spec(obj)["containers"][0].get("env", []):
            if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"


# --- pods: security, services, disruption budgets

def test_every_pod_runs_unprivileged():
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text()).group(1))
    for obj in workloads():
        pod, name = pod_spec(obj), obj["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        if pod["containers"][0]["image"].startswith("imgsearch-gateway"):
            assert pod["securityContext"]["runAsUser"] == uid, f"{name}: the image's user is {uid}"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            if sc.get("readOnlyRootFilesystem"):
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, f"{name}: Python needs a writable /tmp"


def test_services_and_budgets_select_their_pods_and_named_ports():
    deployments = {d["metadata"]["name"]: d for d in k8s_objects() if d["kind"] == "Deployment"}
    for svc in (d for d in k8s_objects() if d["kind"] == "Service"):
        dep = deployments[svc["metadata"]["name"]]
        assert selects({"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
        names = {p["name"] for p in pod_spec(dep)["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, svc["metadata"]["name"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in k8s_objects() if h["kind"] == "HorizontalPodAutoscaler"}
    for name, dep in deployments.items():
        pdbs = [p for p in k8s_objects() if p["kind"] == "PodDisruptionBudget"
                and selects(p["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])]
        assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets"
        floor = min(hpas[name]["spec"]["minReplicas"], dep["spec"]["replicas"])
        spec = pdbs[0]["spec"]
        # a drain must be able to evict one pod at the HPA's floor
        assert spec.get("minAvailable", 0) < floor and spec.get("maxUnavailable", 1) >= 1, name
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}


def test_every_claimed_volume_is_declared():
    claims = {d["metadata"]["name"]: d for d in k8s_objects() if d["kind"] == "PersistentVolumeClaim"}
    for obj in workloads():
        for v in pod_spec(obj).get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, obj["metadata"]["name"]
    # every gateway pod writes POST /v1/images into the one image folder
    assert "ReadWriteMany" in claims["imgsearch-images"]["spec"]["accessModes"]


# --- the gateway

def gateway_settings(settings_env, obj: dict) -> Settings:
    """Settings as a pod of ``obj`` reads them (secrets stand in with a value)."""
    for k, v in container_env(obj).items():
        if k.startswith("IMGSEARCH_"):
            settings_env.setenv(k, v if isinstance(v, str) else "from-a-secret")
    return Settings(_env_file=None)


def test_shared_config_is_the_compose_settings(compose):
    cm = k8s_obj("ConfigMap", "imgsearch")["data"]
    # the same IMGSEARCH_* block as compose's x-imgsearch-env, same values: the cluster's
    # Services carry the compose service names (triton, milvus) on the same ports
    assert cm == {k: str(v) for k, v in compose["x-imgsearch-env"].items()}
    fields = set(Settings.model_fields)
    for obj in workloads():
        unknown = [k for k in container_env(obj) if k.startswith("IMGSEARCH_") and k[10:].lower() not in fields]
        assert not unknown, f"{obj['metadata']['name']}: not Settings fields: {unknown}"


def test_gateway_addresses_agree_with_triton_milvus_and_compose(compose, settings_env):
    s = gateway_settings(settings_env, k8s_obj("Deployment", "gateway"))
    host, port = s.triton_url.rsplit(":", 1)
    triton_svc = k8s_obj("Service", "triton")
    assert host == triton_svc["metadata"]["name"] and s.triton_protocol == "grpc"
    assert int(port) == {p["name"]: p["port"] for p in triton_svc["spec"]["ports"]}["grpc"]
    assert int(port) == int(flag(k8s_obj("Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]["args"],
                                 "--grpc-port"))
    # Milvus: the proxy Service of the Helm release the values file documents, on Milvus' port
    release = re.search(r"helm install (\S+) zilliztech/milvus", MILVUS_VALUES.read_text()).group(1)
    m = re.fullmatch(r"http://([\w-]+):(\d+)", s.milvus_uri)
    assert m and m.group(1) == release and int(m.group(2)) in published(services(compose)["milvus"])
    assert s.model_name == Settings.model_fields["model_name"].default
    assert (ROOT / "model_repository" / s.model_name / "config.pbtxt").exists()


def test_gateway_port_probes_and_routes(compose, settings_env):
    from imgsearch.gateway.routes import router

    dep = k8s_obj("Deployment", "gateway")
    c = pod_spec(dep)["containers"][0]
    s = gateway_settings(settings_env, dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": s.port} and s.host == "0.0.0.0" and s.workers == 1
    assert str(s.port) == env_of(services(compose)["gateway"])["IMGSEARCH_PORT"]
    assert c["image"].split(":")[0] == services(compose)["gateway"]["image"].split(":")[0]
    routes = {r.path for r in router.routes}
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    # liveness is the process only: a Triton or Milvus outage must not restart every gateway
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for p in probes.values():
        assert p["path"] in routes and p["port"] in ports
    # SIGTERM: the Service drops the pod (preStop), then in-flight searches drain, inside the grace period
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + s.graceful_shutdown_s < pod_spec(dep)["terminationGracePeriodSeconds"]
    mounts_ = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert str(s.image_root) in mounts_ and not mounts_[str(s.image_root)].get("readOnly")  # POST /v1/images
    assert mounts_[str(s.model_repository)]["readOnly"] is True


# decode_image's peak on an RGBA PNG, the worst mode: the image, its alpha composite, the RGB copy
# (test_decode_peak_is_within_the_budget_constant measures it); an indexer's decode workers
# each hold one image at this peak
DECODE_BYTES_PER_PIXEL = 20


def test_gateway_memory_limit_is_its_decode_budget(settings_env):
    dep = k8s_obj("Deployment", "gateway")
    res = pod_spec(dep)["containers"][0]["resources"]
    s = gateway_settings(settings_env, dep)
    budget = memory_budget(s).total
    limit = quantity(res["limits"]["memory"])
    assert s.triton_input == "pixels"  # the budget's assumption: uploads are not copied into requests to Triton
    assert budget <= limit <= 1.3 * budget, f"limit {limit / 2**20:.0f} MiB for a budget of {budget / 2**20:.0f} MiB"
    assert quantity(res["requests"]["memory"]) == limit  # scheduled for what it may use: no OOM under load


def test_compose_gateway_memory_limit_covers_its_budget(compose, settings_env):
    """The same budget as the Kubernetes pod's (imgsearch.gateway.memory), from compose's settings."""
    gw = services(compose)["gateway"]
    for k, v in {**compose["x-imgsearch-env"], **env_of(gw)}.items():
        settings_env.setenv(k, str(v))
    s = Settings(_env_file=None)
    need = memory_budget(s).total
    limit = compose_memory(gw["mem_limit"])
    assert s.triton_input == "pixels"
    assert need <= limit <= 1.5 * need, (need / 2**20, limit / 2**20)
    assert "mem_limit" in services(compose)["indexer"]


def compose_memory(limit: str | int) -> float:
    """A compose ``mem_limit`` ("16g", "512m", bytes) in bytes."""
    m = re.fullmatch(r"(\d+)([kmg]?)b?", str(limit).strip().lower())
    assert m, f"not a compose memory size: {limit!r}"
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")


# services that run as root, each with its reason in docs/deploy.md, "Users inside the containers"
COMPOSE_ROOT_SERVICES = {"etcd", "minio", "milvus", "triton-cache-owner"}


def test_every_compose_service_has_a_memory_limit_documented_in_deploy_md(compose):
    doc = DEPLOY_DOC.read_text()
    section = doc[doc.index("### Memory limits"):]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| ([^|]+?) \|", section, re.M))
    for name, svc in services(compose).items():
        assert "mem_limit" in svc, f"{name}: no mem_limit"
        limit = compose_memory(svc["mem_limit"])
        assert 32 * 2**20 <= limit, (name, svc["mem_limit"])
        assert name in rows, f"{name}: no row in docs/deploy.md, Memory limits"
        shown = re.search(r"\(?(\d+[kmg])\)?", rows[name]).group(1)
        assert compose_memory(shown) == limit, f"{name}: docs/deploy.md says {rows[name]}, compose {svc['mem_limit']}"
    milvus = re.search(r"^\s*mem_limit: \$\{MILVUS_MEM_LIMIT:-(\w+)\}", COMPOSE.read_text(), re.M)
    assert milvus and compose_memory(milvus.group(1)) == compose_memory(services(compose)["milvus"]["mem_limit"])
    # Triton as its Kubernetes pod
    k8s = pod_spec(k8s_obj("Deployment", "triton"))["containers"][0]["resources"]["limits"]["memory"]
    assert compose_memory(services(compose)["triton"]["mem_limit"]) == quantity(k8s)


def test_compose_services_run_as_non_root_users_where_their_images_allow(compose):
    svc = services(compose)
    doc = DEPLOY_DOC.read_text()
    users = doc[doc.index("### Users inside the containers"):doc.index("### Memory limits")]
    own = re.search(r"^USER (\S+)", DOCKERFILE.read_text(), re.M)
    assert own and own.group(1) not in ("root", "0"), "the gateway image must end as a non-root USER"
    for name, s in svc.items():
        user = str(s.get("user", ""))
        if name in COMPOSE_ROOT_SERVICES:
            assert f"`{name}`" in users, f"{name} runs as root without a reason in docs/deploy.md"
            continue
        if s.get("image", "").startswith("imgsearch-gateway"):
            assert user in ("", "imgsearch", "10001"), name  # the image's own USER
            continue
        assert user and user.split(":")[0] not in ("root", "0"), f"{name}: runs as {user or 'the image default'}"


def test_triton_runs_as_the_images_user_on_a_cache_volume_it_owns(compose):
    svc = services(compose)
    tri, owner = svc["triton"], svc["triton-cache-owner"]
    ctx = pod_spec(k8s_obj("Deployment", "triton"))["securityContext"]
    uid, gid = (int(x) for x in str(tri["user"]).split(":"))
    assert uid != 0 and (uid, gid) == (ctx["runAsUser"], ctx["runAsGroup"])  # triton-server in NVIDIA's image
    (cache,) = [v for v in tri["volumes"] if v.split(":")[0] in compose["volumes"]]
    target = cache.split(":")[1]
    assert owner["volumes"] == [cache] and owner["image"] == tri["image"]
    assert owner["entrypoint"] == ["chown", f"{uid}:{gid}", target]
    assert tri["depends_on"]["triton-cache-owner"] == {"condition": "service_completed_successfully"}
    assert owner["cap_drop"] == ["ALL"] and owner["cap_add"] == ["CHOWN"] and owner["network_mode"] == "none"
    assert owner["restart"] == "no" and "profiles" not in owner


def test_decode_peak_is_within_the_budget_constant(tmp_path):
    """decode_image on a 4 MP RGBA PNG, in a fresh process, RSS sampled every 0.5 ms."""
    code = textwrap.dedent("""
        import io, threading, time
        import numpy as np, psutil
        from PIL import Image
        from imgsearch.imaging import decode_image
        w = h = 2000
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").save(
            buf, "PNG", compress_level=1)
        data = buf.getvalue()
        proc = psutil.Process(); base = proc.memory_info().rss; peak = [base]; done = []
        def sample():
            while not done:
                peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.0005)
        t = threading.Thread(target=sample); t.start()
        for _ in range(3):
            decode_image(data, 224, 50_000_000)
        done.append(1); t.join()
        print((peak[0] - base) / (w * h))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    per_pixel = float(res.stdout.split()[-1])
    assert 4 <= per_pixel <= DECODE_BYTES_PER_PIXEL, per_pixel  # at least the RGBA image itself was seen


def test_gateway_autoscales_before_it_sheds(settings_env):
    dep = k8s_obj("Deployment", "gateway")
    s = gateway_settings(settings_env, dep)
    hpa = k8s_obj("HorizontalPodAutoscaler", "gateway")
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue"
    # well below the in-flight limit, where the gateway starts answering 503
    assert 0 < quantity(pods["target"]["averageValue"]) <= s.max_inflight / 2
    wanted = pods["metric"]["name"]
    rule = next(r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"] if r["name"]["as"] == wanted)
    read = set(_METRIC.findall(rule["seriesQuery"] + rule["metricsQuery"]))
    assert read == {"imgsearch_inflight_requests"} and read <= set(gateway_metrics())
    # CPU utilisation is relative to the request: the container must have one
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert quantity(pod_spec(dep)["containers"][0]["resources"]["requests"]["cpu"]) > 0
    assert hpa["spec"]["minReplicas"] >= 2


# --- Triton

def test_kubernetes_triton_matches_the_compose_triton(compose):
    dep, svc = k8s_obj("Deployment", "triton"), k8s_obj("Service", "triton")
    pod = pod_spec(dep)
    c = pod["containers"][0]
    t = services(compose)["triton"]
    assert c["image"] == t["image"]
    for f in ("--model-control-mode", "--http-port", "--grpc-port", "--metrics-port", "--exit-timeout-secs"):
        assert flag(c["args"], f) == flag(t["command"], f), f
    assert not any(a.startswith("--model-config-name") for a in c["args"])
    assert int(flag(c["args"], "--exit-timeout-secs")) < pod["terminationGracePeriodSeconds"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001, 8002}
    assert svc["spec"]["clusterIP"] == "None"  # headless: gateways spread gRPC over every pod


def test_hpa_reads_the_metric_the_adapter_publishes():
    hpa = k8s_obj("HorizontalPodAutoscaler", "triton")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    rule = next(r for r in rules if r["name"]["as"] == wanted)
    used = set(_METRIC.findall(rule["metricsQuery"])) | set(_METRIC.findall(rule["seriesQuery"]))
    # queue time per request, from Triton's own counters (names checked live in test_deploy_metrics.py)
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert used <= TRITON_CONTRACT


def test_helm_values_run_the_compose_milvus_version(compose):
    values = yaml.safe_load(MILVUS_VALUES.read_text())
    assert values["cluster"]["enabled"] is True
    assert services(compose)["milvus"]["image"] == f"milvusdb/milvus:{values['image']['all']['tag']}"
    assert values["etcd"]["replicaCount"] >= 3 and values["queryNode"]["replicas"] >= 2
    assert "accessKey" not in values["minio"], "credentials come from a Secret, not the values file"


# --- monitoring (Prometheus operator objects)

def rule_list() -> list[dict]:
    return [r for g in k8s_obj("PrometheusRule", "imgsearch")["spec"]["groups"] for r in g["rules"]]


def test_pod_monitor_scrapes_the_gateway_and_triton_metrics_ports():
    from imgsearch.gateway.routes import router

    pm = k8s_obj("PodMonitor", "imgsearch")
    endpoints = {e["port"]: e["path"] for e in pm["spec"]["podMetricsEndpoints"]}
    for name, port in (("gateway", "http"), ("triton", "metrics")):
        dep = k8s_obj("Deployment", name)
        assert selects(pm["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]), name
        assert port in {p["name"] for p in pod_spec(dep)["containers"][0]["ports"]}, name
        assert endpoints[port] == "/metrics"
    assert "/metrics" in {r.path for r in router.routes}


def test_prometheus_rules_are_well_formed():
    rules = rule_list()
    assert len(rules) >= 5
    records = set()
    for r in rules:
        assert ("alert" in r) != ("record" in r), r
        assert isinstance(r["expr"], str) and r["expr"].count("(") == r["expr"].count(")"), r
        if "record" in r:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", r["record"]), r["record"]  # level:metric:operations
            records.add(r["record"])
        else:
            assert re.fullmatch(r"[A-Z][A-Za-z]+", r["alert"]) and seconds(r["for"]) >= 60, r
            assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"], r
    for r in rules:  # a recording rule is defined before it is used
        for name in re.findall(r"\b([a-z_]+:[a-z_]+:[a-z0-9_]+)\b", r["expr"]):
            assert name in records, name


def test_prometheus_rules_read_exported_metrics_and_labels():
    from imgsearch.gateway.errors import STATUS_TABLE
    from imgsearch.gateway.routes import router

    exported = gateway_metrics()
    recorded_labels = {}
    for r in rule_list():
        expr = r["expr"]
        names = _METRIC.findall(expr)
        have: set[str] = set()
        for n in names:
            if n.startswith("imgsearch_"):
                assert n in exported, f"{n}: not exported by gateway/metrics.py"
                have |= exported[n]
            elif n in TRITON_GPU_METRICS:
                have |= TRITON_GPU_METRICS[n]
            else:
                assert n in TRITON_CONTRACT, f"{n}: not a Triton metric of the contract"
                have |= {"model", "version"}  # nv_inference_* labels (checked live in test_deploy_metrics.py)
        carried: set[str] = set()  # labels a recorded series brings along
        for rec in re.findall(r"\b([a-z_]+:[a-z_]+:[a-z0-9_]+)\b", expr):
            carried |= recorded_labels[rec]
        have |= carried
        assert names or have, expr
        labels = expr_labels(expr, "")
        assert labels <= have, f"labels {labels - have} unknown in {expr}"
        if "record" in r:
            grouped = re.findall(r"\bby\s*\(([^)]*)\)", expr)
            recorded_labels[r["record"]] = {x.strip() for g in grouped for x in g.split(",") if x.strip()}
        for text in r.get("annotations", {}).values():
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= labels | carried, text
        # label values the gateway really emits
        for value in re.findall(r'route="([^"]+)"', expr):
            assert value in {rt.path for rt in router.routes}, value
        for value in re.findall(r'reason=~?"([^"]+)"', expr):
            reasons = {reason for _, _, reason in STATUS_TABLE if reason} | {"inflight"}
            assert set(value.split("|")) <= reasons, value


# --- the indexer as an Indexed Job

def shard_commands(job: dict) -> list:
    """The `imgsearch index` arguments each pod of the Job runs, parsed by the CLI's own parser."""
    from imgsearch.cli import build_parser

    c = pod_spec(job)["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    out = []
    for k in range(job["spec"]["completions"]):
        declared = {n: str(k) for n, e in env.items()
                    if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                    == "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
        argv = [expand(a, declared) for a in c["command"]]
        assert argv[0] == "imgsearch", argv
        out.append(build_parser().parse_args(argv[1:]))
    return out


@pytest.mark.parametrize("name", ["imgsearch-index", "imgsearch-sync"])
def test_indexed_job_runs_every_shard_once(name, settings_env):
    from imgsearch.indexer.scan import Shard

    job = k8s_obj("Job", name)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    assert pod_spec(job)["restartPolicy"] == "Never"  # what backoffLimitPerIndex requires
    assert spec["maxFailedIndexes"] == 0, "a shard that never succeeds must fail the Job"
    runs = shard_commands(job)
    n = spec["completions"]
    assert [a.shard for a in runs] == [Shard(k, n) for k in range(n)]  # pod K runs shard K of N
    s = gateway_settings(settings_env, job)
    c = pod_spec(job)["containers"][0]
    mounts_ = {m["mountPath"]: m for m in c["volumeMounts"]}
    for a in runs:
        assert str(a.image_root) == str(s.image_root) and mounts_[str(s.image_root)]["readOnly"] is True
        assert not a.recreate and not a.limit and a.no_progress
        assert a.sync == (name == "imgsearch-sync")
    # a process at rest (the gateway's figure), and each decode worker holding one IMGSEARCH_MAX_PIXELS image at its peak
    workers = runs[0].workers
    need = BASE_BYTES + workers * (64 * 2**20 + s.max_pixels * DECODE_BYTES_PER_PIXEL)
    assert quantity(c["resources"]["limits"]["memory"]) >= need
    assert quantity(c["resources"]["requests"]["cpu"]) >= workers


def test_sync_job_is_the_index_job_plus_sync():
    """Same shards, same pods: only the name and --sync differ; and it is not applied with the stack."""
    index = yaml.safe_dump(k8s_obj("Job", "imgsearch-index")).replace("imgsearch-index", "imgsearch-sync")
    sync = k8s_obj("Job", "imgsearch-sync")
    expected = yaml.safe_load(index)
    pod_spec(expected)["containers"][0]["command"].append("--sync")
    assert sync == expected
    assert not any(r.startswith("jobs") for r in kustomization()["resources"])
