"""deploy/: every manifest, cluster config, the Dockerfile and the README checked offline.

No Kubernetes client, cluster, registry or AWS account is used. KubeRay objects (their pod
templates included) are validated with jsonschema against the ``openAPIV3Schema`` of KubeRay's
own published CRDs (vendored under ``kuberay_schema/``), closed so that an unknown field, a typo,
fails. ``cluster.yaml`` is checked by Ray's own ``ray-schema.json`` through ``prepare_config`` +
``validate_config``. Every ``python -m`` command shown anywhere under deploy/ is parsed by the
module's own argument parser and its config loaded (a sweep's whole grid validated), as the real
command would. The rest are raygan's rules, which no schema states.

Each check is a function returning a list of problems; the positive tests want none, the
negative tests break a copy of a real manifest and want the check to notice.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # deploy/ is not an installed package: `python -m` from the root
    sys.path.insert(0, str(REPO))

DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
CONFIG_YAML = KUBERAY / "config.yaml"
RAYCLUSTER_YAML = KUBERAY / "raycluster.yaml"
RAYJOB_YAMLS = (KUBERAY / "rayjob-train.yaml", KUBERAY / "rayjob-sweep.yaml")
AWS_YAML = DEPLOY / "aws" / "cluster.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
README = DEPLOY / "README.md"
YAML_FILES = (CONFIG_YAML, RAYCLUSTER_YAML, *RAYJOB_YAMLS, AWS_YAML)

CONFIG_MAP = "raygan-config"
SECRET = "raygan-credentials"
# Ray's auth token: required (token auth stays on), created with `kubectl create secret` and
# named in every cluster spec's ``authOptions.secretName``. ``auth_token`` is the data key KubeRay
# reads (``utils.RAY_AUTH_TOKEN_SECRET_KEY`` in ray-operator, v1.6.0 to v1.7.0).
TOKEN_SECRET = "raygan-ray-token"
TOKEN_KEY = "auth_token"
# What KubeRay puts into the Ray containers, the autoscaler and the submitter when authOptions
# is on, each only where the container does not set it (``SetContainerTokenAuthEnvVars``): one set
# in a manifest shadows the operator's, so a manifest sets none of them.
KUBERAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_K8S_TOKEN_AUTH")
# KubeRay refuses authOptions.mode token below this Ray (``ValidateRayClusterSpec``).
TOKEN_AUTH_MIN_RAY = (2, 52, 0)
CREDENTIAL_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
GPU = "nvidia.com/gpu"
PLACEHOLDER = "REPLACE_ME"
SECRET_EXAMPLE = re.compile(
    r"^# --- begin example Secret ---\n(.*?)^# --- end example Secret ---$", re.M | re.S
)


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


RAY_VERSION = pinned("ray")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"


# ---------------------------------------------------------------- the schema (KubeRay's own CRDs)

# The openAPIV3Schema of KubeRay's published ray.io/v1 CRDs (release v1.7.0, the version
# deploy/README.md installs), extracted by kuberay_schema/extract.py; see kuberay_schema/README.md.
SCHEMA_DIR = Path(__file__).resolve().parent / "kuberay_schema"
CRD_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
# config.yaml's core/v1 objects: no CRD describes them; their few top-level fields are listed.
CORE_FIELDS = {
    "ConfigMap": {"apiVersion", "kind", "metadata", "data"},
    "ServiceAccount": {"apiVersion", "kind", "metadata"},
    "Secret": {"apiVersion", "kind", "metadata", "type", "stringData"},
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Every resource name a container here may ask for. A typo such as `nvidia/gpu` is a valid
# extended-resource name to Kubernetes (the pod would wait for a node offering it), and the
# GPU checks below count nvidia.com/gpu only.
KNOWN_RESOURCES = {"cpu", "memory", "ephemeral-storage", GPU}


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its
    ``properties`` and does not say ``x-kubernetes-preserve-unknown-fields``.

    A structural schema names fields but forbids none: the API server prunes an unknown field,
    and refuses it only when the client asks for strict field validation. A ``workerGroupSpec:``
    (for ``workerGroupSpecs``) pruned gives a head-only cluster; closed, the schema makes such a
    typo an error here. (jsonschema ignores the ``x-kubernetes-*`` keywords, CEL rules included.)
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [closed(sub) for sub in out[key]]
    return out


def published_schema(kind: str) -> dict[str, Any]:
    return json.loads(gzip.decompress((SCHEMA_DIR / f"{kind}.v1.json.gz").read_bytes()))


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0's schema object is JSON Schema draft wright-00, whose keywords are draft 4's.
    return jsonschema.Draft4Validator(closed(published_schema(kind)))


def core_problems(doc: dict[str, Any]) -> list[str]:
    kind = doc["kind"]
    problems = [f"{kind}: unknown field {key!r}" for key in sorted(set(doc) - CORE_FIELDS[kind])]
    if doc.get("apiVersion") != "v1":
        problems.append(f"{kind}: apiVersion {doc.get('apiVersion')!r} is not v1")
    # envFrom makes the keys variables, which the RayJobs' entrypoints expand in a shell.
    for field in ("data", "stringData"):
        for key, value in (doc.get(field) or {}).items():
            if not ENV_NAME.match(key) or not isinstance(value, str):
                problems.append(f"{kind} {field}.{key}: not a variable name with a string value")
    return problems


def schema_problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return [f"a {type(doc).__name__}, not a Kubernetes object"]
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
        return [
            f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message[:300]}"
            for err in crd_validator(doc["kind"]).iter_errors(doc)
        ]
    if doc.get("kind") in CORE_FIELDS:
        return core_problems(doc)
    return [f"no schema for {doc.get('apiVersion')!r} {doc.get('kind')!r}"]


# ---------------------------------------------------------------- loading


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in (CONFIG_YAML, RAYCLUSTER_YAML, *RAYJOB_YAMLS)
        for i, doc in enumerate(load_docs(path))
    ]


def secret_example() -> dict[str, Any]:
    """The example Secret that config.yaml carries as a comment (applying it would be harmful)."""
    found = SECRET_EXAMPLE.search(CONFIG_YAML.read_text())
    assert found, f"{CONFIG_YAML.name} has no '# --- begin/end example Secret ---' block"
    lines = [re.sub(r"^# ?", "", line) for line in found.group(1).splitlines()]
    return yaml.safe_load("\n".join(lines))


def config_objects() -> dict[str, dict[str, Any]]:
    """config.yaml's objects (and the example Secret) by kind."""
    objects = {doc["kind"]: doc for doc in load_docs(CONFIG_YAML)}
    objects["Secret"] = secret_example()
    return objects


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if doc.get("kind") == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]
    if doc.get("kind") in ("RayCluster", "RayJob"):
        spec = cluster_spec(doc)
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            yield f"{where} container {container['name']}", container


def looks_like_credential(name: str) -> bool:
    return any(word in name.upper() for word in CREDENTIAL_WORDS)


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)
    elif isinstance(node, str):
        yield node


def gpus(resources: dict[str, Any], section: str = "limits") -> int:
    return int(resources.get(section, {}).get(GPU, 0))


# ---------------------------------------------------------------- the checks


def pod_problems(doc: dict[str, Any]) -> list[str]:
    """Every container names its image and sets limits (KubeRay derives Ray's num-cpus, num-gpus
    and memory from them) in resources this project knows: what the schema leaves optional."""
    problems = []
    for where, container in containers(doc):
        if not container.get("image"):
            problems.append(f"{where}: no image")
        resources = container.get("resources", {})
        if not resources.get("limits"):
            problems.append(f"{where}: no resources.limits")
        for section in ("limits", "requests"):
            for name in set(resources.get(section, {})) - KNOWN_RESOURCES:
                problems.append(f"{where}: unknown resource {name!r} in {section}")
    return problems


def credential_problems(doc: dict[str, Any]) -> list[str]:
    """Credentials only by reference: from the Secret, never as values, never in runtime envs."""
    problems = [
        f"a string shaped like an AWS access key id: {text[:8]}..."
        for text in strings_in(doc)
        if AWS_KEY_ID.search(text)
    ]
    for where, container in containers(doc):
        for env in container.get("env", []):
            if not looks_like_credential(env["name"]):
                continue
            if "value" in env:
                problems.append(f"{where}: {env['name']} has a plaintext value; use secretKeyRef")
            elif "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{where}: {env['name']} must come from a Secret (secretKeyRef)")
    if doc.get("kind") == "ConfigMap":
        problems += [
            f"ConfigMap {doc['metadata']['name']}: {key} looks like a credential; use the Secret"
            for key in doc.get("data", {})
            if looks_like_credential(key)
        ]
    runtime_env = doc.get("spec", {}).get("runtimeEnvYAML") if doc.get("kind") == "RayJob" else None
    if runtime_env:
        # The jobs API shows a runtime env to anyone who can read the job.
        env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars", {})
        problems += [
            f"runtimeEnvYAML env_vars.{name}: credentials do not belong in a runtime env"
            for name in env_vars
            if looks_like_credential(name)
        ]
    return problems


def cluster_problems(doc: dict[str, Any], config: dict[str, dict[str, Any]]) -> list[str]:
    """The cluster's shape and its references to config.yaml's objects."""
    spec = cluster_spec(doc)
    problems: list[str] = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(
            f"rayVersion {spec.get('rayVersion')!r} != ray=={RAY_VERSION} (constraints)"
        )
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true (workers between min and max)")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    if gpus(head["resources"]):
        problems.append("the head asks for a GPU: it should stay a CPU node")
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        name, low, high = group["groupName"], group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            problems.append(
                f"worker group {name}: not minReplicas {low} <= replicas {replicas}"
                f" <= maxReplicas {high}"
            )
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if gpus(resources) >= 1:
            gpu_groups += 1
            if "requests" in resources and gpus(resources, "requests") != gpus(resources):
                problems.append(f"worker group {name}: {GPU} requests != limits")
            if high < 1:
                problems.append(f"worker group {name}: maxReplicas 0 never gives a GPU")
    if not gpu_groups:
        problems.append(f"no worker group requests {GPU} in its limits")
    images = {c.get("image") for _, c in containers(doc)}
    if len(images) != 1:
        problems.append(f"all containers should run the one project image, found {sorted(images)}")
    account = config["ServiceAccount"]["metadata"]["name"]
    secret_keys = set(config["Secret"]["stringData"])
    for where, template in pod_templates(doc):
        used = template["spec"].get("serviceAccountName")
        if used not in (None, account):
            problems.append(f"{where}: serviceAccountName {used!r} is not defined in config.yaml")
    for where, container in containers(doc):
        for source in container.get("envFrom", []):
            if source.get("configMapRef", {"name": CONFIG_MAP})["name"] != CONFIG_MAP:
                problems.append(f"{where}: envFrom a ConfigMap other than {CONFIG_MAP}")
            if source.get("secretRef", {"name": SECRET})["name"] != SECRET:
                problems.append(f"{where}: envFrom a Secret other than {SECRET}")
        for env in container.get("env", []):
            selector = env.get("valueFrom", {}).get("secretKeyRef")
            if selector and (selector["name"] != SECRET or selector["key"] not in secret_keys):
                problems.append(
                    f"{where}: {env['name']} reads {selector['name']}/{selector['key']},"
                    f" which the example Secret {SECRET} in config.yaml does not describe"
                )
            if selector and selector.get("optional") is not True:
                problems.append(f"{where}: {env['name']} must be optional (IRSA needs no Secret)")
    return problems


def token_auth_problems(doc: dict[str, Any]) -> list[str]:
    """Ray's token auth switched on KubeRay's way, and the old pod-env way gone.

    With ``authOptions: {mode: token, secretName: ...}`` the operator itself reads the Secret's
    ``auth_token`` for its job-status calls and puts the token into every Ray container, the
    autoscaler sidecar and the RayJob submitter. Set only as pod env vars (the old way), Ray
    enforces the token but the operator and the autoscaler do not have it.
    """
    spec = cluster_spec(doc)
    auth = spec.get("authOptions") or {}
    problems = []
    if auth.get("mode") != "token":
        problems.append(
            f"authOptions.mode is {auth.get('mode')!r}, not 'token': KubeRay's operator and"
            " autoscaler get no token (or Ray's token auth is off)"
        )
    if auth.get("secretName") != TOKEN_SECRET:
        problems.append(
            f"authOptions.secretName is {auth.get('secretName')!r}, not {TOKEN_SECRET!r}"
            f" (the Secret with key {TOKEN_KEY} that config.yaml and deploy/README.md create)"
        )
    if auth.get("enableK8sTokenAuth"):
        problems.append(
            "authOptions.enableK8sTokenAuth: KubeRay refuses it with secretName and in a RayJob"
        )
    version = tuple(int(part) for part in str(spec.get("rayVersion", "0.0.0")).split("."))
    if version < TOKEN_AUTH_MIN_RAY:
        problems.append(f"rayVersion {spec.get('rayVersion')}: KubeRay's token auth needs 2.52.0+")
    for where, container in containers(doc):
        for env in container.get("env", []):
            selector = env.get("valueFrom", {}).get("secretKeyRef", {})
            if env["name"] in KUBERAY_AUTH_ENV:
                problems.append(
                    f"{where}: sets {env['name']} itself; KubeRay sets it from authOptions and"
                    " skips a container that already has it (the old way shadows the new)"
                )
            elif selector.get("name") == TOKEN_SECRET:
                problems.append(f"{where}: {env['name']} reads Ray's token; only KubeRay should")
        for source in container.get("envFrom", []):
            if source.get("secretRef", {}).get("name") == TOKEN_SECRET:
                problems.append(f"{where}: envFrom {TOKEN_SECRET}; KubeRay passes the token")
    return problems


_TOKEN_SECRET_KEY_USE = re.compile(
    rf"{TOKEN_SECRET}\b[^\n]*?(?:--from-literal=|--from-file=|\.data\.)(\w+)"
)


def token_secret_keys(text: str) -> list[str]:
    """The data keys that the commands in ``text`` give or read in the token Secret."""
    return _TOKEN_SECRET_KEY_USE.findall(text.replace("\\\n", " "))


def gpu_capacity(spec: dict[str, Any]) -> int:
    return sum(
        gpus(g["template"]["spec"]["containers"][0]["resources"])
        * g["maxReplicas"]
        * g.get("numOfHosts", 1)
        for g in spec["workerGroupSpecs"]
    )


def container_env(container: dict[str, Any], configmap: dict[str, Any]) -> dict[str, str]:
    """What a container's shell can expand: literal env values and the ConfigMap's keys."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if source.get("configMapRef", {}).get("name") == configmap["metadata"]["name"]:
            env.update(configmap["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


_VAR = re.compile(r"\$\{(\w+)(?::[?-][^}]*)?\}|\$(\w+)")


def expand(command: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """``command`` with $NAME / ${NAME} / ${NAME:?...} replaced from ``env``; the names missing."""
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            missing.append(name)
            return match.group(0)
        return env[name]

    return _VAR.sub(value, command), missing


_PYTHON_M = re.compile(r"(?:^|(?<=[\s/`]))python3?\s+-m\s+([\w.]+)(.*)$")
_COMMAND_END = re.compile(r"\s+#\s|;|&&|\|\||\||`|\s\d?>")


def python_commands(text: str) -> list[str]:
    """Every ``python -m MODULE ARGS`` in shell-like text (continuation lines joined)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        found = _PYTHON_M.search(line)
        if found:
            args = _COMMAND_END.split(found.group(2))[0].split()
            commands.append(" ".join(["python", "-m", found.group(1), *args]))
    return commands


class _NoStorage:
    """Stands in for the sweep's storage: make_plan validates everything but opens nothing."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def exists(self, relpath: str) -> bool:
        return False


@contextmanager
def _offline_storage() -> Iterator[None]:
    def fake(cfg: Any) -> _NoStorage:
        return _NoStorage(cfg.uri)

    with (
        mock.patch("tuning.plan.open_storage", fake),
        mock.patch("tuning.sweep.open_storage", fake),
    ):
        yield


def command_problems(command: str, env: dict[str, str] | None = None) -> list[str]:
    """A ``python -m ...`` command as its module would take it, short of running anything."""
    from gan_core.config import ConfigError, load_config

    command, missing = expand(command, env or {})
    if missing:
        return [f"{command}: ${', $'.join(missing)} is not set where the command runs"]
    words = shlex.split(command)
    if words[:2] != ["python", "-m"] or len(words) < 3:
        return [f"{command}: not a `python -m MODULE` command"]
    module, args = words[2], words[3:]
    if importlib.util.find_spec(module) is None:
        return [f"{command}: no module {module}"]
    if "--help" in args or module not in ("services.train", "tuning.sweep"):
        return []
    try:
        if module == "services.train":
            from services.train import parse_args

            ns = parse_args(args)
            load_config(ns.config, ns.overrides)
        else:
            from tuning.sweep import parse_args as sweep_args
            from tuning.sweep import plan_from_args

            ns = sweep_args(args)
            if ns.resume:
                load_config(ns.config, ns.overrides)
            else:
                with _offline_storage():
                    plan_from_args(ns)
    except SystemExit as exc:  # argparse refused the arguments (it printed why to stderr)
        return [f"{command}: {module} refuses its arguments (exit {exc.code})"]
    except ConfigError as exc:
        return [f"{command}: {exc}"]
    return []


def job_fit_problems(command: str, gpu_slots: int, env: dict[str, str] | None = None) -> list[str]:
    """A GPU job that the cluster's GPU workers can hold: use_gpu on, workers <= GPUs."""
    from gan_core.config import load_config

    words = shlex.split(expand(command, env or {})[0])
    module, args = words[2], words[3:]
    if module == "services.train":
        from services.train import parse_args

        ns = parse_args(args)
        cfg = load_config(ns.config, ns.overrides)
        workers, use_gpu = cfg.resources.num_workers, cfg.resources.use_gpu
    elif module == "tuning.sweep":
        from tuning.sweep import parse_args as sweep_args

        ns = sweep_args(args)
        cfg = load_config(ns.config, ns.overrides)
        if ns.max_concurrent < 1:
            return [f"{command}: give --max-concurrent (its default counts the CPUs at start)"]
        workers, use_gpu = ns.max_concurrent * ns.workers_per_trial, cfg.resources.use_gpu
    else:
        return []
    problems = []
    if not use_gpu:
        problems.append(f"{command}: resources.use_gpu=true is missing on a GPU cluster")
    if workers > gpu_slots:
        problems.append(
            f"{command}: needs {workers} GPU workers at once, the cluster has {gpu_slots}"
        )
    return problems


def rayjob_problems(
    job: dict[str, Any], raycluster: dict[str, Any], configmap: dict[str, Any]
) -> list[str]:
    spec = job["spec"]
    problems = []
    if spec.get("rayClusterSpec") != raycluster["spec"]:
        problems.append("rayClusterSpec differs from raycluster.yaml's spec")
    if "clusterSelector" in spec:
        problems.append("clusterSelector: the job brings its own cluster (rayClusterSpec)")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(
            "submissionMode must be K8sJobMode (the submitter's shell expands the entrypoint)"
        )
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (or the GPU cluster stays up)")
    if spec.get("ttlSecondsAfterFinished", 0) <= 0:
        problems.append("ttlSecondsAfterFinished must be > 0 (time to read the logs)")
    # In K8sJobMode the submitter's shell expands the entrypoint: its env must define the names.
    submitter = spec.get("submitterPodTemplate", {"spec": {"containers": [{}]}})
    env = container_env(submitter["spec"]["containers"][0], configmap)
    _, missing = expand(spec["entrypoint"], env)
    problems += [
        f"entrypoint uses ${name}, which the submitter pod does not set" for name in missing
    ]
    return problems


def aws_problems(config: dict[str, Any]) -> list[str]:
    """Ray's own schema and checks for `ray up` configs, plus this project's rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError, KeyError) as exc:
        return [f"Ray refuses the config: {str(exc).splitlines()[0]}"]
    problems = []
    provider = config["provider"]
    if provider.get("type") != "aws" or not provider.get("region"):
        problems.append("provider must be aws with a region")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if not head["node_config"].get("InstanceType", "").startswith(("m5.", "m6i.", "m7i.")):
        problems.append("the head should be a general-purpose CPU instance (m5/m6i/m7i)")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {
        name: t
        for name, t in workers.items()
        if t["node_config"].get("InstanceType", "").startswith(("g4dn.", "g5.", "g6.", "p3.", "p4"))
    }
    if not gpu_workers:
        problems.append("no GPU worker node type (g4dn/g5/g6/p3/p4)")
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if not 0 <= low <= high <= config["max_workers"]:
            problems.append(f"{name}: not 0 <= min_workers {low} <= max_workers {high} <= global")
    for name, node_type in types.items():
        if "IamInstanceProfile" not in node_type["node_config"]:
            problems.append(f"{name}: no IamInstanceProfile (credentials come from the role)")
    for text in strings_in(config):
        if AWS_KEY_ID.search(text) or re.search(r"aws_(secret_)?access_key", text, re.I):
            problems.append(f"an AWS key in the config: {text[:40]}...")
    image = config.get("docker", {}).get("image", "")
    if image != RAY_GPU_IMAGE:
        problems.append(f"docker.image {image!r} != {RAY_GPU_IMAGE} (ray pinned in constraints)")
    setup = " && ".join(config.get("setup_commands", []))
    if not re.search(r"grep -v '\^torch==' \S*constraints\.txt", setup):
        problems.append("setup_commands must drop the CPU torch pin from constraints.txt")
    if not re.search(r"pip install .*-c \S+ -e \S*raygan", setup):
        problems.append("setup_commands must install the project with the pinned constraints")
    mounted = {Path(local).as_posix() for local in config.get("file_mounts", {}).values()}
    for needed in ("pyproject.toml", "constraints.txt", "gan_core", "services", "tuning"):
        if needed not in mounted:
            problems.append(f"file_mounts must copy {needed} of this checkout to the nodes")
    for bad in (".", ".venv", "runs", "mlruns"):
        if bad in mounted:
            problems.append(f"file_mounts copies {bad!r} (ray up hashes and syncs all of it)")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    steps = dockerfile_instructions(text)
    problems = []
    bases = [rest for ins, rest in steps if ins == "FROM"]
    if bases != [RAY_GPU_IMAGE]:
        problems.append(f"FROM {bases} != [{RAY_GPU_IMAGE}] (ray pinned in constraints.txt)")
    runs = " && ".join(rest for ins, rest in steps if ins == "RUN")
    if not re.search(r"grep -v '\^torch==' constraints\.txt", runs):
        problems.append("the CPU torch pin of constraints.txt must be filtered out (grep -v)")
    if not re.search(r"pip install [^&]*torch", runs):
        problems.append("no pip install of torch (the GPU build)")
    if not re.search(r"pip install [^&]*-c \S+ [^&]*\.(\s|$)", runs):
        problems.append("the project is not installed with the constraints (pip install -c ... .)")
    if re.search(r"-c constraints\.txt", runs):
        problems.append("installs against the unfiltered constraints.txt (its CPU torch pin)")
    copied = " ".join(rest for ins, rest in steps if ins in ("COPY", "ADD"))
    for package in ("gan_core", "services", "tuning", "pyproject.toml"):
        if package not in copied:
            problems.append(f"{package} is not copied into the image")
    sources = [
        word
        for ins, rest in steps
        if ins in ("COPY", "ADD")
        for word in rest.split()[:-1]
        if not word.startswith("--")
    ]
    if "." in sources and not (REPO / ".dockerignore").is_file():
        problems.append("COPY . without a .dockerignore sends .venv, runs/ and mlruns/ along")
    for bad in (".venv", "runs", "mlruns", ".git"):
        if bad in sources:
            problems.append(f"COPY {bad} into the image")
    for ins, rest in steps:
        if ins in ("ENV", "ARG"):
            name = re.split(r"[=\s]", rest, maxsplit=1)[0]
            if looks_like_credential(name):
                problems.append(f"{ins} {name}: no credentials in the image")
    if AWS_KEY_ID.search(text):
        problems.append("an AWS access key id in the Dockerfile")
    return problems


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def config() -> dict[str, dict[str, Any]]:
    return config_objects()


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    (doc,) = load_docs(RAYCLUSTER_YAML)
    return doc


def all_commands() -> list[tuple[str, str, dict[str, str]]]:
    """(where, command, env the command is expanded with) for every python -m shown in deploy/."""
    configmap = config_objects()["ConfigMap"]
    found: list[tuple[str, str, dict[str, str]]] = []
    for path in RAYJOB_YAMLS:
        (job,) = load_docs(path)
        submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        found.append((path.name, job["spec"]["entrypoint"], container_env(submitter, configmap)))
    aws_comments = "\n".join(
        re.sub(r"^\s*# ?", "", line)
        for line in AWS_YAML.read_text().splitlines()
        if line.lstrip().startswith("#")
    )
    found += [("aws/cluster.yaml", c, {}) for c in python_commands(aws_comments)]
    docker_runs = " \n".join(
        rest for ins, rest in dockerfile_instructions(DOCKERFILE.read_text()) if ins == "RUN"
    )
    found += [("Dockerfile", c, {}) for c in python_commands(docker_runs)]
    # The README's code blocks (its prose quotes command shapes such as `--config PRESET`).
    blocks = re.findall(r"^\s*```\w*\n(.*?)^\s*```", README.read_text(), re.M | re.S)
    found += [("README.md", c, {}) for block in blocks for c in python_commands(block)]
    return found


COMMANDS = all_commands()


# ---------------------------------------------------------------- tests: parsing and schema


@pytest.mark.parametrize("kind", sorted(kind for _, kind in CRD_KINDS))
def test_the_vendored_schemas_are_kuberays_and_valid(kind: str) -> None:
    schema = published_schema(kind)
    jsonschema.Draft4Validator.check_schema(closed(schema))
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert "headGroupSpec" in json.dumps(schema)  # RayJob embeds the cluster spec


def test_closed_refuses_unknown_fields_where_kubernetes_would_prune_them() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "list": {"type": "array", "items": {"type": "object", "properties": {}}},
        },
    }
    strict = jsonschema.Draft4Validator(closed(schema))
    assert strict.is_valid({"a": {"b": 1}, "free": {"x": 1}, "map": {"k": "v"}, "list": [{}]})
    for bad in ({"c": 1}, {"a": {"bb": 1}}, {"list": [{"x": 1}]}, {"map": {"k": 1}}):
        assert not strict.is_valid(bad), bad
    assert jsonschema.Draft4Validator(schema).is_valid({"a": {"bb": 1}})  # as published


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


def test_config_yaml_holds_the_configmap_the_account_and_a_secret_example() -> None:
    assert sorted(doc["kind"] for doc in load_docs(CONFIG_YAML)) == ["ConfigMap", "ServiceAccount"]
    objects = config_objects()
    assert objects["ConfigMap"]["metadata"]["name"] == CONFIG_MAP
    assert objects["Secret"]["metadata"]["name"] == SECRET


@pytest.mark.parametrize("where,doc", kuberay_docs(), ids=[w for w, _ in kuberay_docs()])
def test_kubernetes_objects_match_the_schema(where: str, doc: dict[str, Any]) -> None:
    assert schema_problems(doc) == []
    assert pod_problems(doc) == []


def test_the_secret_example_matches_the_schema() -> None:
    assert schema_problems(secret_example()) == []


DELETE = object()


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``path`` set to ``value`` (or removed, for DELETE).

    ``path`` is dotted (``spec.workerGroupSpecs.0.replicas``); a key holding dots goes in
    brackets (``limits[nvidia.com/gpu]``).
    """
    out = copy.deepcopy(doc)
    *parents, last = [a or b for a, b in re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", path)]
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


WORKER = "spec.workerGroupSpecs.0"
WORKER_CONTAINER = f"{WORKER}.template.spec.containers.0"
HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"
# Each: the path broken, its value, and the words of the one error KubeRay's schema gives.
BROKEN_CLUSTERS = {
    "misspelt worker field": (f"{WORKER}.minReplica", 0, "'minReplica' was unexpected"),
    "misspelt spec field": ("spec.workerGroupSpec", [], "'workerGroupSpec' was unexpected"),
    "misspelt pod field": (
        f"{WORKER}.template.spec.toleration",
        [],
        "'toleration' was unexpected",
    ),
    "misspelt container field": (f"{HEAD_CONTAINER}.envfrom", [], "'envfrom' was unexpected"),
    "replicas as a string": (f"{WORKER}.replicas", "1", "'1' is not of type 'integer'"),
    "rayStartParams value not a string": (
        "spec.headGroupSpec.rayStartParams.num-cpus",
        0,
        "0 is not of type 'string'",
    ),
    "bad quantity": (
        f"{WORKER_CONTAINER}.resources.limits.memory",
        "12 gigabytes",
        "does not match",
    ),
    "no headGroupSpec": ("spec.headGroupSpec", DELETE, "'headGroupSpec' is a required property"),
    "worker group without a name": (
        f"{WORKER}.groupName",
        DELETE,
        "'groupName' is a required property",
    ),
    "container without a name": (f"{HEAD_CONTAINER}.name", DELETE, "'name' is a required"),
    "unknown authOptions.mode": ("spec.authOptions.mode", "Token", "is not one of"),
    "misspelt authOptions field": (
        "spec.authOptions.secret",
        TOKEN_SECRET,
        "'secret' was unexpected",
    ),
    "enableK8sTokenAuth not a boolean": (
        "spec.authOptions.enableK8sTokenAuth",
        "yes",
        "'yes' is not of type 'boolean'",
    ),
}


@pytest.mark.parametrize("path,value,error", BROKEN_CLUSTERS.values(), ids=list(BROKEN_CLUSTERS))
def test_the_schema_rejects_a_broken_raycluster(
    raycluster: dict[str, Any], path: str, value: Any, error: str
) -> None:
    assert schema_problems(raycluster) == []
    (problem,) = schema_problems(_set(raycluster, path, value))
    assert error in problem


def test_the_schema_rejects_a_broken_rayjob_and_unknown_kinds() -> None:
    (job,) = load_docs(RAYJOB_YAMLS[0])
    assert schema_problems(job) == []
    cluster = "spec.rayClusterSpec"
    for path, value in (
        ("spec.shutdownAfterJobFinished", True),  # misspelt
        ("spec.ttlSecondsAfterFinished", "600"),
        (f"{cluster}.workerGroupSpecs.0.maxReplica", 8),  # misspelt, in the embedded cluster
        ("spec.submitterPodTemplate.spec.containers.0.envFrom.0.configMapRef.nam", "x"),
        ("spec.submitterPodTemplate.spec.containers", DELETE),  # required in a pod spec
    ):
        assert len(schema_problems(_set(job, path, value))) == 1, path
    assert schema_problems({**job, "apiVersion": "ray.io/v1alpha1"})
    assert schema_problems({**job, "kind": "RayService"})
    configmap = config_objects()["ConfigMap"]
    assert schema_problems(_set(configmap, "date", {}))  # misspelt data
    assert schema_problems(_set(configmap, "data.RAYGAN-URI", "s3://x"))


def test_the_pod_check_wants_images_limits_and_known_resources(
    raycluster: dict[str, Any],
) -> None:
    for path, value in (
        (f"{HEAD_CONTAINER}.image", DELETE),
        (f"{HEAD_CONTAINER}.resources", {"requests": {"cpu": "1"}}),
        (f"{WORKER_CONTAINER}.resources.limits.nvidia/gpu", 1),
    ):
        broken = _set(raycluster, path, value)
        assert schema_problems(broken) == [], path  # valid to KubeRay's schema ...
        assert len(pod_problems(broken)) == 1, path  # ... but not to raygan


# ---------------------------------------------------------------- tests: credentials


@pytest.mark.parametrize("where,doc", kuberay_docs(), ids=[w for w, _ in kuberay_docs()])
def test_no_plaintext_credentials_in_manifests(where: str, doc: dict[str, Any]) -> None:
    assert credential_problems(doc) == []


@pytest.mark.parametrize(
    "path", (*YAML_FILES, DOCKERFILE, README), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_no_access_key_shaped_text_in_deploy_files(path: Path) -> None:
    assert not AWS_KEY_ID.search(path.read_text())


def test_the_secret_example_holds_only_placeholders() -> None:
    example = secret_example()
    assert example["stringData"], "the example Secret names no keys"
    assert set(example["stringData"].values()) == {PLACEHOLDER}


def test_the_credential_check_rejects_plaintext_secrets(
    raycluster: dict[str, Any], config: dict[str, dict[str, Any]]
) -> None:
    plaintext = _set(
        raycluster, f"{HEAD_CONTAINER}.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]
    )
    from_configmap = _set(
        raycluster,
        f"{WORKER_CONTAINER}.env",
        [
            {
                "name": "MLFLOW_TRACKING_PASSWORD",
                "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": "PASSWORD"}},
            }
        ],
    )
    key_id = _set(raycluster, "metadata.labels.owner", "AKIA" + "ABCDEFGHIJKLMNOP")
    (job,) = load_docs(RAYJOB_YAMLS[0])
    runtime_env = _set(job, "spec.runtimeEnvYAML", "env_vars:\n  AWS_SESSION_TOKEN: xyz\n")
    configmap = _set(config["ConfigMap"], "data.API_TOKEN", "xyz")
    for broken in (plaintext, from_configmap, key_id, runtime_env, configmap):
        assert credential_problems(broken), broken


# ---------------------------------------------------------------- tests: cluster shape


@pytest.mark.parametrize("path", (RAYCLUSTER_YAML, *RAYJOB_YAMLS), ids=lambda p: p.name)
def test_cluster_shape_and_references(path: Path, config: dict[str, dict[str, Any]]) -> None:
    (doc,) = load_docs(path)
    assert cluster_problems(doc, config) == []


def test_the_cluster_check_rejects_a_broken_cluster(
    raycluster: dict[str, Any], config: dict[str, dict[str, Any]]
) -> None:
    assert cluster_problems(raycluster, config) == []
    limits = f"{WORKER_CONTAINER}.resources.limits"
    broken = {
        "old ray": _set(raycluster, "spec.rayVersion", "2.59.0"),
        "min > replicas": _set(raycluster, f"{WORKER}.minReplicas", 3),
        "replicas > max": _set(raycluster, f"{WORKER}.replicas", 9),
        "no GPU": _set(raycluster, f"{limits}[{GPU}]", DELETE),
        "no autoscaling": _set(raycluster, "spec.enableInTreeAutoscaling", False),
        "GPU head": _set(raycluster, f"{HEAD_CONTAINER}.resources.limits[{GPU}]", 1),
        "two images": _set(raycluster, f"{HEAD_CONTAINER}.image", "rayproject/ray:latest"),
        "unknown account": _set(
            raycluster, "spec.headGroupSpec.template.spec.serviceAccountName", "default2"
        ),
        "unknown secret key": _set(
            raycluster, f"{HEAD_CONTAINER}.env.2.valueFrom.secretKeyRef.key", "AWS_KEY"
        ),
        "required secret": _set(
            raycluster, f"{HEAD_CONTAINER}.env.2.valueFrom.secretKeyRef.optional", False
        ),
    }
    for name, doc in broken.items():
        assert cluster_problems(doc, config), name


# ---------------------------------------------------------------- tests: Ray's token auth


@pytest.mark.parametrize("path", (RAYCLUSTER_YAML, *RAYJOB_YAMLS), ids=lambda p: p.name)
def test_token_auth_is_kuberays_authoptions(path: Path) -> None:
    (doc,) = load_docs(path)
    assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert token_auth_problems(doc) == []


def _env_entry(name: str, secret: str = TOKEN_SECRET, key: str = TOKEN_KEY) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def test_the_token_auth_check_rejects_the_old_way_and_half_ways(
    raycluster: dict[str, Any], config: dict[str, dict[str, Any]]
) -> None:
    (job,) = load_docs(RAYJOB_YAMLS[0])
    head_env = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    submitter = "spec.submitterPodTemplate.spec.containers.0"
    # The manifests before KubeRay's auth: pod env vars only, the Secret's key named `token`.
    old_way = _set(raycluster, "spec.authOptions", DELETE)
    old_way = _set(
        old_way,
        f"{HEAD_CONTAINER}.env",
        [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            _env_entry("RAY_AUTH_TOKEN", key="token"),
            *head_env,
        ],
    )
    broken = {
        "old way": old_way,
        "no authOptions": _set(raycluster, "spec.authOptions", DELETE),
        "auth disabled": _set(raycluster, "spec.authOptions.mode", "disabled"),
        "mode left to the default": _set(raycluster, "spec.authOptions.mode", DELETE),
        "KubeRay's generated Secret": _set(raycluster, "spec.authOptions.secretName", DELETE),
        "another Secret": _set(raycluster, "spec.authOptions.secretName", "ray-token"),
        "Kubernetes RBAC auth": _set(raycluster, "spec.authOptions.enableK8sTokenAuth", True),
        "Ray too old for it": _set(raycluster, "spec.rayVersion", "2.51.1"),
        "worker shadows the mode": _set(
            raycluster,
            f"{WORKER_CONTAINER}.env",
            [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
        ),
        "head shadows the token": _set(
            raycluster, f"{HEAD_CONTAINER}.env", [_env_entry("RAY_AUTH_TOKEN"), *head_env]
        ),
        "token under another name": _set(
            raycluster, f"{HEAD_CONTAINER}.env", [_env_entry("RAY_TOKEN"), *head_env]
        ),
        "token as envFrom": _set(
            raycluster, f"{HEAD_CONTAINER}.envFrom", [{"secretRef": {"name": TOKEN_SECRET}}]
        ),
        "submitter keeps the old env": _set(
            job, f"{submitter}.env", [{"name": "RAY_AUTH_MODE", "value": "token"}]
        ),
        "RayJob without authOptions": _set(job, "spec.rayClusterSpec.authOptions", DELETE),
    }
    for name, doc in broken.items():
        assert schema_problems(doc) == [], name  # each is a valid KubeRay object ...
        assert token_auth_problems(doc), name  # ... that the token check refuses
    # The old way also breaks the other checks: its token Secret is not the credentials Secret.
    assert cluster_problems(old_way, config)


def test_the_token_secret_is_one_name_and_one_key_everywhere() -> None:
    clusters = [doc for _, doc in kuberay_docs() if doc["kind"] in ("RayCluster", "RayJob")]
    assert len(clusters) == 1 + len(RAYJOB_YAMLS)
    assert {cluster_spec(doc)["authOptions"]["secretName"] for doc in clusters} == {TOKEN_SECRET}
    keys = {
        path.name: token_secret_keys(path.read_text())
        for path in (CONFIG_YAML, RAYCLUSTER_YAML, *RAYJOB_YAMLS, README)
    }
    # config.yaml creates the Secret; the README creates it and reads the token back from it.
    assert keys[CONFIG_YAML.name] == [TOKEN_KEY]
    assert len(keys[README.name]) >= 2
    assert {key for found in keys.values() for key in found} == {TOKEN_KEY}


def test_token_secret_keys_are_found_in_commands() -> None:
    text = (
        f"kubectl create secret generic {TOKEN_SECRET} \\\n"
        '    --from-literal=token="$(openssl rand -hex 32)"\n'
        f"kubectl get secret {TOKEN_SECRET} -o jsonpath='{{.data.auth_token}}'\n"
        f"kubectl create secret generic {TOKEN_SECRET}x --from-file=auth_token=t\n"
    )
    assert token_secret_keys(text) == ["token", "auth_token"]


def test_ray_version_matches_constraints() -> None:
    versions = {cluster_spec(doc)["rayVersion"] for _, doc in kuberay_docs() if "spec" in doc}
    assert versions == {RAY_VERSION}
    assert RAY_GPU_IMAGE in DOCKERFILE.read_text()
    assert load_docs(AWS_YAML)[0]["docker"]["image"] == RAY_GPU_IMAGE


@pytest.mark.parametrize("path", RAYJOB_YAMLS, ids=lambda p: p.name)
def test_rayjobs_carry_the_raycluster_spec(
    path: Path, raycluster: dict[str, Any], config: dict[str, dict[str, Any]]
) -> None:
    (job,) = load_docs(path)
    assert rayjob_problems(job, raycluster, config["ConfigMap"]) == []


def test_the_rayjob_check_rejects_drift(
    raycluster: dict[str, Any], config: dict[str, dict[str, Any]]
) -> None:
    (job,) = load_docs(RAYJOB_YAMLS[0])
    cm = config["ConfigMap"]
    smaller = _set(job, "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2)
    assert rayjob_problems(smaller, raycluster, cm)
    assert rayjob_problems(_set(job, "spec.shutdownAfterJobFinishes", False), raycluster, cm)
    assert rayjob_problems(_set(job, "spec.ttlSecondsAfterFinished", 0), raycluster, cm)
    unset = _set(job, "spec.entrypoint", job["spec"]["entrypoint"] + " name=$RAYGAN_RUN_NAME")
    assert rayjob_problems(unset, raycluster, cm)
    no_env = _set(job, "spec.submitterPodTemplate.spec.containers.0.envFrom", DELETE)
    assert rayjob_problems(no_env, raycluster, cm)
    assert rayjob_problems(_set(job, "spec.submissionMode", "HTTPMode"), raycluster, cm)
    selector = _set(job, "spec.clusterSelector", {"ray.io/cluster": "raygan"})
    assert rayjob_problems(selector, raycluster, cm)


# ---------------------------------------------------------------- tests: the commands


def test_every_place_shows_its_commands() -> None:
    modules: dict[str, set[str]] = {}
    for where, command, _ in COMMANDS:
        modules.setdefault(where, set()).add(shlex.split(command)[2])
    assert modules == {
        "rayjob-train.yaml": {"services.train"},
        "rayjob-sweep.yaml": {"tuning.sweep"},
        "aws/cluster.yaml": {"services.train", "tuning.sweep"},
        "Dockerfile": {"services.train"},
        "README.md": {"services.train", "tuning.sweep", "deploy.local.stack"},
    }


@pytest.mark.parametrize(
    "where,command,env", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c, _ in COMMANDS]
)
def test_commands_name_real_modules_presets_spaces_and_keys(
    where: str, command: str, env: dict[str, str]
) -> None:
    assert command_problems(command, env) == []


BAD_COMMANDS = {
    "no such module": "python -m services.trian --config ring8",
    "no such preset": "python -m services.train --config ring9",
    "no such key": "python -m services.train --config ring8 resources.use_gpus=true",
    "invalid value": "python -m services.train --config ring8 resources.num_workers=0",
    "no such option": "python -m services.train --configs ring8",
    "no such space": "python -m tuning.sweep --space collaps --config ring8",
    "no such scheduler": "python -m tuning.sweep --space collapse --scheduler hyperband",
    "bad sweep key": "python -m tuning.sweep --space collapse train.step=10",
    "grid breaks": "python -m tuning.sweep --space collapse train.batch_size=100",
    "unset variable": "python -m services.train storage.uri=$NOT_IN_THE_CONFIGMAP",
}


@pytest.mark.parametrize("command", BAD_COMMANDS.values(), ids=list(BAD_COMMANDS))
def test_the_command_check_rejects_bad_commands(command: str) -> None:
    assert command_problems(command)


def test_commands_are_found_in_shell_text() -> None:
    text = (
        "x && .venv/bin/python -m services.train --config ring8 \\\n"
        "    a.b=1 > /dev/null  # comment\n"
        "`python -m tuning.report runs/x` and more\n"
        "RUN pip install . && python -m services.train --help > /dev/null\n"
    )
    assert python_commands(text) == [
        "python -m services.train --config ring8 a.b=1",
        "python -m tuning.report runs/x",
        "python -m services.train --help",
    ]


@pytest.mark.parametrize("path", RAYJOB_YAMLS, ids=lambda p: p.name)
def test_rayjobs_fit_the_gpu_workers(path: Path, config: dict[str, dict[str, Any]]) -> None:
    (job,) = load_docs(path)
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env = container_env(submitter, config["ConfigMap"])
    slots = gpu_capacity(job["spec"]["rayClusterSpec"])
    assert job_fit_problems(job["spec"]["entrypoint"], slots, env) == []


def test_cluster_commands_fit_the_gpu_workers(raycluster: dict[str, Any]) -> None:
    aws = load_docs(AWS_YAML)[0]
    aws_slots = sum(
        t.get("max_workers", 0) * t["resources"].get("GPU", 0)
        for t in aws["available_node_types"].values()
    )
    k8s_slots = gpu_capacity(raycluster["spec"])
    for where, command, env in COMMANDS:
        if where == "aws/cluster.yaml":
            assert job_fit_problems(command, aws_slots, env) == []
        if where == "README.md" and "resources.use_gpu=true" in command:
            assert job_fit_problems(command, min(aws_slots, k8s_slots), env) == []


def test_the_fit_check_rejects_jobs_too_big_or_on_cpu() -> None:
    train = "python -m services.train --config ring8 resources.use_gpu=true"
    assert job_fit_problems(f"{train} resources.num_workers=9", 8)
    assert job_fit_problems("python -m services.train --config ring8", 8)  # use_gpu off
    sweep = "python -m tuning.sweep --space collapse resources.use_gpu=true"
    assert job_fit_problems(f"{sweep} --max-concurrent 5 --workers-per-trial 2", 8)
    assert job_fit_problems(sweep, 8)  # no --max-concurrent
    assert job_fit_problems(f"{sweep} --max-concurrent 4 --workers-per-trial 2", 8) == []


# ---------------------------------------------------------------- tests: ray up, Docker, README


def test_aws_cluster_config_passes_rays_schema_and_ours() -> None:
    (config,) = load_docs(AWS_YAML)
    assert aws_problems(config) == []


def test_the_aws_check_rejects_broken_configs() -> None:
    (config,) = load_docs(AWS_YAML)
    gpu = "available_node_types.gpu_worker"
    setup, pins = config["setup_commands"], "~/raygan/constraints.txt"
    broken = {
        "typo (Ray's schema)": _set(config, "max_worker", 8),
        "typo in a node type": _set(config, f"{gpu}.min_worker", 0),
        "min > global max": _set(config, f"{gpu}.min_workers", 9),
        "max > global max": _set(config, f"{gpu}.max_workers", 9),
        "no instance role": _set(config, f"{gpu}.node_config.IamInstanceProfile", DELETE),
        "keys in setup": _set(
            config, "setup_commands", [*setup, "aws configure set aws_access_key_id x"]
        ),
        "CPU workers only": _set(config, f"{gpu}.node_config.InstanceType", "m5.xlarge"),
        "other ray image": _set(config, "docker.image", "rayproject/ray:latest-gpu"),
        "project not mounted": _set(config, "file_mounts", {"~/raygan/tuning": "./tuning"}),
        "whole checkout mounted": _set(config, "file_mounts", {"~/raygan": "."}),
        "CPU torch pin kept": _set(
            config, "setup_commands", [f"pip install -c {pins} -e ~/raygan"]
        ),
    }
    for name, doc in broken.items():
        assert aws_problems(doc), name


def test_dockerfile() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_check_rejects_broken_dockerfiles() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text.replace(f"ray:{RAY_VERSION}-", "ray:2.59.0-"))
    assert dockerfile_problems(text.replace("-gpu\n", "-cpu\n"))
    assert dockerfile_problems(text + "ENV AWS_SECRET_ACCESS_KEY=abc\n")
    assert dockerfile_problems(text + "ARG MLFLOW_TRACKING_TOKEN\n")
    assert dockerfile_problems(text.replace("grep -v '^torch=='", "cat"))
    assert dockerfile_problems(
        text.replace("-c /home/ray/constraints-gpu.txt", "-c constraints.txt")
    )
    assert dockerfile_problems(text + "COPY .venv /home/ray/venv\n")
    if not (REPO / ".dockerignore").is_file():
        assert dockerfile_problems(text + "COPY . /home/ray/raygan\n")


def test_readme_names_real_files_and_make_targets() -> None:
    text = README.read_text()
    paths = set(re.findall(r"\b(?:deploy|tests)/[\w./-]*\w", text))
    assert paths, "the README names no file"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert missing == []
    targets = set(re.findall(r"^\.?\w[\w.-]*:", (REPO / "Makefile").read_text(), re.M))
    for target in re.findall(r"\bmake (\w+)", text):
        assert f"{target}:" in targets, f"make {target}: no such target in the Makefile"
