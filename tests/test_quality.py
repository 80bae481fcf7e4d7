"""The label-quality benchmark's quick mode runs both paths end to end and its numbers are sane."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.slow
@pytest.mark.integration
def test_quick_quality_benchmark_beats_chance_on_both_paths(tmp_path, ray_cluster):
    import quality

    out = tmp_path / "quality.json"
    report = quality.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # what it printed is what it wrote
    chance = report["chance"]["miou"]
    assert 0 < chance < 0.2  # 8 classes, most of them small parts
    assert report["real_16"]["miou"] > chance
    assert report["shift"] == {"scale": 0.8, "roll": 1.8, "light": 1.6}
    for path in ("gan", "dm"):
        r = report["paths"][path]
        assert r["num_synthetic"] == 64  # drop_uncertain=0: every sample kept for the filtering run
        assert r["decoder"]["miou"] > chance, (path, r["decoder"])
        runs = r["downstream"]
        assert set(runs) == {"synthetic", "both", "synthetic_filtered_10"}
        assert runs["synthetic_filtered_10"]["train_images"] < runs["synthetic"]["train_images"]
        f = r["filter_check"]  # what the filter drops, scored against the annotator
        assert all(0 <= f[k] <= 1 for k in ("agreement_dropped", "agreement_kept", "agreement_worst"))
        assert f["agreement_worst"] <= min(f["agreement_dropped"], f["agreement_kept"])
        assert -1 <= f["spearman_uncertainty_agreement"] <= 1
        for name, run in runs.items():
            assert run["miou"] > chance, (path, name, run)
            assert run["shifted_miou"] > 0, (path, name, run)  # every arm is scored on the shifted world too
            assert len(run["iou"]) == len(report["classes"]) == len(run["shifted_iou"])
            # the one rule: the kept step is the best of its validation curve, never past the last step
            assert run["selected_step"] == max(run["val_curve"], key=lambda p: p[1])[0] <= report["segmenter_steps"]
    assert report["paths"]["dm"]["decoder_shifted"]["miou"] > 0


@pytest.mark.slow
@pytest.mark.integration
def test_active_annotation_benchmark_scores_each_round_downstream(tmp_path, ray_cluster):
    """`benchmarks/active.py --quick`: the first round, a random and a suggested second round, each
    decoder scored against the annotator and by the downstream segmenter its labels train."""
    import active

    report = active.run(**active.QUICK, workdir=str(tmp_path))
    assert report["settings"]["steps"] == 30 and report["settings"]["downstream"] == 32
    row = report["repeats"][0]
    for arm in ("first", "random", "active"):
        assert 0 < row[arm]["miou"] <= 1, (arm, row[arm])
        run = row[arm]["downstream"]
        assert run["train_images"] == 32, arm  # the same generated images, each decoder's labels
        assert 0 < run["miou"] <= 1 and 0 < run["shifted_miou"] <= 1, (arm, run)
        assert run["selected_step"] == max(run["val_curve"], key=lambda p: p[1])[0] <= 24
    assert len(row["active"]["seeds"]) == len(row["random"]["seeds"]) == 4
    assert report["mean_downstream_gain"] == pytest.approx(
        row["active"]["downstream"]["miou"] - row["random"]["downstream"]["miou"])


def test_kid_is_near_zero_between_draws_of_one_distribution_and_grows_with_a_shift():
    import numpy as np
    import quality

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = quality.kid(a, b)
    moved = quality.kid(a, b + 0.5)
    assert abs(same) < 0.05 < moved
    assert quality.kid(a, b + 1.0) > moved  # further apart, larger
    assert quality.kid(a, b) == same  # seeded subsets


def test_the_transformer_path_is_the_dm_path_on_an_sd3_folder(tmp_path, capsys):
    import quality

    from factory.config import SHIPPED_DIR

    args = quality.parse_args(["--paths", "dm,dm-sd3", "--sd3-weights", str(tmp_path / "sd3")])
    assert args.paths == ["dm", "dm-sd3"] and quality.is_dm("dm-sd3") and not quality.is_dm("gan")
    dm, sd3 = (quality.path_config(p, str(tmp_path), args) for p in args.paths)
    assert dm.backbone.weights == os.path.join(SHIPPED_DIR, "toy_diffusion")
    assert sd3.backbone.weights == str(tmp_path / "sd3")
    assert sd3.train.labeled.startswith(str(tmp_path / "dm-sd3"))  # its own runs, beside the DM path's
    # everything else is the DM path's: decoder, sampler, decoder training, samples
    assert dm.decoder == sd3.decoder and dm.backbone.diffusion == sd3.backbone.diffusion
    assert (dm.train.steps, dm.train.batch_images, dm.generate.num_samples) == (
        sd3.train.steps, sd3.train.batch_images, sd3.generate.num_samples)
    with pytest.raises(SystemExit):
        quality.parse_args(["--paths", "dm,sd3"])
    assert "unknown ['sd3']" in capsys.readouterr().err


def test_the_gan_path_takes_a_candidate_generator(tmp_path):
    import quality

    from factory.config import SHIPPED_DIR

    shipped = quality.path_config("gan", str(tmp_path), quality.parse_args([]))
    assert shipped.backbone.weights == os.path.join(SHIPPED_DIR, "toy_stylegan2.safetensors")
    candidate = tmp_path / "candidate.safetensors"
    cfg = quality.path_config("gan", str(tmp_path), quality.parse_args(["--gan-weights", str(candidate)]))
    assert cfg.backbone.weights == str(candidate)
    assert cfg.decoder == shipped.decoder and cfg.train == shipped.train  # everything else the demo's
    dm = quality.path_config("dm", str(tmp_path), quality.parse_args(["--gan-weights", str(candidate)]))
    assert dm.backbone.weights == os.path.join(SHIPPED_DIR, "toy_diffusion")


def test_levers_mode_refits_the_dm_decoder_once_per_setting(tmp_path, ray_cluster, monkeypatch):
    """`--levers`: the DM decoder at the demo's settings and with each lever, scored by inversion on
    real and shifted faces, without generating or training downstream models."""
    import quality

    monkeypatch.setattr(quality, "DM_LEVERS", {"image off": ["backbone.diffusion.image_features=false"]})
    report = quality.main(["--quick", "--levers", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "q.json")])
    assert report["levers"] and "paths" not in report and list(report["dm_levers"]) == ["demo settings", "image off"]
    chance = 1 / len(report["classes"])
    for row in report["dm_levers"].values():
        assert chance < row["miou"] < 1 and 0 < row["shifted_miou"] < 1 and len(row["iou"]) == len(report["classes"])
    assert report["dm_levers"]["image off"]["settings"] == ["backbone.diffusion.image_features=false"]


@pytest.mark.slow
def test_gan_levers_mode_scores_each_decoder_on_the_same_generated_images(tmp_path, monkeypatch):
    """`--gan-levers`: the interpreter at the demo's settings and with each lever, the perception
    decoder on the same features, the interpreter fitted on projected real faces; each labels the same
    generated images, scored against the annotator and downstream, beside the ceiling and 16 real."""
    import quality

    monkeypatch.setattr(quality, "GAN_LEVERS", {"more labels": ["annotate.num_images=20"],
                                                "every block": ["backbone.feature_resolutions=[]"]})
    report = quality.main(["--quick", "--gan-levers", "--num-synthetic", "32", "--eval-images", "8",
                           "--val-images", "4", "--segmenter-steps", "2", "--workdir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "q.json")])
    g = report["gan_levers"]
    decoders = ["demo settings (16 annotated generated images)", "more labels", "every block",
                "perception decoder (DatasetDM's) on the same features and labels",
                "interpreter fitted on the 16 real labeled faces projected into W+"]
    comparators = ["the same images labeled by the stand-in annotator (the ceiling)", "16 real labeled faces only"]
    assert "paths" not in report and list(g["rows"]) == decoders + comparators and g["num_synthetic"] == 32
    chance = 1 / len(report["classes"])
    for name in decoders:  # every decoder labels faces, not noise, even after 30 steps
        assert chance < g["rows"][name]["agreement"]["miou"] <= 1, name
    for row in g["rows"].values():
        assert abs(sum(row["label_shares"]) - 1) < 1e-6 and 0 <= row["downstream"]["miou"] <= 1
        assert row["downstream"]["train_images"] == (16 if row is g["rows"]["16 real labeled faces only"] else 32)
    # the decoders differ: the perception decoder's labels are not the interpreter's, nor are those of
    # the interpreter reading every block's maps (the demo reads the 16 and 32 px blocks')
    assert g["rows"][decoders[3]]["label_shares"] != g["rows"][decoders[0]]["label_shares"]
    assert g["rows"][decoders[2]]["label_shares"] != g["rows"][decoders[0]]["label_shares"]
    assert set(g["kid_generated"]) == {"real (validation faces)", "real, shifted world", "GAN generated images"}
    assert g["kid_images"] == 32  # --kid-images' quick default, from the same generated images


def test_autoencoder_ceiling_scores_real_faces_before_and_after_the_dm_backbones_autoencoder(tmp_path):
    """`--diagnose`'s images-ceiling row: the stand-in annotator on validation faces and on the same
    faces through the shipped toy pipeline's VAE; a blurring autoencoder loses parts, never gains them."""
    import numpy as np
    import protocol
    import quality

    from factory.backbones import load_backbone
    from factory.data import toyworld

    args = quality.parse_args(["--quick"])
    backbone = load_backbone(quality.path_config("dm", str(tmp_path), args).backbone)
    faces = toyworld.arrays(range(protocol.VAL_START, protocol.VAL_START + 24), 32)
    row, reconstructed = quality.autoencoder_ceiling(backbone, {"val": faces})
    assert reconstructed.shape == faces[0].shape and reconstructed.dtype == np.uint8
    assert not np.array_equal(reconstructed, faces[0])  # it went through the autoencoder
    assert 0.5 < row["annotator_miou_originals"] <= 1  # the annotator knows real toy faces
    assert 0 < row["annotator_miou_reconstructed"] < row["annotator_miou_originals"]
    assert 15 < row["psnr_db"] < 60 and len(row["iou_reconstructed"]) == len(toyworld.CLASSES)
    grey = np.full_like(faces[0], 128)
    rows = quality.backbone_kid({"held_out": faces, "val": faces, "shifted": faces},
                                {"reconstructed": reconstructed, "grey": grey})
    assert abs(rows["real (validation faces)"]) < 0.005  # the faces themselves: no distance
    assert rows["reconstructed"] < rows["grey"]  # near the faces (the shipped VAE is sharp), far from no faces


def test_autoencoders_mode_scores_each_named_pipeline_without_ray(tmp_path):
    import numpy as np
    import quality

    out = tmp_path / "ae.json"
    report = quality.main(["--quick", "--autoencoders", "pkg://toy_diffusion", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)])
    assert "paths" not in report and list(report["autoencoders"]["pipelines"]) == ["pkg://toy_diffusion"]
    row = report["autoencoders"]["pipelines"]["pkg://toy_diffusion"]
    assert row["annotator_miou_reconstructed"] < row["annotator_miou_originals"] and row["psnr_db"] > 15
    assert abs(report["autoencoders"]["floor_kid"]) < 0.01 and row["kid"] < 0.05  # a face-keeping autoencoder
    # and what each pipeline generates, sampled as the DM path's build samples (32 images in --quick)
    assert report["autoencoders"]["generated_images"] == 32 and np.isfinite(row["kid_generated"])
    assert row["kid_generated"] < 0.05  # face-like images (noise or grey images are far outside this)


def test_filter_check_scores_what_the_filter_drops_against_the_annotator():
    """`filter_check`: per-sample agreement of each label with the annotator's; a score that ranks
    the wrong labels first correlates negatively with agreement and drops them; one that does not,
    does not."""
    import numpy as np
    import quality

    from factory.data import toyworld
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR

    a = np.zeros((2, 4, 4), np.uint8)
    b = a.copy()
    a[0, :2], b[0, :1] = 1, 1  # class 1: IoU 1/2; background: 8/12 -> mean 7/12
    assert quality.per_sample_miou(a, b, 3) == pytest.approx([7 / 12, 1.0])

    images, _ = toyworld.arrays(range(5_000_000, 5_000_040), 32)
    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    annotated = segmenter.predict(annotator, images)
    masks = annotated.copy()
    masks[:10] = 0  # 10 labels wiped to background: the bad ones
    n = len(toyworld.CLASSES)
    knowing = quality.filter_check(masks, annotated, np.r_[np.ones(10), np.zeros(30)], n, fraction=0.25)
    assert knowing["agreement_dropped"] < 0.2 and knowing["agreement_kept"] > 0.9
    assert knowing["agreement_worst"] == pytest.approx(knowing["agreement_dropped"])
    assert knowing["spearman_uncertainty_agreement"] < -0.5 and knowing["face_share_dropped"] == 0
    blind = quality.filter_check(masks, annotated, np.r_[np.zeros(10), np.linspace(1, 2, 30)], n, fraction=0.25)
    assert blind["agreement_dropped"] > 0.9 and blind["spearman_uncertainty_agreement"] > 0.5
