"""deploy/kubernetes: every manifest valid offline, and consistent with the service and the image.

Kubernetes' own kinds are validated with kubernetes-validate (the API's JSON schemas, bundled)
in strict mode, so a misspelt field fails, against every Kubernetes version it bundles. KEDA's
ScaledObject is a custom resource it has no schema for: its HorizontalPodAutoscaler part
(target, bounds, behaviour, one external metric per trigger) is validated as the
autoscaling/v2 HorizontalPodAutoscaler KEDA makes of it, and the rest against SCALED_OBJECT
below, the fields of KEDA 2.x's keda.sh/v1alpha1 ScaledObject that this file may use.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = sorted({major_minor(v) for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
NAMESPACE = "llava-video"


@cache
def documents(name: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc)


def one(name: str) -> dict:
    (doc,) = documents(name)
    return doc


def kubernetes_manifests() -> list[str]:
    return sorted(
        p.name for p in MANIFESTS.glob("*.yaml") if p.name not in {"kustomization.yaml", "keda-scaledobject.yaml"}
    )


def container() -> dict:
    (spec,) = one("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return spec


def env() -> dict[str, dict]:
    return {item["name"]: item for item in container()["env"]}


def bentofile_envs() -> dict[str, str]:
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    return {item["name"]: item["value"] for item in bentofile["envs"]}


def test_every_manifest_is_checked():
    assert kubernetes_manifests() == [
        "deployment.yaml",
        "namespace.yaml",
        "pvc.yaml",
        "redis.yaml",
        "secret.example.yaml",
        "service.yaml",
    ]


@pytest.mark.parametrize("name", kubernetes_manifests())
def test_manifest_is_valid_for_every_kubernetes_version(name: str):
    for doc in documents(name):
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name} ({doc['kind']}) on Kubernetes {version}: {error.message} at {list(error.path)}")


def test_kustomization_applies_the_core_and_sets_the_image():
    kustomization = one("kustomization.yaml")
    assert kustomization["resources"] == ["namespace.yaml", "pvc.yaml", "redis.yaml", "deployment.yaml", "service.yaml"]
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"] == "llava_video_service"  # the Bento's name, as containerized
    assert isinstance(image["newTag"], str)


def test_everything_lives_in_one_namespace():
    assert one("namespace.yaml")["metadata"]["name"] == NAMESPACE
    for name in [*kubernetes_manifests(), "keda-scaledobject.yaml"]:
        for doc in documents(name):
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == NAMESPACE, name


def test_probes_are_routes_of_the_service_on_its_port():
    """The probe paths are routes of the app `bentoml serve` runs, on the port the Service uses."""
    from _bentoml_impl.server.app import ServiceAppFactory

    import service

    service.LLaVAVideoService.inject_config()  # as `bentoml serve` does before building the app
    app = ServiceAppFactory(service.LLaVAVideoService, is_main=True)()
    routes = {getattr(route, "path", None) for route in app.routes}
    spec = container()
    probes = {kind: spec[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/livez",
    }
    assert {"/readyz", "/livez", "/metrics"} <= routes
    (port,) = spec["ports"]
    assert port == {"name": "http", "containerPort": 3000, "protocol": "TCP"}
    assert all(probe["port"] == "http" for probe in probes.values())
    (service_port,) = one("service.yaml")["spec"]["ports"]
    assert service_port["port"] == 3000 and service_port["targetPort"] == "http"
    annotations = one("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "3000" and annotations["prometheus.io/path"] == "/metrics"


def test_service_selects_the_deployments_pods():
    deployment = one("deployment.yaml")["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    assert one("service.yaml")["spec"]["selector"].items() <= labels.items()
    assert "replicas" not in deployment, "the autoscaler owns the replica count"


def test_startup_allows_the_first_download_and_shutdown_the_requests_in_flight():
    spec = container()
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    pod = one("deployment.yaml")["spec"]["template"]["spec"]
    pre_stop = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 60


def test_api_key_comes_from_the_secret():
    key = env()["LLAVA_API_KEY"]
    assert "value" not in key
    reference = key["valueFrom"]["secretKeyRef"]
    secret = one("secret.example.yaml")
    assert reference == {"name": secret["metadata"]["name"], "key": "LLAVA_API_KEY"}
    assert list(secret["stringData"]) == ["LLAVA_API_KEY"]
    assert "REPLACE-ME" in secret["stringData"]["LLAVA_API_KEY"]
    assert "secret.example.yaml" not in one("kustomization.yaml")["resources"]


def test_model_cache_is_the_claim_mounted_at_hf_home():
    variables = env()
    image = bentofile_envs()
    assert variables["HF_HOME"]["value"] == image["HF_HOME"]
    assert variables["LLAVA_MODEL"]["value"] == image["LLAVA_MODEL"]
    (mount,) = container()["volumeMounts"]
    (volume,) = one("deployment.yaml")["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == one("pvc.yaml")["metadata"]["name"]
    assert Path(variables["HF_HOME"]["value"]).is_relative_to(mount["mountPath"])
    # The image's user (BentoML's, uid 1034) can write to the volume.
    assert one("deployment.yaml")["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 1034


def test_resources_one_gpu_and_what_the_service_declares():
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert "cpu" not in resources["limits"], "a CPU limit would throttle the thread that feeds the GPU"
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bento["service"] == "service:LLaVAVideoService"
    import service

    declared = service.LLaVAVideoService.config["resources"]
    assert declared["gpu"] == 1
    assert resources["requests"]["cpu"] == declared["cpu"]
    assert resources["limits"]["memory"] == declared["memory"]
    assert int(env()["LLAVA_DECODE_WORKERS"]["value"]) <= int(resources["requests"]["cpu"]) - 2


def trigger_schema(kind: str, required: list[str], keys: tuple[str, ...]) -> dict:
    """A KEDA trigger of ``kind``: its string metadata ``keys``, ``required`` among them."""
    return {
        **_OBJECT,
        "required": ["type", "metadata"],
        "properties": {
            "type": {"const": kind},
            "name": {"type": "string"},
            "metricType": {"enum": ["AverageValue", "Value"]},
            "metadata": {
                **_OBJECT,
                "required": required,
                "properties": {key: {"type": "string"} for key in keys},
            },
        },
    }


_OBJECT = {"type": "object", "additionalProperties": False}
PROMETHEUS_TRIGGER = trigger_schema(
    "prometheus",
    ["serverAddress", "query", "threshold"],
    (
        "serverAddress",
        "query",
        "threshold",
        "activationThreshold",
        "namespace",
        "ignoreNullValues",
        "unsafeSsl",
        "timeout",
    ),
)
# KEDA's redis-streams scaler on the stream's length (XLEN), not its consumer group's pending entries.
REDIS_STREAMS_TRIGGER = trigger_schema(
    "redis-streams",
    ["address", "stream", "streamLength"],
    ("address", "stream", "streamLength", "activationStreamLength", "databaseIndex", "passwordFromEnv", "enableTLS"),
)

# KEDA 2.x keda.sh/v1alpha1 ScaledObject: the fields this project may use, nothing else (the
# cluster would prune an unknown field without a word), and the triggers' metadata.
SCALED_OBJECT = {
    **_OBJECT,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            **_OBJECT,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    **_OBJECT,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {
                    **_OBJECT,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            **_OBJECT,
                            # behavior is checked as the HorizontalPodAutoscaler's own, below
                            "properties": {"behavior": {"type": "object"}, "name": {"type": "string"}},
                        },
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"oneOf": [PROMETHEUS_TRIGGER, REDIS_STREAMS_TRIGGER]},
                },
            },
        },
    },
}


def scaled_object() -> dict:
    return one("keda-scaledobject.yaml")


def test_scaled_object_structure():
    jsonschema.Draft202012Validator.check_schema(SCALED_OBJECT)
    errors = sorted(jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(scaled_object()), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    for trigger in scaled_object()["spec"]["triggers"]:
        assert float(threshold(trigger)) > 0
        if trigger["type"] == "prometheus":
            assert trigger["metadata"]["serverAddress"].startswith("http")


def threshold(trigger: dict) -> str:
    return trigger["metadata"]["threshold" if trigger["type"] == "prometheus" else "streamLength"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_scaled_object_makes_a_valid_horizontal_pod_autoscaler(version: str):
    """What KEDA hands to Kubernetes: an autoscaling/v2 HPA with one external metric per trigger."""
    spec = scaled_object()["spec"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{scaled_object()['metadata']['name']}", "namespace": NAMESPACE},
        "spec": {
            "scaleTargetRef": spec["scaleTargetRef"],
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": f"s{i}-prometheus"},
                        "target": {"type": trigger["metricType"], "averageValue": threshold(trigger)},
                    },
                }
                for i, trigger in enumerate(spec["triggers"])
            ],
        },
    }
    kubernetes_validate.validate(hpa, version, strict=True)


def test_scaled_object_scales_the_deployment_on_the_queue_gauges():
    spec = scaled_object()["spec"]
    deployment = one("deployment.yaml")
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert spec["minReplicaCount"] >= 1, "no scale to zero: a cold start loads the model for minutes"
    triggers = {trigger["name"]: trigger for trigger in spec["triggers"]}
    assert set(triggers) == {"queue", "load", "segments"}
    queue, load = triggers["queue"], triggers["load"]
    waiting, running = (f'sum(llava_requests_{gauge}{{namespace="{NAMESPACE}"}})' for gauge in ("waiting", "running"))
    assert queue["metadata"]["query"] == waiting
    assert load["metadata"]["query"] == f"{running} + {waiting}"
    assert {queue["metricType"], load["metricType"]} == {"AverageValue"}  # per replica
    # More than ~2 waiting per replica; the load threshold is a full batch plus that queue.
    batch = int(env()["LLAVA_MAX_BATCH_SIZE"]["value"])
    assert float(queue["metadata"]["threshold"]) == 2
    assert float(load["metadata"]["threshold"]) == batch + 2
    # The queue can grow past its threshold before requests are refused (503).
    assert int(env()["LLAVA_MAX_PENDING_REQUESTS"]["value"]) > float(queue["metadata"]["threshold"])


def test_replicas_share_jobs_through_the_redis_the_scaler_reads():
    """The deployment's LLAVA_REDIS_URL is the Redis Service; KEDA reads the stream the service
    puts segments on, on that same Redis; the Redis keeps its data on a volume (append-only file)."""
    from jobs.redis_store import SegmentQueue
    from jobs.shared import COMMON_STREAM
    from settings import Settings

    service, statefulset = documents("redis.yaml")
    assert (service["kind"], statefulset["kind"]) == ("Service", "StatefulSet")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    url = env()["LLAVA_REDIS_URL"]["value"]
    assert url == f"redis://{service['metadata']['name']}:{port['port']}/0"
    assert Settings(redis_url=url).shared_jobs().redis_url == url  # a URL the settings accept
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    assert redis["args"][redis["args"].index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["volumeMounts"][0]["name"] == statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    # Uploads on the ReadWriteMany volume: every replica reads them.
    assert (
        env()["LLAVA_JOB_DIR_SHARED"]["value"] == "true" and "ReadWriteMany" in one("pvc.yaml")["spec"]["accessModes"]
    )
    (segments,) = [t for t in scaled_object()["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert segments["metadata"]["address"] == f"{service['metadata']['name']}.{NAMESPACE}.svc:{port['port']}"
    assert segments["metadata"]["stream"] == SegmentQueue(None).key(COMMON_STREAM)  # type: ignore[arg-type]
