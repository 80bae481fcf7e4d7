"""Training a backbone itself (`factory pretrain`): the Ray-free loop for both kinds and the SD3
family (it learns, it is deterministic, a resumed run equals an uninterrupted one), the image folder's
errors, and the CLI on a local Ray cluster publishing weights that `load_backbone` serves."""

import copy
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from factory.config import load_config
from factory.data.image_folder import ImageFolderError, load_image_folder
from factory.recipes import lr_decay
from factory.recipes.pretrain import build_recipe, fit, resolution_of

TINY = {
    "stylegan2": ["backbone.stylegan2.resolution=16", "backbone.stylegan2.channel_max=8",
                  "backbone.stylegan2.z_dim=16", "backbone.stylegan2.w_dim=16", "pretrain.steps=4",
                  "pretrain.r1_every=2"],  # R1 on steps 0 and 2
    "diffusion": ["backbone.kind=diffusion", "decoder.kind=perception", "backbone.diffusion.resolution=16",
                  "pretrain.vae_steps=2", "pretrain.steps=2"],
    # the SD3 family: a 2-block MM-DiT on the shipped toy SD pipeline's frozen VAE (8 px latents, 4x4 tokens)
    "sd3": ["backbone.kind=diffusion", "decoder.kind=perception", "backbone.diffusion.resolution=16",
            "pretrain.family=sd3", "pretrain.vae_from=pkg://toy_diffusion", "pretrain.vae_steps=0", "pretrain.steps=4",
            "pretrain.dit_layers=2", "pretrain.dit_heads=2", "pretrain.dit_head_dim=8"],
}


def write_images(folder, num=8, prompts=False):
    """`num` seeded 20x24 PNGs (a coloured box on a background); with `prompts`, under images/ with a
    prompts.jsonl beside it, as in the labeled-folder layout."""
    rng = np.random.default_rng(0)
    image_dir = folder / "images" if prompts else folder
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        pixels = np.full((20, 24, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        y, x = rng.integers(0, 12), rng.integers(0, 16)
        pixels[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(image_dir / f"{i:03d}.png")
        rows.append({"file": f"{i:03d}.png", "prompt": f"a photo of a {'red' if i % 2 else 'blue'} box"})
    if prompts:
        (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # one without
    return str(folder)


def tiny_cfg(tmp_path, kind, *overrides):
    return load_config(None, [f"workdir={tmp_path}", "pretrain.batch_size=4", *TINY[kind], *overrides])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-images")
    labeled = write_images(root / "labeled", prompts=True)
    return {"stylegan2": write_images(root / "plain"), "diffusion": labeled, "sd3": labeled}


def snapshot(recipe) -> dict:
    """A deep copy of a recipe's state, as a checkpoint would hold it."""
    buffer = io.BytesIO()
    torch.save(recipe.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def weights(recipe) -> dict[str, torch.Tensor]:
    state = recipe.state_dict()
    parts = ("generator", "discriminator", "ema") if "ema" in state else ("transformer",) if "transformer" in state else ("vae", "unet")
    return {f"{part}.{k}": v.detach().clone() for part in parts for k, v in state[part].items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# --- the loop, without Ray ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stylegan2", "diffusion", "sd3"])
def test_fit_learns_and_is_deterministic(kind, folders, tmp_path):
    cfg = tiny_cfg(tmp_path, kind)
    data = load_image_folder(folders[kind], resolution_of(cfg))
    assert data.images.shape == (8, 16, 16, 3) and data.images.dtype == np.uint8
    if kind != "stylegan2":
        assert data.prompts[0] == "a photo of a blue box" and data.prompts[-1] == ""
    initial = weights(build_recipe(cfg, data, torch.device("cpu")))
    reports = []
    recipe, metrics = fit(cfg, data, torch.device("cpu"), report=lambda m, *_: reports.append(m))
    assert [r["step"] for r in reports] == [recipe.total_steps]
    expected = {"stylegan2": {"loss_g", "loss_d", "r1"}, "diffusion": {"loss_vae", "kl", "loss_unet"},
                "sd3": {"loss_flow"}}[kind]
    assert expected <= metrics.keys() and all(math.isfinite(metrics[k]) for k in expected), metrics
    trained = weights(recipe)
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(trained) // 2, f"only {len(changed)} of {len(trained)} tensors changed"
    if kind == "diffusion":  # the VAE is frozen with its latents' scale before the UNet trains
        assert recipe.scaling_factor > 0 and recipe.pipe.vae.config.scaling_factor == recipe.scaling_factor
    if kind == "sd3":  # the reused VAE is the shipped one, untouched, with its scale
        from factory.recipes.pretrain_diffusion import frozen_vae

        shipped = frozen_vae(cfg.pretrain.vae_from)
        assert_same(shipped.state_dict(), recipe.pipe.vae.state_dict())
        assert recipe.pipe.vae.config.scaling_factor == shipped.config.scaling_factor
        assert type(recipe.pipe).__name__ == "StableDiffusion3Pipeline" and recipe.pipe.transformer.config.num_layers == 2
    again, metrics_again = fit(cfg, data, torch.device("cpu"))
    assert_same(trained, weights(again))
    assert metrics_again == metrics


@pytest.mark.parametrize("kind, stops", [("stylegan2", [2]), ("diffusion", [1, 3]), ("sd3", [2])])  # diffusion: in each phase
def test_resumed_fit_equals_uninterrupted(kind, stops, folders, tmp_path):
    cfg = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1")
    data = load_image_folder(folders[kind], resolution_of(cfg))
    saved = {}

    def keep(metrics, recipe, step):
        losses = {k: v for k, v in metrics.items() if k not in ("step", "start_step")}
        saved[step] = {"recipe": snapshot(recipe), "step": step, "losses": losses}

    straight, final = fit(cfg, data, torch.device("cpu"), report=keep)
    assert sorted(saved) == list(range(1, straight.total_steps + 1))
    for stop in stops:
        resumed, resumed_final = fit(cfg, data, torch.device("cpu"), restore=lambda: saved[stop])
        assert_same(weights(straight), weights(resumed))
        assert resumed_final == {**final, "start_step": stop}


def test_fewer_steps_than_taken_and_a_diverged_fit_are_refused(folders, tmp_path):
    """A run asked for fewer steps than it has taken would republish the longer run under the smaller
    count; a loss gone NaN would be checkpointed and published: both refused."""
    from factory.recipes.ray_train import TrainError

    cfg = tiny_cfg(tmp_path, "stylegan2")
    data = load_image_folder(folders["stylegan2"], resolution_of(cfg))
    saved = {}
    recipe, _ = fit(cfg, data, torch.device("cpu"), report=lambda m, r, step: saved.update(
        {step: {"recipe": snapshot(r), "step": step, "losses": {}}}))
    with pytest.raises(ValueError, match=rf"pretrain.steps=1 makes a run of 1 steps, fewer than the {recipe.total_steps} "
                                         "this run has already taken"):
        fit(tiny_cfg(tmp_path, "stylegan2", "pretrain.steps=1"), data, torch.device("cpu"),
            restore=lambda: saved[recipe.total_steps])
    with pytest.raises(TrainError, match=r"pretrain diverged at step \d+ \(\w+ (nan|inf|-inf)\b.*\): lower pretrain.lr"):
        fit(tiny_cfg(tmp_path, "stylegan2", "pretrain.lr=1e30"), data, torch.device("cpu"))


# --- the image folder ---------------------------------------------------------------------------


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(ImageFolderError, match=r"(?s)nope.*not a folder \(pretrain.images\)"):
        load_image_folder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError, match=r"(?s)empty.*no images"):
        load_image_folder(str(tmp_path / "empty"), 16)


def test_every_bad_file_and_prompt_row_is_named(tmp_path):
    folder = tmp_path / "labeled"
    write_images(folder, num=4, prompts=True)
    (folder / "images" / "002.png").write_bytes(b"not a png")
    good = (folder / "images" / "003.png").read_bytes()
    (folder / "images" / "003.png").write_bytes(good[: len(good) // 2])  # truncated
    with open(folder / "prompts.jsonl", "a") as f:
        f.write('{"file": "999.png", "prompt": "x"}\n')
        f.write("{oops\n")
        f.write('{"file": "001.png", "prompt": 7}\n')
    with pytest.raises(ImageFolderError) as info:
        load_image_folder(str(folder), 16)
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert problems[0].startswith(os.path.join("images", "002.png") + ": not a readable image")
    assert problems[1].startswith(os.path.join("images", "003.png") + ": not a readable image")
    assert problems[2].startswith('prompts.jsonl:4: "file" must name one of the images, got \'999.png\'')
    assert problems[3].startswith("prompts.jsonl:5: not JSON")
    assert problems[4].startswith('prompts.jsonl:6: needs a non-empty "prompt" or a "classes" list')
    assert str(folder) in str(info.value) and "5 problem(s)" in str(info.value)


# --- `factory pretrain` on a local Ray cluster --------------------------------------------------


def _config_file(work, kind, num_workers=1):
    config = work / f"pretrain_{kind}.yaml"
    lines = [f"workdir: {work}", "pretrain:", f"  num_workers: {num_workers}", "  cpus_per_worker: 0.5",
             "  checkpoint_every: 4", "  images: ${workdir}/images"]
    if kind == "stylegan2":
        lines.append("  output: ${workdir}/gan/generator.safetensors")
    else:
        lines.append("  output: ${workdir}/pipeline")
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.integration
def test_cli_names_a_bad_image_folder(tmp_path, ray_cluster, capsys):
    from factory.cli import main

    assert main(["pretrain", str(_config_file(tmp_path, "stylegan2")), f"pretrain.images={tmp_path}/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factory: error: ") and "nope: 1 problem(s)" in err and "not a folder" in err


@pytest.mark.slow  # 30-60 s each on 2 shared cores (Ray Train workers start)
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["stylegan2", "diffusion", "sd3"])
def test_cli_publishes_weights_load_backbone_serves(kind, tmp_path, ray_cluster, capsys):
    from factory.backbones import load_backbone
    from factory.cli import main

    write_images(tmp_path / "images", prompts=kind != "stylegan2")
    # two workers for the GAN, whose gradients are averaged by hand; one for diffusion (DDP), to save time
    num_workers = 2 if kind == "stylegan2" else 1
    config = _config_file(tmp_path, kind, num_workers)
    args = ["pretrain", str(config), *TINY[kind], "pretrain.batch_size=4"]
    assert main(args) == 0
    output = tmp_path / ("gan/generator.safetensors" if kind == "stylegan2" else "pipeline")
    assert f"written to {output}" in capsys.readouterr().out
    record_file = tmp_path / "gan" / "generator.json" if kind == "stylegan2" else output / "pretrain.json"
    record = json.loads(record_file.read_text())
    cfg = tiny_cfg(tmp_path, kind, f"backbone.weights={output}")
    data = load_image_folder(str(tmp_path / "images"), resolution_of(cfg))
    assert record["command"].startswith(f"factory pretrain {config} ")
    assert record["seed"] == 0 and record["kind"] == cfg.backbone.kind and record["num_workers"] == num_workers
    assert record["steps"] == 4 and record["resumed_from_step"] == 0
    assert record["images"] == {"folder": str(tmp_path / "images"), "num_images": 8, "content_hash": data.content_hash}
    assert all(math.isfinite(v) for v in record["final_losses"].values()) and record["final_losses"]
    backbone = load_backbone(cfg.backbone)
    assert record["weights_hash"] == backbone.weights_hash
    if kind == "stylegan2":
        assert backbone.resolution == 16
        out = backbone([0, 1])
        assert out.images.shape == (2, 16, 16, 3)
        # the same run_name resumes: two more steps, decaying the rate, continue from the published four
        assert main([*args, "pretrain.steps=6", "pretrain.lr_decay_steps=2"]) == 0
        record = json.loads(record_file.read_text())
        assert record["steps"] == 6 and record["resumed_from_step"] == 4
        capsys.readouterr()
        # its last checkpoint decayed: continuing it at a constant rate is refused, the published weights kept
        published = output.read_bytes()
        assert main([*args, "pretrain.steps=8"]) != 0
        assert "trained with a decay over steps 4-6" in capsys.readouterr().err
        assert output.read_bytes() == published
    else:
        assert (output / "model_index.json").is_file() and (output / "vae" / "config.json").is_file()
        assert json.loads((output / "vae" / "config.json").read_text())["scaling_factor"] != 0.18215
    if kind == "sd3":  # the family is what the folder says; the reused VAE is recorded by its hash
        from factory.recipes.pretrain import vae_hash

        index = json.loads((output / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
        assert record["family"] == "sd3" and record["vae_from"]["vae_hash"] == vae_hash(cfg.pretrain.vae_from)
        from safetensors.torch import load_file

        name = os.path.join("vae", "diffusion_pytorch_model.safetensors")
        assert_same(load_file(output / name), load_file(os.path.join(cfg.pretrain.vae_from, name)))  # published unchanged
        out = backbone([0, 1], ["a photo of a red box", "a photo of a blue box"])
        assert out.images.shape == (2, 16, 16, 3) and out.features[0].shape[-2:] == (4, 4)


def test_sd3_and_vae_reuse_settings_fail_early_naming_the_value(tmp_path):
    from factory.config import ConfigError

    with pytest.raises(ConfigError, match=r"pretrain.family must be 'sd' or 'sd3', got 'flux'"):
        tiny_cfg(tmp_path, "sd3", "pretrain.family=flux")
    with pytest.raises(ConfigError, match=r"pretrain.vae_steps=5 but pretrain.vae_from=.* set pretrain.vae_steps to 0"):
        tiny_cfg(tmp_path, "sd3", "pretrain.vae_steps=5")
    with pytest.raises(ConfigError, match=r"pretrain.family=sd3 .* set pretrain.vae_from"):
        tiny_cfg(tmp_path, "sd3", "pretrain.vae_from=null")
    with pytest.raises(ConfigError, match=r"pretrain.vae_from=pkg://nope: no such shipped weights"):
        tiny_cfg(tmp_path, "sd3", "pretrain.vae_from=pkg://nope")
    with pytest.raises(ConfigError, match=r"pretrain.dit_patch must be >= 1, got 0"):
        tiny_cfg(tmp_path, "sd3", "pretrain.dit_patch=0")


def test_sd_family_with_a_reused_vae_trains_the_unet_only(folders, tmp_path):
    from factory.recipes.pretrain_diffusion import frozen_vae

    cfg = tiny_cfg(tmp_path, "diffusion", "pretrain.vae_from=pkg://toy_diffusion", "pretrain.vae_steps=0")
    data = load_image_folder(folders["diffusion"], resolution_of(cfg))
    recipe, metrics = fit(cfg, data, torch.device("cpu"))
    assert recipe.total_steps == 2 and set(metrics) >= {"loss_unet"} and "loss_vae" not in metrics
    shipped = frozen_vae(cfg.pretrain.vae_from)
    assert_same(shipped.state_dict(), recipe.pipe.vae.state_dict())
    assert recipe.scaling_factor == shipped.config.scaling_factor == recipe.pipe.vae.config.scaling_factor


@pytest.mark.parametrize("kind, stops", [("diffusion", [1, 3]), ("sd3", [2])])
def test_denoiser_ema_is_what_is_published_and_resumes_exactly(kind, stops, folders, tmp_path):
    """`pretrain.denoiser_ema`: the published UNet / transformer is the moving average, not the last
    weights; a resumed run (diffusion: in the VAE's phase and in the UNet's) ends with the same
    average; and the setting is part of what a checkpoint may resume from."""
    from safetensors.torch import load_file

    from factory.recipes.pretrain import inputs_hash

    cfg = tiny_cfg(tmp_path, kind, "pretrain.denoiser_ema=true", "pretrain.checkpoint_every=1",
                   "pretrain.steps=4", "pretrain.ema_half_life=4")
    data = load_image_folder(folders[kind], resolution_of(cfg))
    saved = {}

    def keep(metrics, recipe, step):
        saved[step] = {"recipe": snapshot(recipe), "step": step,
                       "losses": {k: v for k, v in metrics.items() if k not in ("step", "start_step")}}

    straight, _ = fit(cfg, data, torch.device("cpu"), report=keep)
    denoiser = "unet" if kind == "diffusion" else "transformer"
    average, last = straight.state_dict()[f"ema_{denoiser}"], straight.state_dict()[denoiser]
    assert average.keys() == last.keys()
    assert any(not torch.equal(average[k], last[k]) for k in average)  # an average, not the last step
    straight.export(str(tmp_path / "out"))
    published = load_file(str(tmp_path / "out" / "pipeline" / denoiser / "diffusion_pytorch_model.safetensors"))
    assert_same(published, average)
    assert getattr(straight.pipe, denoiser) is not straight.ema  # the trained weights train on after an export
    for stop in stops:
        resumed, _ = fit(cfg, data, torch.device("cpu"), restore=lambda stop=stop: saved[stop])
        assert_same(average, resumed.state_dict()[f"ema_{denoiser}"])
    without = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1", "pretrain.steps=4", "pretrain.ema_half_life=4")
    assert inputs_hash(cfg, data) != inputs_hash(without, data)
    plain, _ = fit(without, data, torch.device("cpu"))
    assert plain.state_dict()[f"ema_{denoiser}"] is None and plain.ema is None
    assert_same(last, plain.state_dict()[denoiser])  # the average never feeds back into training


@pytest.mark.parametrize("kind", ["stylegan2", "diffusion", "sd3"])
def test_lr_decay_extends_a_finished_run_and_refuses_a_different_schedule(kind, folders, tmp_path):
    """`pretrain.lr_decay_steps`: the last steps decay the rate linearly to zero (diffusion: the
    denoiser's); a finished constant-rate run, given more steps with a decay over them, resumes and
    ends exactly where a decaying run from scratch ends; a checkpoint whose steps had other rates is
    refused, naming both schedules."""
    from factory.config import ConfigError
    from factory.recipes.ray_train import TrainError

    steps = int(tiny_cfg(tmp_path, kind).pretrain.steps)
    constant = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1")
    decaying = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1", f"pretrain.steps={steps + 2}",
                        "pretrain.lr_decay_steps=2")
    data = load_image_folder(folders[kind], resolution_of(constant))
    saved = {}

    def keep(into):
        def report(metrics, recipe, step):
            into[step] = {"recipe": snapshot(recipe), "step": step, "inputs_hash": "",
                          "lr_decay": recipe.lr_decay,
                          "losses": {k: v for k, v in metrics.items() if k not in ("step", "start_step")}}
        return report

    first, _ = fit(constant, data, torch.device("cpu"), report=keep(saved))
    end = first.total_steps
    assert first.lr_decay is None
    straight_saved = {}
    straight, _ = fit(decaying, data, torch.device("cpu"), report=keep(straight_saved))
    assert straight.lr_decay == ((end, end + 2),)
    extended, metrics = fit(decaying, data, torch.device("cpu"), restore=lambda: saved[end])
    assert metrics["start_step"] == end and metrics["step"] == end + 2
    assert_same(weights(straight), weights(extended))
    # the last step trained at half the rate (2 decay steps: 1, then 1/2), every optimizer of the run
    base = decaying.pretrain.lr
    optimizers = {"stylegan2": lambda r: [(r.opt_g, base), (r.opt_d, base * 2 / 3)],  # r1_every=2: D's lr x 2/3
                  "diffusion": lambda r: [(r.opt_unet, base)], "sd3": lambda r: [(r.opt, base)]}[kind](straight)
    for optimizer, lr in optimizers:
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr / 2] * len(optimizer.param_groups))
    if kind == "diffusion":  # the VAE's steps keep the full rate
        assert [g["lr"] for g in straight.opt_vae.param_groups] == [base] * len(straight.opt_vae.param_groups)
    longer, _ = fit(tiny_cfg(tmp_path, kind, f"pretrain.steps={steps + 2}"), data, torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(weights(longer).values(), weights(straight).values()))

    # a checkpoint inside the decay, continued at a constant rate or another decay: refused
    with pytest.raises(TrainError, match=rf"step {end + 1} was trained with a decay over steps {end}-{end + 2}.*"
                                         r"asks for a constant rate.*pretrain.lr_decay_steps"):
        fit(tiny_cfg(tmp_path, kind, f"pretrain.steps={steps + 2}"), data, torch.device("cpu"),
            restore=lambda: straight_saved[end + 1])
    with pytest.raises(TrainError, match=rf"asks for a decay over steps {end - 1}-{end + 2}"):
        fit(tiny_cfg(tmp_path, kind, f"pretrain.steps={steps + 2}", "pretrain.lr_decay_steps=3"), data,
            torch.device("cpu"), restore=lambda: straight_saved[end + 1])
    with pytest.raises(ConfigError, match=rf"pretrain.lr_decay_steps={steps + 1} is more than pretrain.steps={steps}"):
        tiny_cfg(tmp_path, kind, f"pretrain.lr_decay_steps={steps + 1}")
    with pytest.raises(ConfigError, match=r"pretrain.lr_decay_steps must be >= 0, got -1"):
        tiny_cfg(tmp_path, kind, "pretrain.lr_decay_steps=-1")


@pytest.mark.parametrize("kind", ["stylegan2", "sd3"])
def test_lr_restarts_extend_a_finished_decay_with_a_new_cycle(kind, folders, tmp_path):
    """`pretrain.lr_restarts`: a run that finished its decay, given more steps and a restart at the
    step it finished, resumes at the base rate and decays again over the new cycle's last steps,
    ending exactly where the same schedule from scratch ends; without the restart the finished run is
    refused with a message that names the setting; bad restarts fail in the config, naming them."""
    from factory.config import ConfigError
    from factory.recipes.ray_train import TrainError

    steps = int(tiny_cfg(tmp_path, kind).pretrain.steps)
    one = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1", "pretrain.lr_decay_steps=2")
    two = tiny_cfg(tmp_path, kind, "pretrain.checkpoint_every=1", f"pretrain.steps={steps + 3}",
                   "pretrain.lr_decay_steps=2", f"pretrain.lr_restarts=[{steps}]")
    data = load_image_folder(folders[kind], resolution_of(one))
    saved, rates = {}, {}

    def keep(metrics, recipe, step):
        saved[step] = {"recipe": snapshot(recipe), "step": step, "inputs_hash": "", "lr_decay": recipe.lr_decay,
                       "losses": {k: v for k, v in metrics.items() if k not in ("step", "start_step")}}

    first, _ = fit(one, data, torch.device("cpu"), report=keep)
    end = first.total_steps
    straight, _ = fit(two, data, torch.device("cpu"))
    assert straight.lr_decay == ((end - 2, end), (end + 1, end + 3))
    extended, metrics = fit(two, data, torch.device("cpu"), restore=lambda: copy.deepcopy(saved[end]))  # training moves the tensors it loads
    assert metrics["start_step"] == end and metrics["step"] == end + 3
    assert_same(weights(straight), weights(extended))
    base = two.pretrain.lr
    opt = straight.opt_g if kind == "stylegan2" else straight.opt
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([base / 2] * len(opt.param_groups))  # the cycle's last step
    for step, expected in [(end - 2, 1.0), (end - 1, 0.5), (end, 1.0), (end + 1, 1.0), (end + 2, 0.5)]:
        rates[step] = lr_decay.factor(step, straight.lr_decay)
        assert rates[step] == expected, (step, rates)
    # the three-step run from scratch differs from the one that decayed first
    plain, _ = fit(tiny_cfg(tmp_path, kind, f"pretrain.steps={steps + 3}", "pretrain.lr_decay_steps=2"), data,
                   torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(straight).values()))

    # the finished run continued without the restart: refused, the message says how to continue it
    with pytest.raises(TrainError, match=rf"step {end} was trained with a decay over steps {end - 2}-{end}.*"
                                         rf"pretrain.lr_restarts=\[{end}\]"):
        fit(tiny_cfg(tmp_path, kind, f"pretrain.steps={steps + 3}", "pretrain.lr_decay_steps=3"), data,
            torch.device("cpu"), restore=lambda: saved[end])
    # a checkpoint saved before restarts existed (one window, not a tuple of them) resumes the same
    legacy = dict(copy.deepcopy(saved[end]), lr_decay=(end - 2, end))
    again, _ = fit(two, data, torch.device("cpu"), restore=lambda: legacy)
    assert_same(weights(straight), weights(again))
    for bad, says in [([f"pretrain.lr_restarts=[{steps}]", f"pretrain.steps={steps + 3}"], "needs pretrain.lr_decay_steps > 0"),
                      (["pretrain.lr_restarts=[2, 1]", "pretrain.lr_decay_steps=1"], "got 1 after 2"),
                      (["pretrain.lr_restarts=[0]", "pretrain.lr_decay_steps=1"], "got 0 after 0")]:
        with pytest.raises(ConfigError, match=rf"pretrain.lr_restarts=\[.*{says}"):
            tiny_cfg(tmp_path, kind, *bad)
    from factory.recipes.pretrain import check_restarts, run_steps

    end = run_steps(one)
    with pytest.raises(ConfigError, match=rf"pretrain.lr_restarts=\[{end}\]: the last restart must come before the "
                                          r"run's last step"):  # by the config, or by the recipe, which knows the kind
        check_restarts(tiny_cfg(tmp_path, kind, f"pretrain.lr_restarts=[{end}]", "pretrain.lr_decay_steps=1"))

def test_lr_decay_windows_and_factors():
    """The schedule's arithmetic: one window per cycle, a short cycle decays over all of it, a
    legacy single-window record is read as one window."""
    assert lr_decay.window(100, 0) is None and lr_decay.factor(5, None) == 1.0
    assert lr_decay.window(100, 10) == ((90, 100),)
    assert lr_decay.window(100, 30, [20, 60]) == ((0, 20), (30, 60), (70, 100))
    w = lr_decay.window(100, 30, [20, 60])
    assert [lr_decay.factor(s, w) for s in (0, 19, 20, 29, 30, 59, 60, 70, 99)] == \
        [1.0, 1 / 20, 1.0, 1.0, 1.0, 1 / 30, 1.0, 1.0, 1 / 30]
    lr_decay.check_resume((90, 100), ((90, 100), (110, 120)), 100)  # the legacy record, then a restart
    lr_decay.check_resume(None, ((90, 100),), 90)  # a constant run continued into its decay


def test_lr_restarts_count_the_run_s_steps_the_sd_family_s_vae_steps_first(tmp_path):
    """The loop, its checkpoints and the decay windows count the SD family's VAE steps first; a restart
    at the step a finished SD run ended (what the resume refusal advises) is accepted, one past the
    run's end is refused naming how the steps are counted."""
    from factory.config import ConfigError
    from factory.recipes.pretrain import check_restarts, run_steps

    sd = tiny_cfg(tmp_path, "diffusion", "pretrain.lr_decay_steps=1", "pretrain.lr_restarts=[3]", "pretrain.steps=3")
    assert run_steps(sd) == 5
    check_restarts(sd)  # refused before: 3 is not before pretrain.steps=3
    sd.pretrain.lr_restarts = [5]
    with pytest.raises(ConfigError, match=r"must come before the run's last step, 5 \(pretrain.vae_steps=2 \+ "
                                          r"pretrain.steps=3: the VAE's steps count first\)"):
        check_restarts(sd)
    gan = tiny_cfg(tmp_path, "stylegan2", "pretrain.lr_decay_steps=1", "pretrain.lr_restarts=[4]")
    with pytest.raises(ConfigError, match=r"the run's last step, 4 \(pretrain.steps=4\)"):
        check_restarts(gan)
