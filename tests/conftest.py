"""Shared fixtures: tiny configs, an exported + labeled annotation folder, one Ray cluster per session."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Dummy credentials for the loopback S3 server, set before Ray starts so that its workers inherit
# them the way cluster workers inherit platform credentials (never through config files).
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The embedded default, made smaller and faster, writing under tmp_path."""
    from factory.config import load_config

    return load_config(
        None,
        [
            f"workdir={tmp_path}",
            "annotate.num_images=8",
            "train.val_images=2",
            "train.steps=20",
            "train.checkpoint_every=10",
            "decoder.num_heads=3",
            "generate.num_samples=40",
            "generate.shard_size=16",
            "generate.batch_size=8",
        ],
    )


def save_untrained_decoder(cfg):
    """The config's backbone and a seeded, untrained decoder saved where `generate.decoder` points,
    the way `factory train` publishes one: enough for tests about bytes, layout and resume."""
    from factory import config as config_lib
    from factory.backbones import load_backbone
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder

    backbone = load_backbone(cfg.backbone)
    model = build_decoder(cfg.decoder, backbone.feature_channels, len(cfg.label_names()), len(cfg.labels.keypoints)).eval()
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.label_names(), backbone.feature_channels,
                 backbone.weights_hash, config_lib.to_yaml(cfg), cfg.labels.keypoints)
    return backbone


@pytest.fixture
def labeled_dir(tiny_cfg):
    """An exported folder labeled by the demo's stand-in annotator (masks/*.png present)."""
    from factory.recipes.annotate import export_images
    from factory.toy.annotator import annotate_by_rule

    export_images(tiny_cfg)
    annotate_by_rule(tiny_cfg.annotate.dir)
    return tiny_cfg.annotate.dir


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (start-up costs seconds)."""
    import ray

    from factory.config import RayConfig
    from factory.runtime import init_ray

    init_ray(RayConfig(num_cpus=4), training=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server on loopback (moto's server mode)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; storage is configured for the endpoint while the test runs."""
    import re

    import boto3

    from factory import storage
    from factory.config import StorageConfig

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    storage.configure(StorageConfig(endpoint_url=s3_endpoint, region="us-east-1"))
    yield f"s3://{name}"
    storage.configure(StorageConfig())


@contextlib.contextmanager
def chat_endpoint(respond: Callable[[dict], tuple[int, str]]) -> Iterator[tuple[str, list[dict]]]:
    """A local OpenAI-compatible chat endpoint on loopback (POST .../chat/completions). Each request,
    kept as {"path", "authorization", "body"}, goes to `respond`, which returns (status, text): with
    200 the text is the assistant's message, otherwise the error's message (as real servers answer).
    Yields (base URL without a path, the list of requests so far)."""
    requests: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request = {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
            requests.append(request)
            status, text = respond(request)
            if status == 200:
                answer = {"id": f"chatcmpl-{len(requests)}", "object": "chat.completion", "created": 0,
                          "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": text}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            else:
                answer = {"error": {"message": text, "type": "invalid_request_error", "code": "invalid_api_key",
                                    "param": None}}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
