import glob
import os

import pytest

from factory.config import ConfigError, FactoryConfig, load_config, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert isinstance(cfg, FactoryConfig)
    assert cfg.backbone.weights is None and cfg.backbone.stylegan2.resolution == 32
    assert cfg.annotate.dir == os.path.abspath("factory-work/annotations")  # absolute: Ray workers run elsewhere
    assert cfg.generate.decoder == os.path.abspath("factory-work/train/interpreter/decoder")
    assert load_config(None, ["generate.output=s3://bucket/ds"]).generate.output == "s3://bucket/ds"


def test_demo_yaml_spells_out_what_the_demo_runs(tmp_path):
    from factory.config import to_dict
    from factory.toy.demo import demo_config

    from_file = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"workdir={tmp_path}"])
    assert to_dict(from_file) == to_dict(demo_config(str(tmp_path)))
    from_file = load_config(os.path.join(ROOT, "configs", "demo_dm.yaml"), [f"workdir={tmp_path}"])
    assert to_dict(from_file) == to_dict(demo_config(str(tmp_path), diffusion=True))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename)
def test_every_config_file_validates(path, tmp_path):
    cfg = load_config(path)
    assert cfg.name
    # the resolved config, as written next to checkpoints, loads back to the same config
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(cfg))
    assert load_config(str(resolved)) == cfg


def test_overrides_apply_and_interpolate():
    cfg = load_config(None, ["workdir=/data/x", "train.steps=7", "labels.classes=[bg,a,b]"])
    assert cfg.train.steps == 7
    assert cfg.labels.classes == ["bg", "a", "b"]
    assert cfg.train.labeled == "/data/x/annotations/labeled.safetensors"


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*stpes"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.stpes=3", "stpes"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("decoder.task=depth", "decoder.task"),
        ("backbone.psi=5", "backbone.psi"),
        ("stylegan2.resolution=32", "stylegan2"),
        ("backbone.stylegan2.resolution=24", "resolution"),
        ("train.val_images=16", "train.val_images"),
        ("generate.batch_size", "key=value"),
        ("generate.start_seed=9223372036854775800", r"generate.start_seed \+ generate.num_samples must be at most 2\*\*63"),
        ("generate.start_seed=-1", "generate.start_seed must be >= 0, got -1"),
        ("annotate.start_seed=-1", "annotate.start_seed must be >= 0, got -1"),
        ("annotate.start_seed=99999999999999999999", r"annotate.start_seed \+ annotate.num_images must be at most 2\*\*63"),
        ("annotate.pool_start_seed=-1", "annotate.pool_start_seed must be >= 0"),
        ("train.max_failures=-1", "train.max_failures must be >= 0"),
        ("train.seed=-2", "train.seed must be >= 0"),
        ("pretrain.seed=-2", "pretrain.seed must be >= 0"),
        ("prompts.seed=-2", "prompts.seed must be >= 0"),
        ("backbone.init_seed=-1", "backbone.init_seed must be >= 0"),
        ("decoder.init_seed=-1", "decoder.init_seed must be >= 0"),
        ("nightly.label_samples=-5", "nightly.label_samples must be >= 0"),
        ("ray.num_cpus=0", "ray.num_cpus must be >= 1"),
    ],
)
def test_bad_override_names_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_keypoints_need_names():
    with pytest.raises(ConfigError, match="labels.keypoints"):
        load_config(None, ["decoder.task=keypoints"])


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        (b"name: caf\xe9\n", [], r"bad\.yaml:1: not UTF-8 text \(byte 0xe9 at offset 9\)"),
        (b"name: demo\ntrain:\n  caf\xe9: 1\n", [], r"bad\.yaml:3: not UTF-8 text \(byte 0xe9 at offset 23\)"),
        (b"name: ${nope}\n", ["train.steps=3"], r"bad\.yaml: Interpolation key 'nope' not found \(key: name\)"),
        (b"name: demo\n", ["name=${nope}"], r"override: Interpolation key 'nope' not found"),
    ],
    ids=["latin1", "latin1-line-3", "interpolation-in-file", "interpolation-in-override"],
)
def test_file_encoding_and_interpolation_errors_name_their_source(tmp_path, content, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), overrides)


def test_a_byte_order_mark_in_the_config_file_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: bom\n")
    assert load_config(str(path)).name == "bom"


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the config whose type is a float (or float | None), found from the dataclasses."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float or float in typing.get_args(hint):
            keys.append(prefix + f.name)
    return keys


FLOAT_KEYS = _float_keys(FactoryConfig)


def test_the_float_keys_are_found():
    assert {"backbone.diffusion.guidance_scale", "train.lr", "labels.depth_scale", "generate.drop_uncertain",
            "backbone.stylegan2.conv_clamp", "pretrain.flow_shift"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_infinity(key, value):
    """NaN passes no comparison and inf every lower bound: inf guidance gave black images, NaN
    features and a NaN drop threshold, with exit 0."""
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must .*got {value}$"):
        load_config(None, [f"{key}={value}"])
