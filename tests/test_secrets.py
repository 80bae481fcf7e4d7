"""No credential reaches a file or a log: secrets are planted (AWS keys in the environment of a build to
loopback S3, a chat endpoint's API key in its environment variable, keys written into configs and URLs),
builds run through the CLI (one that succeeds, ones that fail), and every file they wrote plus their
captured stdout/stderr are scanned for the planted values."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCESS_KEY = "AKIAPLANTEDKEY7Q3ZX9"
SECRET_KEY = "planted/Secret+Key/wJalrXUtnFEMIK7MDENGbPxRfiCY"
API_KEY = "sk-planted-api-key-8f3a9c2e71d4b605"
SECRETS = (ACCESS_KEY, SECRET_KEY, API_KEY)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m factory.cli ...` in a fresh process (its own local Ray cluster), logs at INFO."""
    return subprocess.run([sys.executable, "-m", "factory.cli", "--log-level", "INFO", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def leaks(texts: dict[str, bytes]) -> list[str]:
    return [f"{name} holds {secret[:8]}..." for name, data in texts.items() for secret in SECRETS
            if secret.encode() in data]


def files_under(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


def s3_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {f"s3://{bucket}/{k}": s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def answer_with_the_key(request: dict) -> tuple[int, str]:
    """Prompt lines for API_KEY on a /good path; otherwise a refusal that (like real servers) echoes
    the key it refused."""
    auth = request["authorization"] or ""
    if auth == f"Bearer {API_KEY}" and request["path"].startswith("/good"):
        return 200, "\n".join(json.dumps({"prompt": f"a photo of a face, scene {i}", "classes": ["skin"]})
                              for i in range(8))
    return 401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"


@pytest.fixture
def chat():
    """The chat endpoint of tests/conftest.py answering `answer_with_the_key`; yields (URL, the
    requests it got)."""
    from conftest import chat_endpoint

    with chat_endpoint(answer_with_the_key) as served:
        yield served


def test_planted_secrets_reach_no_file_and_no_log(tmp_path, s3_endpoint, chat):
    from conftest import save_untrained_decoder

    from factory.config import load_config

    bucket = "secrets"
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "FACTORY_CHAT_KEY": API_KEY, "PYTHONPATH": ROOT, "RAY_TMPDIR": ray_dir}
    work = tmp_path / "work"
    config = tmp_path / "factory.yaml"
    config.write_text(f"workdir: {work}\n"
                      f"storage: {{endpoint_url: '{s3_endpoint}', region: us-east-1}}\n"
                      "ray: {num_cpus: 2}\n"
                      "decoder: {num_heads: 2}\n"
                      "prompts: {api_key_env: FACTORY_CHAT_KEY, num_prompts: 4, model: m}\n"
                      f"generate: {{output: 's3://{bucket}/dataset', num_samples: 24, shard_size: 8, batch_size: 8,\n"
                      "           num_actors: 1, cpus_per_actor: 0.5, formats: [parquet, webdataset]}\n")
    save_untrained_decoder(load_config(str(config)))
    logs, durations, runs = {}, {}, {
        # 1. a build to S3 with the keys in the environment of the driver and its Ray workers
        "build": (["generate", str(config)], 0),
        # 2. a failed build: a bucket that does not exist
        "missing bucket": (["generate", str(config), "generate.output=s3://no-such-bucket/dataset"], 2),
        # 3. prompts from the chat endpoint with the key from its variable, written next to a dataset
        "prompts": (["prompts", "expand", os.path.join(ROOT, "configs", "diffusion.yaml"), f"workdir={work}",
                     f"prompts.endpoint={chat[0]}/good/v1", "prompts.api_key_env=FACTORY_CHAT_KEY",
                     "prompts.num_prompts=4", f"generate.output={work}/prompts-dataset"], 0),
        # 4. the endpoint refuses the key and echoes it back
        "refused key": (["prompts", "expand", os.path.join(ROOT, "configs", "diffusion.yaml"), f"workdir={work}",
                         f"prompts.endpoint={chat[0]}/bad/v1", "prompts.api_key_env=FACTORY_CHAT_KEY",
                         f"generate.output={work}/refused-dataset"], 2),
        # 5. keys written into config values: refused without being repeated
        "key in endpoint url": (["generate", str(config),
                                 f"storage.endpoint_url=http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:9"], 2),
        "key in prompts url": (["prompts", "expand", str(config), f"prompts.endpoint={chat[0]}/v1?api_key={API_KEY}"], 2),
        "key in output url": (["generate", str(config), f"generate.output=s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket}/x"], 2),
        "key as unknown key": (["generate", str(config), f"storage.aws_secret_access_key={SECRET_KEY}"], 2),
    }
    for name, (args, want) in runs.items():
        start = time.perf_counter()
        run = cli(args, env, tmp_path)
        assert run.returncode == want, (name, run.stderr[-2000:])
        logs[f"{name}: stdout"], logs[f"{name}: stderr"] = run.stdout.encode(), run.stderr.encode()
        if want:
            assert run.stderr.strip().splitlines()[-1].startswith("factory: error: ") and "Traceback" not in run.stderr, (
                name, run.stderr[-2000:])
        durations[name] = round(time.perf_counter() - start, 1)
    assert f"Bearer {API_KEY}" in [r["authorization"] for r in chat[1]]  # the key was really used
    written = {**files_under(work, Path(ray_dir)), **s3_objects(s3_endpoint, bucket)}
    assert any(name.endswith("manifest.json") for name in written) and any("/_stats/" in n for n in written)
    assert any(name.endswith("prompts.jsonl") for name in written)
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert leaks({**written, **logs}) == []
