"""`factory annotate suggest`: which images a person should label next.

After a first round of labels and a first fit, the decoder's ensemble disagreement says where it is
unsure. A pool of candidates (seeds on the GAN path, a folder of unlabeled photos on the diffusion
path) is scored on Ray Data with the fitted decoder, and K are picked that are both uncertain and
unlike each other and unlike what is labeled already:

    1. check inputs   the decoder was fitted on this backbone; the pool leaves out labeled seeds
    2. score          candidates -> actor pool: backbone (or inversion) -> decoder -> (score, embedding)
    3. select         uncertainty-weighted farthest-point sampling (`select`)
    4. export         GAN: the chosen seeds join the export (images/, export.json) like `annotate
                      export` writes it, and `annotate import` takes both rounds together;
                      diffusion: the chosen photos are copied into labels.dir/images/

Why this selection: ranking by uncertainty alone picks near-duplicates (a generator's uncertain
images cluster: one pose, one occluder), and pure diversity (k-center/core-set) spends labels where
the decoder is already right. Weighting each candidate's distance to the nearest chosen-or-labeled
image by its uncertainty and taking the largest product, greedily, trades the two without a knob.
Distances are Euclidean in the backbone's own features (each map's channels averaged over space,
standardised per channel over the pool), which is what the decoder reads.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from factory import config as config_lib
from factory import storage
from factory.backbones import backbone_identity
from factory.config import ConfigError, FactoryConfig
from factory.data import annotations
from factory.data.image_folder import IMAGES_DIR, ImageFolder, load_image_folder
from factory.recipes import annotate
from factory.recipes.generate import (
    check_decoder_fits,
    fitted_decoder_metadata,
    load_models,
    map_on_actors,
)
from factory.recipes.train import labeled_file

log = logging.getLogger(__name__)

SUGGESTED = "suggested.json"
"""What `annotate suggest` chose, with scores, in the folder it exported to."""


def embed(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, sum of channels]: every feature map's channels averaged over space."""
    return torch.cat([f.float().flatten(2).mean(2) for f in features], dim=1)


def select(scores: np.ndarray, embeddings: np.ndarray, k: int, labeled: np.ndarray | None = None) -> list[int]:
    """Indices of `k` candidates by uncertainty-weighted farthest-point sampling: repeatedly take the
    candidate with the largest uncertainty x distance to the nearest labeled or already chosen one
    (the first pick, with nothing labeled, is the most uncertain). Deterministic: ties go to the
    lower index."""
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} candidates")
    pool = np.asarray(embeddings, dtype=np.float64)
    anchors = np.zeros((0, pool.shape[1])) if labeled is None else np.asarray(labeled, dtype=np.float64)
    both = np.concatenate([pool, anchors])
    mean, std = both.mean(0), both.std(0) + 1e-8
    z, za = (pool - mean) / std, (anchors - mean) / std
    weight = np.asarray(scores, dtype=np.float64)
    weight = weight / max(weight.max(), 1e-12) + 1e-6  # never exactly 0, so distance still counts
    nearest = np.full(n, np.inf)
    for a in za:
        nearest = np.minimum(nearest, np.linalg.norm(z - a, axis=1))
    chosen: list[int] = []
    for _ in range(k):
        gain = weight * nearest if np.isfinite(nearest).all() else weight.copy()
        gain[chosen] = -np.inf
        i = int(np.argmax(gain))
        chosen.append(i)
        nearest = np.minimum(nearest, np.linalg.norm(z - z[i], axis=1))
    return chosen


def score_seeds(backbone, decoder, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B], embeddings [B, D]) of generated images, one forward pass."""
    with torch.inference_mode():
        out = backbone(seeds)
        labels = decoder(out.features, (backbone.resolution, backbone.resolution))
        return labels.score.numpy(), embed(out.features).cpu().numpy()


def score_photos(backbone, decoder, images: np.ndarray, prompts: list[str], seeds: list[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, embeddings) of real photos through inversion (diffusion backbones)."""
    with torch.inference_mode():
        features = backbone.invert(images, prompts, seeds)
        labels = decoder(features, (backbone.resolution, backbone.resolution))
        return labels.score.numpy(), embed(features).cpu().numpy()


class PoolScorer:
    """Ray Data actor: loads the backbone and fitted decoder once; a row is one batch of candidates
    (seeds, or indices into the candidate folder), scored in one forward pass."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = config_lib.from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.backbone, self.decoder = load_models(self.cfg)
        self.photos = None
        if self.cfg.backbone.kind == "diffusion":
            self.photos = load_image_folder(self.cfg.annotate.candidates, self.backbone.resolution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(i) for i in batch["ids"][0]]
        if self.photos is None:
            scores, emb = score_seeds(self.backbone, self.decoder, ids)
        else:
            scores, emb = score_photos(self.backbone, self.decoder, self.photos.images[ids],
                                       [self.photos.prompts[i] for i in ids], ids)
        return {"id": np.asarray(ids, dtype=np.int64), "score": scores.astype(np.float64),
                "embedding": np.asarray(emb, dtype=np.float32)}


def score_pool(cfg: FactoryConfig, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and embeddings of candidates `ids` on the build's actor pool, in the order of `ids`."""
    import ray

    size = cfg.annotate.batch_size
    items = [{"ids": ids[i : i + size]} for i in range(0, len(ids), size)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = map_on_actors(ds, PoolScorer, cfg, len(items), {"cfg": config_lib.to_dict(cfg)})
    found: dict[int, tuple[float, np.ndarray]] = {}
    for row in ds.iter_rows():
        found[int(row["id"])] = (float(row["score"]), np.asarray(row["embedding"]))
    return np.array([found[i][0] for i in ids]), np.stack([found[i][1] for i in ids])


def check_decoder(cfg: FactoryConfig) -> None:
    """The fitted decoder reads this backbone's features (the check `factory generate` makes)."""
    meta = fitted_decoder_metadata(cfg.generate.decoder)
    check_decoder_fits(meta, backbone_identity(cfg.backbone), cfg.generate.decoder)


@dataclass
class Pool:
    """What `check_inputs` found: the candidates to score and what is labeled already."""

    ids: list[int]
    """Seeds (GAN path) or indices into `photos` (diffusion path)."""
    labeled: list[int] = field(default_factory=list)
    """GAN path: the exported seeds, scored for distances."""
    photos: ImageFolder | None = None
    """Diffusion path: the candidate photos, as read."""


def check_inputs(cfg: FactoryConfig, num_images: int, pool_size: int | None = None) -> Pool:
    """1. Check inputs, in seconds and before a cluster starts: the decoder fits the backbone, the
    last round is labeled, the pool holds `num_images` candidates."""
    a = cfg.annotate
    pool_size = pool_size or a.pool_size
    if num_images > pool_size:
        raise ConfigError(f"--num-images {num_images} is more than the pool of {pool_size} candidates (--pool)")
    check_decoder(cfg)
    if cfg.backbone.kind == "diffusion":
        return _photo_pool(cfg, num_images, pool_size)
    export = annotations.read_export(a.dir)
    unlabeled = unlabeled_suggestions(cfg)
    if unlabeled:
        raise ConfigError(
            f"{os.path.join(a.dir, SUGGESTED)}: {len(unlabeled)} image(s) the last `annotate suggest` chose are not in "
            f"train.labeled yet ({', '.join(unlabeled[:4])}{' ...' if len(unlabeled) > 4 else ''} in "
            f"{os.path.join(a.dir, annotations.IMAGES_DIR)}): label them (or list them in {annotations.SKIP_FILE}), "
            "run `factory annotate import` and `factory train`, then suggest the next round")
    labeled_seeds = [r["seed"] for r in export["images"]]
    taken = set(labeled_seeds)
    pool = [s for s in range(a.pool_start_seed, a.pool_start_seed + pool_size) if s not in taken]
    if len(pool) < num_images:
        raise ConfigError(
            f"annotate.pool_start_seed={a.pool_start_seed}: {pool_size - len(pool)} of the pool's {pool_size} seeds "
            f"({a.pool_start_seed} to {a.pool_start_seed + pool_size - 1}) are exported already, leaving {len(pool)} "
            f"candidates for --num-images {num_images}; move annotate.pool_start_seed past the exported seeds "
            f"or raise --pool")
    return Pool(pool, labeled_seeds)


def unlabeled_suggestions(cfg: FactoryConfig) -> list[str]:
    """The images the last `annotate suggest` exported (suggested.json) that are neither in the
    labeled set (`train.labeled`) nor listed in skip.txt: a new round would leave them unlabeled,
    and `annotate import` takes every exported image."""
    a = cfg.annotate
    path = os.path.join(a.dir, SUGGESTED)
    if not os.path.isfile(path):
        return []
    chosen = [r["file"] for r in storage.read_json(path)["images"]]
    done: set[str] = set()
    if storage.exists(cfg.train.labeled):  # local or, on a cluster, s3://
        done |= set(annotations.load_labeled_set(labeled_file(cfg)).files)
    done |= annotations.skipped(a.dir, [])  # an unreadable skip.txt is named by `annotate import`
    return [f for f in chosen if f not in done]


def suggest(cfg: FactoryConfig, num_images: int, pool_size: int | None = None, checked: Pool | None = None) -> dict:
    """Choose `num_images` candidates to label next and export them (see the module doc); returns
    the record written to suggested.json. `checked`: what `check_inputs` returned, if called already."""
    a = cfg.annotate
    pool_size = pool_size or a.pool_size
    # 1. Check inputs.
    checked = checked or check_inputs(cfg, num_images, pool_size)
    if cfg.backbone.kind == "diffusion":
        return suggest_photos(cfg, num_images, checked)
    pool, labeled_seeds = checked.ids, checked.labeled
    # 2. Score the pool and the labeled images (for distances) on Ray Data.
    scores, emb = score_pool(cfg, pool + labeled_seeds)
    # 3. Select.
    chosen = select(scores[: len(pool)], emb[: len(pool)], num_images, emb[len(pool):])
    seeds = sorted(pool[i] for i in chosen)
    # 4. Export beside the first round.
    files = annotate.add_to_export(cfg, seeds)
    by_seed = {pool[i]: rank for rank, i in enumerate(chosen)}
    record = {"method": "uncertainty-weighted farthest-point sampling on pooled backbone features",
              "pool": [a.pool_start_seed, a.pool_start_seed + pool_size], "pool_scored": len(pool),
              "pool_score_mean": float(scores[: len(pool)].mean()), "decoder": cfg.generate.decoder,
              "images": [{"file": f, "seed": s, "rank": by_seed[s], "uncertainty": float(scores[pool.index(s)])}
                         for f, s in zip(files, seeds)]}
    storage.write_json(os.path.join(a.dir, SUGGESTED), record)
    log.info("suggested %d of %d seeds into %s", len(seeds), len(pool), a.dir)
    return record


def _photo_pool(cfg: FactoryConfig, num_images: int, pool_size: int) -> Pool:
    """The diffusion path's candidates: the photos in `annotate.candidates` not yet in labels.dir/images/."""
    a = cfg.annotate
    if a.candidates is None:
        raise ConfigError("annotate.candidates must name a folder of unlabeled photos to choose from "
                          "(diffusion backbones suggest real images, not seeds)")
    if cfg.labels.dir is None:
        raise ConfigError("labels.dir must name the labeled folder the chosen photos join")
    candidates = load_image_folder(a.candidates, cfg.backbone.diffusion.resolution)
    target = os.path.join(cfg.labels.dir, IMAGES_DIR)
    have = set(os.listdir(target)) if os.path.isdir(target) else set()
    pool = [i for i, name in enumerate(candidates.files) if name not in have][:pool_size]
    if len(pool) < num_images:
        raise ConfigError(f"annotate.candidates={a.candidates}: {len(pool)} photos not yet in {target}, "
                          f"fewer than --num-images {num_images}")
    return Pool(pool, photos=candidates)


def suggest_photos(cfg: FactoryConfig, num_images: int, checked: Pool) -> dict:
    """The diffusion path: choose among the unlabeled photos in `annotate.candidates` and copy them
    into labels.dir/images/, where `factory labels import` expects them with their labels."""
    a = cfg.annotate
    candidates, pool = checked.photos, checked.ids
    target = os.path.join(cfg.labels.dir, IMAGES_DIR)
    have = set(os.listdir(target)) if os.path.isdir(target) else set()
    # 2. Score the candidates and the labeled photos (for distances).
    scores, emb = score_pool(cfg, pool)
    labeled = None
    if have:
        backbone, decoder = load_models(cfg)  # the driver scores the few labeled photos
        first = load_image_folder(cfg.labels.dir, backbone.resolution)
        _, labeled = score_photos(backbone, decoder, first.images, first.prompts, list(range(len(first.files))))
    # 3. Select. 4. Copy the chosen photos (their files as they are) beside the labeled ones.
    chosen = select(scores, emb, num_images, labeled)
    os.makedirs(target, exist_ok=True)
    source_dir = os.path.join(a.candidates, IMAGES_DIR)
    source_dir = source_dir if os.path.isdir(source_dir) else a.candidates
    images = []
    for rank, i in enumerate(chosen):
        name = candidates.files[pool[i]]
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(target, name))
        images.append({"file": name, "rank": rank, "uncertainty": float(scores[i])})
    record = {"method": "uncertainty-weighted farthest-point sampling on pooled backbone features (inverted photos)",
              "candidates": a.candidates, "pool_scored": len(pool), "decoder": cfg.generate.decoder,
              "images": sorted(images, key=lambda r: r["file"])}
    storage.write_json(os.path.join(cfg.labels.dir, SUGGESTED), record)
    log.info("suggested %d of %d photos into %s", len(images), len(pool), target)
    return record
