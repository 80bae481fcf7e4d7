"""The command line's own words: what `annotate export` says it did and what to run next, and a
reader of stdout that leaves early (`| head`) ending the command quietly."""

import subprocess
import sys

import numpy as np

from factory.backbones import load_backbone
from factory.cli import main
from factory.config import load_config


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
