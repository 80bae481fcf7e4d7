"""The command line's own words: what `annotate export` says it did and what to run next, and a
reader of stdout that leaves early (`| head`) ending the command quietly."""

import os
import subprocess
import sys

import numpy as np
import pytest

from factory.backbones import load_backbone
from factory.cli import main
from factory.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_counts_the_images_it_wrote_and_names_the_next_command_in_full(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text(f"workdir: {tmp_path}\n")
    z_dim = load_backbone(load_config(str(config)).backbone).generator.cfg.z_dim
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((2, z_dim)).astype(np.float32))
    assert main(["annotate", "export", str(config), "annotate.num_images=5", f"annotate.latents={tmp_path}/z.npy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported 2 images")  # the latents' rows, not annotate.num_images
    assert f"factory annotate import {config} annotate.num_images=5 annotate.latents={tmp_path}/z.npy" in out


def test_a_reader_that_leaves_early_ends_the_command_without_a_traceback():
    weights = "factory/weights/toy_stylegan2.safetensors"
    p = subprocess.Popen([sys.executable, "-m", "factory.cli", "weights", "inspect", weights, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the command prints (it imports torch first)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err, err


def _no_cluster(monkeypatch):
    """Bad input must fail before a local Ray cluster starts (10-40 s): starting one fails the test."""
    import factory.runtime
    import factory.toy.demo

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray cluster was started before the input was checked")

    monkeypatch.setattr(factory.runtime, "init_ray", refuse)
    monkeypatch.setattr(factory.toy.demo, "init_ray", refuse)


@pytest.mark.parametrize("argv, says", [
    (["toyworld", "out", "--size", "0"], "argument --size: must be 8 to 1024 pixels, got 0"),
    (["toyworld", "out", "--size", "100000"], "argument --size: must be 8 to 1024 pixels, got 100000"),
    (["toyworld", "out", "--start-seed", "-1"], "argument --start-seed: must be >= 0, got -1"),
    (["--log-level", "bogus", "inspect", "x"], "argument --log-level: invalid choice: 'BOGUS'"),
    (["train"], "the following arguments are required: config\n"),
])
def test_bad_options_are_usage_errors_naming_the_option(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_smallest_and_largest_toy_sizes_draw():
    from factory.cli import TOY_SIZES
    from factory.data.toyworld import render

    assert render(0, size=TOY_SIZES[0]).image.shape == (8, 8, 3)
    assert render(0, size=TOY_SIZES[1]).image.shape == (1024, 1024, 3)


def test_a_file_in_the_way_of_a_folder_is_one_line(tmp_path, monkeypatch, capsys):
    _no_cluster(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    config = os.path.join(ROOT, "configs", "demo.yaml")
    assert main(["toyworld", "afile/sub", "--num-images", "1"]) == 2
    assert capsys.readouterr().err == "factory: error: afile: a file is in the way; a folder is needed there (for afile/sub)\n"
    assert main(["demo", "--workdir", "afile"]) == 2
    assert "--workdir afile: a file is in the way" in capsys.readouterr().err
    assert main(["annotate", "export", config, "workdir=afile"]) == 2
    assert f"annotate.dir={tmp_path}/afile/annotations: {tmp_path}/afile is a file" in capsys.readouterr().err
    assert main(["annotate", "import", config, f"workdir={tmp_path}", "train.labeled=afile/l.safetensors"]) == 2
    assert f"train.labeled={tmp_path}/afile/l.safetensors: {tmp_path}/afile is a file" in capsys.readouterr().err


def test_verbs_refuse_what_they_cannot_do_by_name(tmp_path, monkeypatch, capsys):
    _no_cluster(monkeypatch)
    config = os.path.join(ROOT, "configs", "demo.yaml")
    assert main(["prompts", "expand", config, f"workdir={tmp_path}"]) == 2
    assert "prompts expand is for the diffusion path" in capsys.readouterr().err
    assert main(["inspect", "@latest"]) == 2
    assert "'@latest' names no root: give ROOT@latest" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(tmp_path / "d"), "backbone.weights=nope.safetensors"]) == 2
    assert "error: backbone.weights: nope.safetensors does not exist" in capsys.readouterr().err
    # a generator without the demo's 32 px block: refused before Ray starts
    assert main(["demo", "--workdir", str(tmp_path / "d"), "backbone.weights=null", "backbone.stylegan2.resolution=16"]) == 2
    assert "backbone.feature_resolutions has 32, not a block" in capsys.readouterr().err


def test_pretrain_names_bad_images_before_a_cluster_starts(tmp_path, monkeypatch, capsys):
    _no_cluster(monkeypatch)
    config = os.path.join(ROOT, "configs", "toy_gan.yaml")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_text("not an image")
    assert main(["pretrain", config, f"workdir={tmp_path}", f"pretrain.images={tmp_path}/imgs"]) == 2
    assert "a.png: not a readable image" in capsys.readouterr().err


@pytest.mark.parametrize("job", ["generate", "train_decoder", "pretrain"])
def test_ray_jobs_take_the_cli_arguments_and_fail_in_one_line(job, tmp_path, monkeypatch, capsys):
    import runpy

    script, config = os.path.join(ROOT, "jobs", f"{job}.py"), os.path.join(ROOT, "configs", "demo.yaml")

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
        return e.value.code, capsys.readouterr().err

    code, err = run()
    assert code == 2 and err.startswith(f"usage: {job} [-h] config [overrides ...]\n")
    assert run(config, "bogus=1") == (2, f"{job}: error: override: Key 'bogus' not in 'FactoryConfig'\n")
    assert run(str(tmp_path / "nope.yaml")) == (2, f"{job}: error: config file not found: {tmp_path}/nope.yaml\n")
    if job == "generate":
        code, err = run(config, f"workdir={tmp_path}")
        assert code == 2 and err.startswith("generate: error: fitted decoder") and "run `factory train` first" in err


def test_prompts_expand_names_a_long_prompt_by_its_line(tmp_path, capsys):
    source = tmp_path / "p.txt"
    source.write_text("a cat\n# a comment\n" + "a very long prompt " + "word " * 100 + "\n")
    config = os.path.join(ROOT, "configs", "demo_dm.yaml")
    assert main(["prompts", "expand", config, f"workdir={tmp_path}", f"prompts.source={source}"]) == 2
    assert f"{source}:3 (" in capsys.readouterr().err
