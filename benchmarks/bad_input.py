"""The bad-input table: every case is run through the real CLI entry (`factory.cli.main`, in process)
and must meet the rule: exit 2 (bad input) or 1 (a failed run), one line on stderr that names the
input, no traceback, nothing published where the command would write.

    python benchmarks/bad_input.py            # prints each case and the count that met the rule

Used by tests/test_bad_input.py (one parametrised test per case) and benchmarks/faults.py (the count).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Case:
    argv: list[str]
    """The `factory` command line."""
    names: str
    """What the error line must contain: the file, key, URL or value at fault."""
    code: int = 2
    unpublished: list[str] = field(default_factory=list)
    """Paths the command would write, which must not exist afterwards."""
    env: dict[str, str | None] = field(default_factory=dict)
    """Environment changes while the case runs (None: unset)."""


@dataclass
class Inputs:
    """What the cases share: a scratch folder, config files, a labeled toy-world folder, a fitted
    (untrained) decoder and a loopback S3 endpoint with a bucket."""

    work: Path
    gan_config: Path
    dm_config: Path
    faces: Path
    s3_endpoint: str
    bucket: str


# --- config ---------------------------------------------------------------------------------------

def config_unknown_key(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.num_sampels=3"], "num_sampels")


def config_wrong_type(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.num_samples=many"], "generate.num_samples")


def config_out_of_range(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.shard_size=0"], "generate.shard_size")


def config_missing_interpolation(i: Inputs) -> Case:
    path = i.work / "interp.yaml"
    path.write_text("workdir: ${nowhere.dir}/x\n")
    return Case(["generate", str(path)], "nowhere.dir")


def config_yaml_syntax(i: Inputs) -> Case:
    path = i.work / "syntax.yaml"
    path.write_text("name: x\ngenerate:\n  num_samples: [1, 2\n  shard_size: 3\n")
    return Case(["generate", str(path)], "line ")


def config_missing_file(i: Inputs) -> Case:
    return Case(["train", str(i.work / "nope.yaml")], "nope.yaml")


def config_override_without_equals(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.num_samples"], "generate.num_samples")


def config_not_a_mapping(i: Inputs) -> Case:
    path = i.work / "list.yaml"
    path.write_text("- a\n- b\n")
    return Case(["generate", str(path)], "list.yaml")


# --- labels (a real labeled folder for the diffusion path, `factory labels import`) ---------------

def _faces(i: Inputs, name: str) -> Path:
    folder = i.work / name
    shutil.copytree(i.faces, folder)
    return folder


def _labels_case(i: Inputs, folder: Path, names: str, *extra: str) -> Case:
    out = i.work / f"{folder.name}.safetensors"
    return Case(["labels", "import", str(i.dm_config), f"labels.dir={folder}", f"train.labeled={out}", *extra],
                names, unpublished=[str(out)])


def _mask(folder: Path, stem: str, array: np.ndarray | None = None, data: bytes | None = None) -> None:
    (folder / "masks").mkdir(exist_ok=True)
    if data is not None:
        (folder / "masks" / f"{stem}.png").write_bytes(data)
    else:
        Image.fromarray(array).save(folder / "masks" / f"{stem}.png")


def labels_corrupt_png(i: Inputs) -> Case:
    folder = _faces(i, "corrupt-png")
    _mask(folder, "face-000001", data=b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return _labels_case(i, folder, "masks/face-000001.png")


def labels_wrong_mask_size(i: Inputs) -> Case:
    folder = _faces(i, "mask-size")
    _mask(folder, "face-000002", np.zeros((10, 12), np.uint8))
    return _labels_case(i, folder, "masks/face-000002.png")


def labels_class_out_of_range(i: Inputs) -> Case:
    folder = _faces(i, "class-range")
    mask = np.zeros((32, 32), np.uint8)
    mask[0, 0] = 200
    _mask(folder, "face-000000", mask)
    return _labels_case(i, folder, "masks/face-000000.png")


def labels_rgb_mask(i: Inputs) -> Case:
    folder = _faces(i, "rgb-mask")
    _mask(folder, "face-000003", np.ones((32, 32, 3), np.uint8))
    return _labels_case(i, folder, "masks/face-000003.png")


def _coco(folder: Path) -> dict:
    return json.loads((folder / "instances.json").read_text())


def labels_coco_missing_image(i: Inputs) -> Case:
    folder = _faces(i, "coco-missing")
    coco = _coco(folder)
    coco["images"].append({**coco["images"][0], "id": 999, "file_name": "ghost.png"})
    (folder / "instances.json").write_text(json.dumps(coco))
    return _labels_case(i, folder, "ghost.png", "decoder.tasks=[segmentation,instances]")


def labels_polygon_outside(i: Inputs) -> Case:
    folder = _faces(i, "coco-outside")
    coco = _coco(folder)
    ann = coco["annotations"][0]
    ann["segmentation"] = [[500.0, 500.0, 600.0, 500.0, 600.0, 600.0]]
    ann.pop("bbox", None)
    (folder / "instances.json").write_text(json.dumps(coco))
    file = next(im["file_name"] for im in coco["images"] if im["id"] == ann["image_id"])
    return _labels_case(i, folder, file, "decoder.tasks=[segmentation,instances]")


def labels_duplicate_names(i: Inputs) -> Case:
    folder = _faces(i, "duplicates")
    Image.open(folder / "images" / "face-000004.png").convert("RGB").save(folder / "images" / "face-000004.jpg")
    return _labels_case(i, folder, "face-000004")


def labels_empty_folder(i: Inputs) -> Case:
    folder = i.work / "empty-labels"
    (folder / "images").mkdir(parents=True)
    return _labels_case(i, folder, str(folder / "images"))


def labels_escaping_name(i: Inputs) -> Case:
    folder = _faces(i, "escape")
    coco = _coco(folder)
    coco["images"][0]["file_name"] = "../../etc/passwd"
    (folder / "instances.json").write_text(json.dumps(coco))
    return _labels_case(i, folder, "../../etc/passwd", "decoder.tasks=[segmentation,instances]")


def labels_symlink_out(i: Inputs) -> Case:
    folder = _faces(i, "symlink")
    secret = i.work / "outside.png"
    shutil.copy(folder / "images" / "face-000005.png", secret)
    os.remove(folder / "images" / "face-000005.png")
    os.symlink(secret, folder / "images" / "face-000005.png")
    return _labels_case(i, folder, "face-000005.png")


def labels_decompression_bomb(i: Inputs) -> Case:
    folder = _faces(i, "bomb")
    Image.new("L", (20000, 20000)).save(folder / "images" / "face-000006.png", optimize=True)
    return _labels_case(i, folder, "face-000006.png")


# --- prompts (`factory prompts expand`) ------------------------------------------------------------

def _prompts_case(i: Inputs, name: str, data: bytes, names: str | None = None) -> Case:
    path = i.work / name
    path.write_bytes(data)
    out = i.work / f"out-{name}"
    return Case(["prompts", "expand", str(i.dm_config), f"prompts.source={path}", f"generate.output={out}"],
                names or name, unpublished=[str(out)])


def prompts_empty_file(i: Inputs) -> Case:
    return _prompts_case(i, "empty.txt", b"")


def prompts_empty_prompt(i: Inputs) -> Case:
    return _prompts_case(i, "blank.jsonl", b'{"prompt": "a face"}\n{"prompt": "  "}\n', "blank.jsonl:2")


def prompts_too_long(i: Inputs) -> Case:
    return _prompts_case(i, "long.txt", b"a face\n" + b" ".join([b"very"] * 120) + b" long prompt\n", "long.txt:2 (")


def prompts_row_not_object(i: Inputs) -> Case:
    return _prompts_case(i, "list.jsonl", b'{"prompt": "a face"}\n["a", "list"]\n', "list.jsonl:2")


def prompts_bad_utf8(i: Inputs) -> Case:
    return _prompts_case(i, "latin1.txt", "a caf\u00e9 face\n".encode("latin-1"), "latin1.txt")


def prompts_unknown_type(i: Inputs) -> Case:
    return _prompts_case(i, "prompts.csv", b"prompt\na face\n", "prompts.csv")


# --- weights (`factory weights inspect` / `convert`) -----------------------------------------------

def weights_missing(i: Inputs) -> Case:
    return Case(["weights", "inspect", str(i.work / "missing.pkl")], "missing.pkl")


def weights_wrong_format(i: Inputs) -> Case:
    path = i.work / "random.pt"
    path.write_bytes(os.urandom(4096))
    return Case(["weights", "inspect", str(path)], "random.pt")


def weights_pickle_not_a_generator(i: Inputs) -> Case:
    path = i.work / "dict.pkl"
    path.write_bytes(pickle.dumps({"hello": [1, 2, 3]}))
    return Case(["weights", "inspect", str(path)], "dict.pkl")


class _Canary:
    """Unpickling this would run os.system: the restricted unpickler must refuse, not execute."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def weights_code_in_pickle(i: Inputs) -> Case:
    path, marker = i.work / "evil.pkl", i.work / "executed"
    path.write_bytes(pickle.dumps({"G_ema": _Canary(str(marker))}))
    out = i.work / "evil.safetensors"
    return Case(["weights", "convert", str(path), str(out)], "evil.pkl", unpublished=[str(marker), str(out)])


def weights_mismatched_architecture(i: Inputs) -> Case:
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(ROOT, "factory", "weights", "toy_stylegan2.safetensors"))
    first = next(k for k, t in tensors.items() if t.ndim == 4)
    tensors[first] = tensors[first][:, :-1].contiguous()  # one input channel short
    path = i.work / "mismatch.safetensors"
    save_file(tensors, str(path))
    return Case(["weights", "inspect", str(path)], "mismatch.safetensors")


# --- storage ---------------------------------------------------------------------------------------

def storage_unreachable(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.output=s3://somewhere/ds",
                 "storage.endpoint_url=http://127.0.0.1:9"], "http://127.0.0.1:9")


def storage_missing_bucket(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), "generate.output=s3://no-such-bucket/ds",
                 f"storage.endpoint_url={i.s3_endpoint}"], "no-such-bucket")


def storage_no_credentials(i: Inputs) -> Case:
    endpoint = i.s3_endpoint.replace("127.0.0.1", "localhost")  # a fresh client, built without credentials
    return Case(["inspect", f"s3://{i.bucket}/ds", "--endpoint-url", endpoint], f"s3://{i.bucket}/ds",
                env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                     "AWS_SHARED_CREDENTIALS_FILE": str(i.work / "none"), "AWS_CONFIG_FILE": str(i.work / "none"),
                     "AWS_EC2_METADATA_DISABLED": "true"})


def storage_denied_write(i: Inputs) -> Case:
    blocker = i.work / "a-file"
    blocker.write_text("not a folder")
    return Case(["generate", str(i.gan_config), f"generate.output={blocker}/ds"], f"{blocker}/ds")


def storage_missing_decoder(i: Inputs) -> Case:
    return Case(["generate", str(i.gan_config), f"generate.decoder={i.work}/no-decoder",
                 f"generate.output={i.work}/ds-no-decoder"], "no-decoder", unpublished=[f"{i.work}/ds-no-decoder"])


# --- datasets (readers and `factory inspect`) ------------------------------------------------------

def _dataset(i: Inputs, name: str, manifest: dict | None) -> Path:
    folder = i.work / name
    (folder / "parquet").mkdir(parents=True)
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _manifest(**fields) -> dict:
    return {"format": "factory.dataset/1", "name": "x", "task": "segmentation", "labels": ["bg", "fg"],
            "formats": ["parquet"], "num_samples": 4, "num_generated": 4, "num_shards": 1, "complete": True,
            "failed": [], "config_hash": "0" * 64, "build_hash": "0" * 64, "package_version": "0.1.0",
            "calibration": None, "shards": [{"name": "shard-00000", "count": 4, "generated": 4, "bytes": 10,
                                               "files": [{"path": "parquet/shard-00000.parquet", "bytes": 10,
                                                          "sha256": "0" * 64}]}], **fields}


def dataset_missing_manifest(i: Inputs) -> Case:
    folder = _dataset(i, "no-manifest", None)
    return Case(["inspect", str(folder)], "manifest.json", unpublished=[str(folder / "preview.png")])


def dataset_newer_format(i: Inputs) -> Case:
    folder = _dataset(i, "newer", _manifest(format="factory.dataset/9"))
    return Case(["inspect", str(folder)], "factory.dataset/9", unpublished=[str(folder / "preview.png")])


def dataset_shard_absent(i: Inputs) -> Case:
    folder = _dataset(i, "absent", _manifest())
    return Case(["inspect", str(folder)], "parquet/shard-00000.parquet", code=1,
                unpublished=[str(folder / "preview.png")])


def dataset_manifest_not_json(i: Inputs) -> Case:
    folder = _dataset(i, "not-json", None)
    (folder / "manifest.json").write_text("{ half")
    return Case(["inspect", str(folder)], "manifest.json", unpublished=[str(folder / "preview.png")])


def dataset_escaping_path(i: Inputs) -> Case:
    manifest = _manifest()
    manifest["shards"][0]["files"][0]["path"] = "../../outside.parquet"
    folder = _dataset(i, "escaping", manifest)
    return Case(["inspect", str(folder)], "../../outside.parquet", unpublished=[str(folder / "preview.png")])


def dataset_latest_missing(i: Inputs) -> Case:
    root = i.work / "nightly-root"
    root.mkdir()
    return Case(["inspect", f"{root}@latest"], str(root))


CASES: dict[str, tuple[str, Callable[[Inputs], Case]]] = {
    name.split("_", 1)[1]: (name.split("_", 1)[0], fn)
    for name, fn in list(globals().items())
    if callable(fn) and name.split("_", 1)[0] in {"config", "labels", "prompts", "weights", "storage", "dataset"}
}
"""case name -> (category, the function making its inputs)."""


def prepare(work: Path, s3_endpoint: str, bucket: str) -> Inputs:
    """Config files, a toy-world labeled folder with COCO instances, and an untrained decoder where the
    GAN config's `generate.decoder` points."""
    from factory import config as config_lib
    from factory.backbones import load_backbone
    from factory.data.toyworld import write_folder
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder
    from factory.toy.demo import demo_config

    work.mkdir(parents=True, exist_ok=True)
    gan = demo_config(str(work / "gan"), ["generate.num_samples=8", "generate.shard_size=4", "generate.batch_size=4",
                                          "decoder.num_heads=2"])
    dm = demo_config(str(work / "dm"), ["decoder.tasks=[segmentation]"], diffusion=True)
    gan_config, dm_config = work / "gan.yaml", work / "dm.yaml"
    gan_config.write_text(config_lib.to_yaml(gan))
    dm_config.write_text(config_lib.to_yaml(dm))
    backbone = load_backbone(gan.backbone)
    model = build_decoder(gan.decoder, backbone.feature_channels, len(gan.label_names())).eval()
    save_decoder(gan.generate.decoder, model, gan.decoder, gan.label_names(), backbone.feature_channels,
                 backbone.weights_hash, config_lib.to_yaml(gan))
    faces = work / "faces"
    write_folder(str(faces), 8, 0, 32)
    return Inputs(work, gan_config, dm_config, faces, s3_endpoint, bucket)


@dataclass
class Outcome:
    name: str
    category: str
    code: int | None
    stderr: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def run_case(name: str, inputs: Inputs) -> Outcome:
    """Run one case through `factory.cli.main` and judge it by the rule."""
    from factory import storage
    from factory.cli import main
    from factory.config import StorageConfig

    category, make = CASES[name]
    case = make(inputs)
    saved = {k: os.environ.get(k) for k in case.env}
    for k, v in case.env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    err, out = io.StringIO(), io.StringIO()
    code, problems = None, []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["--log-level", "CRITICAL", *case.argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        problems.append("traceback: " + traceback.format_exc().strip().splitlines()[-1])
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        storage.configure(StorageConfig())
    message = err.getvalue().strip()
    if code != case.code:
        problems.append(f"exit {code}, expected {case.code}")
    if "Traceback" in message:
        problems.append("a traceback on stderr")
    lines = message.splitlines()
    if case.code == 2 or lines:  # a failed inspect reports on stdout and may leave stderr empty
        shown = message if case.code == 2 else message + out.getvalue()
        if case.code == 2 and len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if case.names not in shown:
            problems.append(f"the error does not name {case.names!r}")
    elif case.names not in out.getvalue():
        problems.append(f"the report does not name {case.names!r}")
    for path in case.unpublished:
        if os.path.exists(path):
            problems.append(f"{path} was written")
    return Outcome(name, category, code, message if message else out.getvalue()[-200:], problems)


def run_all(work: Path, s3_endpoint: str, bucket: str) -> list[Outcome]:
    inputs = prepare(work, s3_endpoint, bucket)
    return [run_case(name, inputs) for name in CASES]


@contextlib.contextmanager
def loopback_s3():
    """A loopback S3 server (benchmarks/machine.py) with one bucket; yields (endpoint, bucket)."""
    from machine import loopback_s3 as server

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with server("bad-input") as endpoint:
        yield endpoint, "bad-input"


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bad-input-") as d, loopback_s3() as (endpoint, bucket):
        outcomes = run_all(Path(d), endpoint, bucket)
    for o in outcomes:
        print(f"{'ok  ' if o.ok else 'FAIL'} {o.category:8s} {o.name:28s} exit {o.code}  {o.stderr.splitlines()[-1][:110]}"
              + ("" if o.ok else f"   <- {'; '.join(o.problems)}"))
    met = sum(o.ok for o in outcomes)
    print(f"{met} of {len(outcomes)} bad inputs refused by the rule")
    return 0 if met == len(outcomes) else 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
