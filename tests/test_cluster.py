"""Every manifest under cluster/ parses and uses only fields that exist: KubeRay resources against the
KubeRay v1.7.0 CRDs (from ../shared/schemas, never copied here), the AWS launcher config against the
schema shipped inside the ray package. Nothing here is applied to a cluster."""

import copy
import glob
import json
import os
import re

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRDS = os.path.join(os.path.dirname(ROOT), "shared", "schemas", "kuberay")
KUBERAY = sorted(glob.glob(os.path.join(ROOT, "cluster", "kuberay", "*.yaml")))
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI schema as JSON Schema that refuses unknown fields the way the API server
    does (it prunes them): `additionalProperties: false` wherever properties are listed and unknown
    fields are not preserved; `x-kubernetes-int-or-string` accepts either."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schemas():
    if not os.path.isdir(CRDS):
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared schemas folder is not part of the repository)")
    schemas = {}
    for path in glob.glob(os.path.join(CRDS, "ray.io_*.yaml")):
        with open(path) as f:
            crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the CRDs are large
        kind = crd["spec"]["names"]["kind"]
        [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = strict(v1["schema"]["openAPIV3Schema"])
    return schemas


def documents(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(open(path)) if d]


def validate(schemas: dict, doc: dict) -> list[str]:
    """Every schema violation of a ray.io document, as 'path: message'."""
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    assert doc["metadata"]["name"]
    validator = jsonschema.Draft7Validator(schemas[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def nightly_template() -> str:
    [config_map] = [d for d in documents(os.path.join(ROOT, "cluster", "kuberay", "cronjob-nightly.yaml"))
                    if d["kind"] == "ConfigMap"]
    return config_map["data"]["rayjob.yaml"]


@pytest.mark.parametrize("path", KUBERAY, ids=os.path.basename)
def test_kuberay_manifests_match_the_crds(crd_schemas, path):
    for doc in documents(path):
        if doc["apiVersion"].startswith("ray.io/"):
            assert validate(crd_schemas, doc) == []
        else:
            assert doc["kind"] in CORE_KINDS and doc["metadata"]["name"], doc["kind"]


def test_the_cronjob_creates_a_valid_dated_rayjob(crd_schemas):
    rayjob = yaml.safe_load(nightly_template().replace("__DATE__", "2026-11-24"))
    assert validate(crd_schemas, rayjob) == []
    assert rayjob["metadata"]["name"] == rayjob["spec"]["jobId"] == "factory-nightly-2026-11-24"
    # the template is rayjob-build.yaml with its date taken out, so the two cannot drift apart
    built = documents(os.path.join(ROOT, "cluster", "kuberay", "rayjob-build.yaml"))[0]
    assert rayjob == built
    [cron] = [d for d in documents(os.path.join(ROOT, "cluster", "kuberay", "cronjob-nightly.yaml"))
              if d["kind"] == "CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert "AlreadyExists" in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]


def test_the_validator_catches_misspelled_fields_and_wrong_types(crd_schemas):
    rayjob = documents(os.path.join(ROOT, "cluster", "kuberay", "rayjob-build.yaml"))[0]
    typo = copy.deepcopy(rayjob)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in validate(crd_schemas, typo))
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["backoffLimit"] = "one"
    assert any(e.startswith("spec.backoffLimit") for e in validate(crd_schemas, wrong))
    deep = copy.deepcopy(rayjob)
    deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in validate(crd_schemas, deep))


def test_aws_launcher_config_matches_rays_schema():
    import ray

    schema = json.load(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")))
    config = yaml.safe_load(open(os.path.join(ROOT, "cluster", "aws", "cluster.yaml")))
    jsonschema.validate(config, schema)
    broken = {**config, "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, schema)


def all_manifest_text() -> str:
    paths = KUBERAY + [os.path.join(ROOT, "cluster", "aws", "cluster.yaml")]
    return "\n".join(open(p).read() for p in paths)


def test_entrypoints_and_configs_exist():
    text = all_manifest_text()
    for script in set(re.findall(r"python3? (jobs/\w+\.py)", text)):
        assert os.path.isfile(os.path.join(ROOT, script)), script
    for config in set(re.findall(r"(configs/[\w.-]+\.yaml)", text)):
        assert os.path.isfile(os.path.join(ROOT, config)), config


def test_no_credentials_in_manifests():
    text = all_manifest_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token)", text)
