"""Typed configuration: one dataclass per section, loaded through `OmegaConf.structured`.

The dataclass defaults *are* the embedded default (a tiny built-in StyleGAN2 and a toy class list),
so `factory demo` needs no file. YAML files under `configs/` overlay them; `key=value` arguments
overlay the file. Unknown keys, wrong types and bad values raise `ConfigError` naming the key.

The sections live in `models.py` (backbone, decoder, labels) and `stages.py` (Ray, storage and each
stage); their shared checks in `checks.py`. This module assembles them into `FactoryConfig` and loads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import is_dict_annotation, is_list_annotation
from omegaconf.errors import (
    GrammarParseError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from factory import textfile
from factory.config.checks import ConfigError, no_credentials
from factory.config.models import (
    DECODER_TASKS,
    DTYPES,
    SCHEDULERS,
    BackboneConfig,
    DecoderConfig,
    DiffusionConfig,
    LabelsConfig,
    StyleGAN2Config,
)
from factory.config.stages import (
    AnnotateConfig,
    CardConfig,
    GenerateConfig,
    NightlyConfig,
    PretrainConfig,
    PromptsConfig,
    RayConfig,
    StorageConfig,
    TrainConfig,
)

__all__ = [
    "DECODER_TASKS", "DTYPES", "SCHEDULERS", "SHIPPED", "SHIPPED_DIR", "AnnotateConfig", "BackboneConfig", "CardConfig",
    "ConfigError", "DecoderConfig", "DiffusionConfig", "FactoryConfig", "GenerateConfig", "LabelsConfig",
    "NightlyConfig", "PretrainConfig", "PromptsConfig", "RayConfig", "StorageConfig", "StyleGAN2Config",
    "TrainConfig", "absolute_paths", "from_dict", "load_config", "shipped_path", "stable_hash", "to_dict",
    "to_yaml",
]


@dataclass
class FactoryConfig:
    name: str = "demo"
    """A name for this factory, recorded in checkpoints and manifests."""
    workdir: str = "factory-work"
    """Base folder the default paths below are relative to."""
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    card: CardConfig = field(default_factory=CardConfig)

    def label_names(self) -> list[str]:
        """What the decoder predicts: the classes (segmentation) or the keypoint names."""
        if self.decoder.kind == "perception":
            return self.labels.classes
        return self.labels.classes if self.decoder.task == "segmentation" else self.labels.keypoints

    def __post_init__(self) -> None:
        if "keypoints" in self.decoder.active_tasks() and not self.labels.keypoints:
            raise ConfigError("labels.keypoints must name the keypoints when the decoder predicts keypoints")
        if self.backbone.kind == "diffusion" and self.decoder.kind != "perception":
            raise ConfigError("backbone.kind 'diffusion' needs decoder.kind 'perception' (its features are "
                              "multi-scale maps fitted on real images)")
        if self.backbone.kind == "stylegan2" and self.decoder.kind != "interpreter":
            raise ConfigError("backbone.kind 'stylegan2' needs decoder.kind 'interpreter' (the perception "
                              "decoder is fitted on inverted real images, which needs a diffusion backbone)")
        if (self.backbone.kind == "stylegan2" and self.pretrain.output is not None
                and not self.pretrain.output.endswith(".safetensors")):
            raise ConfigError(f"pretrain.output must name a .safetensors file for backbone.kind 'stylegan2', "
                              f"got {self.pretrain.output}")
        if self.backbone.kind == "stylegan2" and self.train.val_images >= self.annotate.num_images:
            raise ConfigError(
                f"train.val_images ({self.train.val_images}) must be smaller than "
                f"annotate.num_images ({self.annotate.num_images})"
            )


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FactoryConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated, interpolations resolved."""
    merged = OmegaConf.structured(FactoryConfig)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                text = textfile.decode(f.read(), path)
            root = yaml.compose(text, Loader=yaml.SafeLoader)  # the top level's kind, before OmegaConf reads it
            if root is not None and not isinstance(root, yaml.MappingNode):
                held = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {_short(root.value)}"
                raise ConfigError(f"{path}: a config file is a mapping of sections (key: value), this one holds {held}")
            loaded = OmegaConf.load(io.StringIO(text))
            clash = _container_clash(merged, loaded)
            if clash:
                raise ConfigError(f"{path}: {clash}")
            merged = OmegaConf.merge(merged, loaded)
        except textfile.NotText as e:
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad[0]!r}")
    try:
        for override in overrides:  # one at a time, to name the one whose list or mapping does not fit
            given = OmegaConf.from_dotlist([override])
            clash = _container_clash(merged, given)
            if clash:
                raise ConfigError(f"override {override!r}: {clash}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)  # runs every __post_init__
    except yaml.YAMLError as e:
        raise ConfigError(f"override is not valid YAML: {' '.join(str(e).split())}") from None
    except OmegaConfBaseException as e:
        overridden = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        if isinstance(e, (InterpolationResolutionError, GrammarParseError)) and getattr(e, "full_key", None) \
                not in overridden and path is not None:  # an interpolation the file wrote, resolved only now
            raise ConfigError(f"{path}: {_describe(e)}") from None
        raise ConfigError(f"override: {_describe(e)}" if overrides else _describe(e)) from None
    return absolute_paths(cfg)


PATH_KEYS = ("backbone.weights", "annotate.latents", "annotate.candidates", "labels.dir", "prompts.source", "annotate.dir", "train.labeled",
             "train.storage_path", "generate.decoder", "generate.output", "nightly.root", "pretrain.images", "pretrain.output", "pretrain.storage_path",
             "pretrain.vae_from")


SHIPPED = "pkg://"
"""`backbone.weights: pkg://NAME` names weights shipped with the package, in factory/weights/."""
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def shipped_path(value: str, key: str = "backbone.weights") -> str:
    """The local path of `pkg://NAME`; ConfigError naming `key` and what is shipped if NAME is not."""
    path = os.path.join(SHIPPED_DIR, value[len(SHIPPED):])
    if not value[len(SHIPPED):] or not os.path.exists(path):
        have = sorted(n for n in os.listdir(SHIPPED_DIR) if not n.endswith(".json")) if os.path.isdir(SHIPPED_DIR) else []
        raise ConfigError(f"{key}={value}: no such shipped weights (shipped: {have})")
    return path


def absolute_paths(cfg: FactoryConfig) -> FactoryConfig:
    """Local paths made absolute, so Ray workers (which run elsewhere) see the same files; shipped
    weights (`pkg://NAME`) resolved to their place in the installed package."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and "://" in value:
            no_credentials(key, value)  # `s3://KEY:SECRET@bucket` would reach the manifest and the logs
        if key in ("backbone.weights", "pretrain.vae_from") and value is not None and value.startswith(SHIPPED):
            setattr(getattr(cfg, section), name, shipped_path(value, key))
            continue
        if key == "backbone.weights" and value is not None and not os.path.exists(value):
            continue  # maybe a hub id ("org/model"); loading names it if it is neither
        if value is not None and "://" not in value:
            setattr(getattr(cfg, section), name, os.path.abspath(value))
    return cfg


def from_dict(data: dict) -> FactoryConfig:
    """Rebuild a config shipped across processes (e.g. to Ray workers) as a plain dict (`to_dict`).
    Its strings are final: load_config resolved the interpolations, and a `${` left in a value is
    literal (the user escaped it), so it is escaped again rather than resolved a second time."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FactoryConfig), _escaped(data)))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None


def _escaped(value: object) -> object:
    """`value` with every `${` in its strings escaped the way OmegaConf reads back literally: `\\${`,
    with the backslashes before it doubled (OmegaConf reads `\\\\` before an interpolation as one)."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def to_dict(cfg: FactoryConfig) -> dict:
    return asdict(cfg)


def to_yaml(cfg: FactoryConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stable_hash(obj: object) -> str:
    """sha256 of a JSON-able object in canonical form: equal settings give equal hashes everywhere."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _container_clash(base: DictConfig, given: DictConfig, prefix: str = "") -> str | None:
    """Where `given` holds a mapping and `base` (the config so far) a list, or the reverse, said
    with the key: OmegaConf's merge only says "Cannot merge incompatible container types"."""
    for key in given:
        full = f"{prefix}{key}"
        value = given._get_node(key)
        expected = base._get_node(key)
        if expected is None:  # a new entry of a typed mapping (prompts.attributes): its element type decides
            element = base._metadata.element_type
            expected = ListConfig([]) if is_list_annotation(element) else DictConfig({}) if is_dict_annotation(element) \
                else None
        if isinstance(expected, ListConfig) and isinstance(value, DictConfig):
            return f"{full} is a list, got a mapping {_short(OmegaConf.to_container(value))} (give the whole list: [a, b])"
        if isinstance(expected, DictConfig) and isinstance(value, ListConfig):
            return f"{full} is a mapping (key: value), got a list {_short(OmegaConf.to_container(value))}"
        if isinstance(expected, DictConfig) and isinstance(value, DictConfig):
            clash = _container_clash(expected, value, f"{full}.")
            if clash:
                return clash
    return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    if key and key not in first:
        return f"{first} (key: {key})"
    return first
