"""`factory annotate suggest`: uncertainty-weighted farthest-point selection, and the GAN path end to
end on Ray: the chosen seeds join the export like `annotate export` writes it, `annotate import`
takes both rounds together, and training regenerates every image bit for bit. Bad input (a decoder
fitted on other features, a pool of exported seeds, a last round still unlabeled) is refused before
a cluster starts."""

import json
import os

import numpy as np
import pytest
from conftest import save_untrained_decoder

from factory.cli import main
from factory.recipes.suggest import select


def test_select_prefers_uncertain_images_unlike_each_other_and_the_labeled_ones():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(20, 8)) * 3
    clones = np.repeat(rng.normal(size=(1, 8)), 5, axis=0) + rng.normal(size=(5, 8)) * 1e-3
    emb = np.concatenate([clones, spread])
    scores = np.concatenate([np.full(5, 1.0), np.full(20, 0.6)])
    chosen = select(scores, emb, 4)
    assert chosen[0] == 0  # the most uncertain first (ties: the lower index)
    assert sum(i < 5 for i in chosen) == 1  # one of the five near-duplicates, not all of them
    assert np.argsort(-scores, kind="stable")[:4].tolist() == [0, 1, 2, 3]  # what uncertainty alone would take
    again = select(scores, emb, 4, labeled=emb[:1])  # a clone is labeled already: none is chosen
    assert all(i >= 5 for i in again) and again == select(scores, emb, 4, labeled=emb[:1])
    flat = select(np.zeros(25), emb, 3)  # no uncertainty anywhere: plain farthest-point sampling
    assert len(set(flat)) == 3
    with pytest.raises(ValueError, match="cannot choose 30 of 25"):
        select(scores, emb, 30)


@pytest.mark.slow
@pytest.mark.integration
def test_suggested_seeds_are_exported_imported_and_regenerated(tiny_cfg, labeled_dir, ray_cluster, tmp_path, capsys):
    from factory.backbones import load_backbone
    from factory.data.annotations import load_labeled_set
    from factory.recipes.objectives import regenerate
    from factory.toy.annotator import annotate_by_rule

    save_untrained_decoder(tiny_cfg)
    config = tmp_path / "factory.yaml"
    config.write_text(f"workdir: {tmp_path}\nannotate: {{num_images: 8, batch_size: 3}}\ndecoder: {{num_heads: 3}}\n"
                      "train: {val_images: 2}\ngenerate: {num_actors: 2, cpus_per_actor: 0.5}\n")
    first = json.loads(open(f"{labeled_dir}/export.json").read())
    assert main(["annotate", "suggest", str(config), "--num-images", "5", "--pool", "30"]) == 0
    assert "suggested 5 of 30 candidates" in capsys.readouterr().out
    export = json.loads(open(f"{labeled_dir}/export.json").read())
    suggested = json.loads(open(f"{labeled_dir}/suggested.json").read())
    new = [r["seed"] for r in export["images"][8:]]
    assert export["images"][:8] == first["images"] and len(new) == 5 and set(new) <= set(range(100_000, 100_030))
    assert sorted(r["seed"] for r in suggested["images"]) == new and sorted(r["rank"] for r in suggested["images"]) == list(range(5))
    assert export["batches"] == first["batches"] + [new[:3], new[3:]]  # annotate.batch_size=3
    # a next round waits until this one is labeled and imported (import takes every exported image)
    assert main(["annotate", "suggest", str(config), "--num-images", "2", "--pool", "30"]) == 2
    assert "5 image(s) the last `annotate suggest` chose are not in train.labeled yet" in capsys.readouterr().err
    annotate_by_rule(labeled_dir)
    assert main(["annotate", "import", str(config)]) == 0
    # a second round never repeats a seed
    assert main(["annotate", "suggest", str(config), "--num-images", "2", "--pool", "30"]) == 0
    again = json.loads(open(f"{labeled_dir}/export.json").read())
    seeds = [r["seed"] for r in again["images"]]
    assert len(seeds) == 15 == len(set(seeds))
    # the annotator labels the new images; import takes all rounds; training regenerates them all
    annotate_by_rule(labeled_dir)
    assert main(["annotate", "import", str(config)]) == 0
    labeled = load_labeled_set(tiny_cfg.train.labeled)
    assert sorted(labeled.seeds.tolist()) == sorted(seeds)
    features = regenerate(labeled, load_backbone(tiny_cfg.backbone))
    assert features[0].shape[0] == 15


def _no_cluster(monkeypatch):
    import factory.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray cluster was started before the input was checked")

    monkeypatch.setattr(factory.runtime, "init_ray", refuse)


def test_suggest_errors_are_one_line(tiny_cfg, labeled_dir, tmp_path, capsys, monkeypatch):
    _no_cluster(monkeypatch)
    config = tmp_path / "factory.yaml"
    config.write_text(f"workdir: {tmp_path}\nannotate: {{num_images: 8}}\ndecoder: {{num_heads: 3}}\ntrain: {{val_images: 2}}\n")
    assert main(["annotate", "suggest", str(config), "--num-images", "0"]) == 2
    assert "--num-images and --pool must be >= 1" in capsys.readouterr().err
    assert main(["annotate", "suggest", str(config), "--num-images", "5"]) == 2  # no decoder fitted yet
    assert "run `factory train` first" in capsys.readouterr().err
    save_untrained_decoder(tiny_cfg)
    assert main(["annotate", "suggest", str(config), "--num-images", "50", "--pool", "10"]) == 2
    assert "more than the pool of 10" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_diffusion_path_suggests_unlabeled_photos_into_the_labeled_folder(tmp_path, ray_cluster):
    import os

    from factory.config import load_config
    from factory.data import toyworld
    from factory.recipes.suggest import suggest

    labeled, candidates = tmp_path / "labeled", tmp_path / "candidates"
    toyworld.write_folder(str(labeled), 2, start_seed=0, size=32)
    toyworld.write_folder(str(candidates), 8, start_seed=50, size=32)
    cfg = load_config("configs/diffusion.yaml", [
        f"workdir={tmp_path}", "backbone.diffusion.resolution=32", "backbone.diffusion.steps=2", "decoder.num_heads=2",
        f"labels.dir={labeled}", f"annotate.candidates={candidates}", "annotate.batch_size=4",
        "generate.num_actors=1", "generate.cpus_per_actor=0.5"])
    save_untrained_decoder(cfg)
    record = suggest(cfg, 3, pool_size=8)
    names = [r["file"] for r in record["images"]]
    assert len(names) == 3 and record["pool_scored"] == 8
    for name in names:  # copied byte for byte beside the labeled photos, for the annotators
        assert open(candidates / "images" / name, "rb").read() == open(labeled / "images" / name, "rb").read()
    assert len(os.listdir(labeled / "images")) == 5 and (labeled / "suggested.json").is_file()
    again = suggest(cfg, 2, pool_size=8)  # the next round leaves out what is in the labeled folder now
    assert not set(r["file"] for r in again["images"]) & set(names) and again["pool_scored"] == 5


def _save_decoder_with_layout(cfg):
    """An untrained decoder published with the feature layout it was fitted on, as `factory train` does."""
    from factory import config as config_lib
    from factory.backbones import backbone_identity, load_backbone
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder

    backbone = load_backbone(cfg.backbone)
    model = build_decoder(cfg.decoder, backbone.feature_channels, len(cfg.label_names()), 0).eval()
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.label_names(), backbone.feature_channels,
                 backbone.weights_hash, config_lib.to_yaml(cfg), feature_names=backbone_identity(cfg.backbone).feature_names)


def test_suggest_checks_the_decoder_and_pool_before_a_cluster_starts(tiny_cfg, labeled_dir, tmp_path, capsys, monkeypatch):
    _no_cluster(monkeypatch)
    config = tmp_path / "factory.yaml"
    config.write_text(f"workdir: {tmp_path}\nannotate: {{num_images: 8}}\ndecoder: {{num_heads: 3}}\ntrain: {{val_images: 2}}\n")
    _save_decoder_with_layout(tiny_cfg)
    # the decoder reads other features than the config taps: generate's check, exit 2
    assert main(["annotate", "suggest", str(config), "backbone.feature_resolutions=[16]", "--num-images", "2"]) == 2
    assert "was fitted on features" in capsys.readouterr().err
    # the pool overlaps the exported seeds 0-7: say by how much
    assert main(["annotate", "suggest", str(config), "annotate.pool_start_seed=0", "--num-images", "5", "--pool", "10"]) == 2
    assert ("annotate.pool_start_seed=0: 8 of the pool's 10 seeds (0 to 9) are exported already, leaving 2 candidates "
            "for --num-images 5") in capsys.readouterr().err


def test_a_suggested_round_not_yet_labeled_is_not_overwritten(tiny_cfg, labeled_dir, tmp_path, capsys, monkeypatch):
    from factory.recipes.annotate import import_labels
    from factory.recipes.suggest import unlabeled_suggestions

    _no_cluster(monkeypatch)
    config = tmp_path / "factory.yaml"
    config.write_text(f"workdir: {tmp_path}\nannotate: {{num_images: 8}}\ndecoder: {{num_heads: 3}}\ntrain: {{val_images: 2}}\n")
    save_untrained_decoder(tiny_cfg)
    import_labels(tiny_cfg)  # the first round, 00000000.png .. 00000007.png
    chosen = {"images": [{"file": "00100003.png"}, {"file": "00100009.png"}, {"file": "00000002.png"}]}
    (tmp_path / "annotations" / "suggested.json").write_text(json.dumps(chosen))
    assert main(["annotate", "suggest", str(config), "--num-images", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/annotations/suggested.json: 2 image(s) the last `annotate suggest` chose are not in " \
           f"train.labeled yet (00100003.png, 00100009.png in {tmp_path}/annotations/images)" in err
    (tmp_path / "annotations" / "skip.txt").write_text("00100003.png\n00100009.png\n")
    assert unlabeled_suggestions(tiny_cfg) == []  # skipped counts as done


def test_the_last_round_is_read_from_a_labeled_set_on_s3(tiny_cfg, labeled_dir, s3_bucket):
    """`train.labeled` may be an s3:// URL (a cluster's labeled set): the suggested images found in it
    are labeled, as they are in a local one."""
    from factory import storage
    from factory.recipes.annotate import import_labels
    from factory.recipes.suggest import unlabeled_suggestions

    tiny_cfg.storage = storage.current()
    tiny_cfg.train.labeled = f"{s3_bucket}/labels/labeled.safetensors"
    import_labels(tiny_cfg)
    chosen = {"images": [{"file": "00000002.png"}, {"file": "00100009.png"}]}
    with open(os.path.join(tiny_cfg.annotate.dir, "suggested.json"), "w") as f:
        json.dump(chosen, f)
    assert unlabeled_suggestions(tiny_cfg) == ["00100009.png"]
