"""deploy/kuberay/rayservice.yaml: a KubeRay RayService that serves exactly deploy/flux-dev.yaml, on pods that
give its replicas what the config asks of them (docs/cluster.md, "Kubernetes (KubeRay)")."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]


def rayservice() -> dict:
    return yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())


def containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def test_its_serve_config_is_flux_dev_yaml():
    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((ROOT / "deploy/flux-dev.yaml").read_text())  # same apps, args, deployments
    ServeDeploySchema.model_validate(served)


def test_its_cluster_runs_this_ray_with_a_gpu_worker_group():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    served = ServeDeploySchema.model_validate(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]))
    generators = [d for d in served.applications[0].deployments if d.name.startswith("FluxGenerator-")]
    [gpu] = cluster["workerGroupSpecs"]
    assert gpu["rayStartParams"]["num-gpus"] == "1" and gpu["minReplicas"] >= 1
    [worker] = containers(gpu)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for generator in generators:  # one replica fits a pod: its GPU and CPUs
        assert generator.ray_actor_options.num_gpus == 1
        assert generator.ray_actor_options.num_cpus <= float(worker["resources"]["requests"]["cpu"])
    assert "num-gpus" not in cluster["headGroupSpec"]["rayStartParams"]  # no replica waits for a GPU on the head


def test_every_pod_has_the_key_and_the_shared_storage_the_config_names():
    spec = rayservice()["spec"]
    args = AppArgs.model_validate(yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"])
    pods = [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]
    for pod in pods:
        for container in containers(pod):
            env = {e["name"]: e for e in container.get("env", [])}
            assert "secretKeyRef" in env[args.auth.api_key_env]["valueFrom"]  # from a secret, never inline
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            for path in (args.loras.root, args.loras.cache_dir, args.jobs.store):
                assert any(path.startswith(mount + "/") for mount in mounts), (container["name"], path)
    [worker] = containers(spec["rayClusterConfig"]["workerGroupSpecs"][0])
    assert "secretKeyRef" in {e["name"]: e for e in worker["env"]}["HF_TOKEN"]["valueFrom"]  # FLUX.1-dev is gated
