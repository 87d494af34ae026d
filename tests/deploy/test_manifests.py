"""Compose and Kubernetes configs: they validate with the real tools and keep their promises."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from redis import Redis

from contract.queueing import worker_queues
from contract.settings import TINY_MODEL_NAME, Settings
from service.routes import operations
from service.worker_demand import WorkerDemand

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 1800


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it with apt-get as root)")
    return path


def _kustomize(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [_tool("kubectl"), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def _compose_config(profile: str) -> dict[str, Any]:
    """docker-compose.yml as `docker-compose --profile P config` resolves it (validation only)."""
    done = subprocess.run(
        [_tool("docker-compose"), "--profile", profile, "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_pulls_pinned_images_from_registries_that_serve_them() -> None:
    # MinIO left Docker Hub in September 2026: `minio/minio:latest` stopped every fresh
    # `compose up` at the pull (api and workers wait on minio-init).
    services = _compose_config("gpu")["services"]
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    built = {s["image"] for s in services.values() if "build" in s}
    third_party = {name: image for name, image in pulled.items() if image not in built}
    assert set(third_party) == {"redis", "minio", "minio-init"}, third_party
    for name, image in third_party.items():
        assert not image.startswith(("minio/", "docker.io/minio/")), (name, image)
        assert ":" in image and not image.endswith(":latest"), (name, image)
    # The webhook sender serves no HTTP: the API image's health check cannot apply to it.
    assert services["webhooks"]["healthcheck"] == {"test": ["NONE"]}  # compose's "disable"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_validates(profile: str) -> None:
    services = _compose_config(profile)["services"]
    worker = services["worker" if profile == "gpu" else "worker-cpu"]
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["minio"] and "healthcheck" in services["redis"]
    assert services["api"]["environment"]["SELFCASCADE_AUTH_MODE"] == "keys"
    assert services["webhooks"]["command"] == ["selfcascade-webhooks"]
    if profile == "gpu":
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    # Without a models file the settings look for the demo model relative to the working
    # directory: the API and the worker must both see ./models there, or the worker serves
    # the tiny random model and the API validates against another one.
    assert "SELFCASCADE_MODELS_FILE" not in worker["environment"]
    demo_dir: Path = Settings.model_fields["demo_model_dir"].default  # models/demo
    upsamplers: list[Path] = Settings.model_fields["demo_upsamplers"].default
    assert {path.parent for path in upsamplers} == {demo_dir.parent}
    models_dir = _workdir("worker.Dockerfile") / demo_dir.parent
    assert _workdir("api.Dockerfile") / demo_dir.parent == models_dir
    for name in ("api", "worker" if profile == "gpu" else "worker-cpu"):
        assert _mounts(services[name])[str(models_dir)] == (str(ROOT / "models"), True)


def _workdir(dockerfile: str) -> Path:
    lines = (ROOT / "docker" / dockerfile).read_text().splitlines()
    [workdir] = [line.split()[1] for line in lines if line.startswith("WORKDIR ")]
    return Path(workdir)


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Target -> (source, read-only) of a service's volumes, from either syntax `config` prints
    (docker-compose 1.x: "src:target:ro"; Compose v2: {source, target, read_only})."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        else:
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


def test_gpu_overlay_scales_workers_to_zero() -> None:
    scaled = _find(_kustomize("gpu"), "ScaledObject", "selfcascade-worker")
    assert scaled["spec"]["minReplicaCount"] == 0


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_workers_scale_on_the_queues_of_the_models_they_serve(overlay: str) -> None:
    docs = _kustomize(overlay)
    scaled = _find(docs, "ScaledObject", "selfcascade-worker")
    lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    # Exactly the Redis lists of the queues the workers listen to, for the models they serve.
    settings = Settings(redis_prefix="selfcascade", queue_name="generations")
    expected = {queue.key for queue in worker_queues(Redis(), settings, _served_models(docs))}
    assert lists == expected


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_workers_scale_on_the_jobs_in_flight_the_api_counts(overlay: str) -> None:
    """The metrics-api trigger reaches the API's Service from KEDA's namespace, at a route the
    app serves, and reads a field that route answers with, one worker per job in flight."""
    docs = _kustomize(overlay)
    scaled = _find(docs, "ScaledObject", "selfcascade-worker")
    [trigger] = [t for t in scaled["spec"]["triggers"] if t["type"] == "metrics-api"]
    meta = trigger["metadata"]
    url = urlsplit(meta["url"])
    service = _find(docs, "Service", "selfcascade-api")
    namespace = service["metadata"]["namespace"]
    assert url.hostname == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert (url.port or 80) in {port["port"] for port in service["spec"]["ports"]}
    assert not parse_qs(url.query)  # every model the API's models file lists: the pool's
    assert url.path in {getattr(route, "path", None) for route in operations.router.routes}
    assert meta["valueLocation"] in {"in_flight"} & set(dir(WorkerDemand))
    assert (meta["targetValue"], meta["activationTargetValue"]) == ("1", "0")


def _served_models(docs: list[dict[str, Any]]) -> list[str]:
    """The models file's names; without one, the tiny model, however the worker image was
    built: the demo model's folder must then point where no image holds one (a worker built
    with --build-arg MODELS=models holds models/demo, the API image never does)."""
    settings = _find(docs, "ConfigMap", "selfcascade-settings")["data"]
    if "SELFCASCADE_MODELS_FILE" not in settings:
        assert settings["SELFCASCADE_DEMO_MODEL_DIR"] == "/app/no-demo-model"
        return [TINY_MODEL_NAME]
    models = json.loads(_find(docs, "ConfigMap", "selfcascade-models")["data"]["models.json"])
    return [entry["name"] for entry in models["models"]]


def test_gpu_workers_ask_for_a_gpu_and_outlive_the_job_timeout() -> None:
    docs = _kustomize("gpu")
    worker = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= JOB_TIMEOUT_S
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Deployment"):
        _find(docs, kind, "selfcascade-api")
    _find(docs, "Deployment", "selfcascade-webhooks")
    settings = _find(docs, "ConfigMap", "selfcascade-settings")["data"]
    assert settings["SELFCASCADE_AUTH_MODE"] == "keys"
    # The UNet compiles at load: a valid setting, and the start-up probe waits for it.
    compile_scale = Settings(torch_compile_scale=settings["SELFCASCADE_TORCH_COMPILE_SCALE"])
    assert compile_scale.torch_compile_scale == 4
    # Triton needs a C compiler, which the PyTorch runtime base images lack: without it the
    # compile fails at load and the UNet runs eager after all.
    assert "gcc" in (ROOT / "docker" / "worker.Dockerfile").read_text(encoding="utf-8")
    probe = worker["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 15 * 60


def test_cpu_overlay_drops_the_gpu_and_the_models_file() -> None:
    docs = _kustomize("cpu-dev")
    worker = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(worker["containers"][0]["resources"])
    settings = _find(docs, "ConfigMap", "selfcascade-settings")["data"]
    assert "SELFCASCADE_MODELS_FILE" not in settings


OVERLAYS = ["gpu", "cpu-dev"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_their_replicas_to_the_autoscaler(overlay: str) -> None:
    """A Deployment sets replicas exactly when no autoscaler owns it: otherwise every apply
    resets the live count (workers 8 -> 1, or 0 -> 1 waking a GPU for nothing)."""
    docs = _kustomize(overlay)
    owned = {
        doc["spec"]["scaleTargetRef"]["name"]
        for doc in docs
        if doc["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        and doc["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    }
    assert {"selfcascade-api", "selfcascade-worker"} <= owned
    for doc in docs:
        if doc["kind"] == "Deployment":
            name = doc["metadata"]["name"]
            assert ("replicas" in doc["spec"]) == (name not in owned), name
    hpa = _find(docs, "HorizontalPodAutoscaler", "selfcascade-api")
    scaled = _find(docs, "ScaledObject", "selfcascade-worker")
    # The autoscalers' minimums are what a fresh apply starts from.
    assert hpa["spec"]["minReplicas"] >= 1
    assert scaled["spec"]["minReplicaCount"] == (0 if overlay == "gpu" else 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_volumes_never_hide_the_baked_models(overlay: str) -> None:
    docs = _kustomize(overlay)
    container = _find(docs, "Deployment", "selfcascade-worker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    # Where the settings look without a models file (models/demo and its upsamplers, relative
    # to the image's working directory), and where the worker image bakes ./models.
    demo_dir: Path = Settings.model_fields["demo_model_dir"].default
    baked = _workdir("worker.Dockerfile") / demo_dir.parent
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert f"COPY --chown=app ${{MODELS}} {baked}" in dockerfile
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    for mount in mounts:
        assert not baked.is_relative_to(mount), f"{mount} hides {baked}"
    # The model cache volume is the Hugging Face cache, nothing above it.
    [cache] = [m for m in container["volumeMounts"] if m["name"] == "model-cache"]
    assert cache["mountPath"] == env["HF_HOME"] == "/models/hf-cache"
    assert "HF_HOME=/models/hf-cache" in dockerfile


# KEDA's kinds are custom resources: kubernetes-validate ships schemas for the core API only.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}
KUBERNETES_VERSION = "1.31"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_core_resources_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    from kubernetes_validate import validate

    docs = _kustomize(overlay)
    core = [doc for doc in docs if doc["kind"] not in CUSTOM_KINDS]
    assert {doc["kind"] for doc in core} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
    }
    for doc in core:
        validate(doc, KUBERNETES_VERSION, strict=True)  # raises naming the bad field


def test_production_ships_no_secret_and_the_example_names_every_key() -> None:
    """An applied placeholder Secret replaced the real one (Redis, S3, API keys gone on the next
    restart, a guessable key valid): only the dev overlay ships one. The keys the manifests read
    are all in the example env file that production creates its Secret from."""
    example = (ROOT / "deploy" / "secrets.example.env").read_text(encoding="utf-8")
    keys = {
        line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    assert not [d for d in _kustomize("gpu") if d["kind"] == "Secret"]
    [dev] = [d for d in _kustomize("cpu-dev") if d["kind"] == "Secret"]
    assert set(dev["stringData"]) <= keys
    auth = _find(_kustomize("gpu"), "TriggerAuthentication", "selfcascade-redis")
    assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(overlay: str) -> None:
    """What a namespace enforcing Pod Security "restricted" asks of each pod and container."""
    for doc in _kustomize(overlay):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
