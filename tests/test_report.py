"""`factory inspect --html`: one self-contained page (no external resource), opened in headless
Chromium where it is installed: the DOM has every section and the screenshot is not blank."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_card import build

from factory.cli import main
from factory.recipes.report import SECTIONS

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A two-shard dataset with a decoder metrics.json: its report, then the report after one shard's
    tar was deleted."""
    work = tmp_path_factory.mktemp("report")
    cfg, out = build(work, "parquet,webdataset", metrics={
        "metrics": {"val_miou": 0.4321, "step": 20}, "val_images": 2,
        "labeled_set": {"path": "labeled.safetensors", "fingerprint": "f" * 64, "images": 8}})
    with open(os.path.join(cfg.generate.decoder, "metrics.json"), "w") as f:  # re-trained after the build
        json.dump({"metrics": {"val_miou": 0.9876, "step": 40}, "val_images": 2}, f)
    page, damaged, broken = (str(work / f"{name}.html") for name in ("report", "damaged", "broken"))
    assert main(["inspect", out, "--html", page]) == 0
    os.remove(os.path.join(out, "webdataset", "shard-00001.tar"))
    assert main(["inspect", out, "--html", damaged]) == 1  # incomplete: a file is missing
    with open(os.path.join(out, "parquet", "shard-00000.parquet"), "r+b") as f:
        f.truncate(1000)
    assert main(["inspect", out, "--html", broken]) == 1
    return page, damaged, broken


@pytest.fixture(scope="module")
def report(pages):
    return pages[0]


def test_the_page_is_self_contained_with_every_section(report):
    text = open(report).read()
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched: every image a data URI
    assert "http://" not in text and "https://" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 4  # preview, class bars, uncertainty histogram, shard timings
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.width > 100 and im.height > 100
    assert "0.4321" in text and "val_miou" in text and "0.9876" not in text  # the metrics the build recorded
    assert "As recorded when this dataset was built" in text
    assert "Samples scoring above 0.25000 were dropped" in text  # the filter beside its histogram
    assert "No failed shards, no missing or damaged files." in text
    assert "0: background" in text and "1: blue" in text  # the legend


def test_a_damaged_dataset_gets_a_report_naming_the_damage_without_reading_samples(pages):
    text = open(pages[1]).read()
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert "webdataset/shard-00001.tar" in text and "INCOMPLETE" in text  # the missing file is shown
    assert "no samples were read" in text and 'alt="preview"' not in text
    assert "0.4321" in text  # the decoder's metrics still


def test_a_truncated_shard_is_named_in_the_failures_section(pages):
    with open(pages[2]) as f:
        text = f.read()
    failures = text.split('<section id="failures">')[1].split("</section>")[0]
    assert "parquet/shard-00000.parquet" in failures and "broken" in failures and "has 1000 bytes" in failures
    assert "No failed shards" not in text


def chromium(*args: str, cwd: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={cwd}/profile"]
    return subprocess.run([CHROMIUM, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does "
                                             "where it can)")
def test_headless_chromium_renders_every_section(report, tmp_path):
    url = f"file://{report}"
    dom = chromium("--dump-dom", url, cwd=str(tmp_path))
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout
    shot = tmp_path / "shot.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars", url, cwd=str(tmp_path))
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (1800, 1200)
    non_white = (pixels < 245).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.05 and colours > 100, (non_white, colours)  # text, tables and images, not a blank page


@pytest.mark.parametrize("scores", [[0.0], [0.25, 0.25, 0.25], [0.0, 0.1, 0.4]], ids=["one", "equal", "spread"])
def test_the_uncertainty_histogram_spans_the_scores_and_never_goes_below_zero(scores):
    from factory.dataset.stats import score_histogram

    counts, edges = score_histogram(np.array(scores), bins=10)
    assert counts.sum() == len(scores) and len(edges) == 11
    assert edges[0] == min(scores) and edges[-1] >= max(scores) and (np.diff(edges) > 0).all()
    assert counts[0] == sum(s == min(scores) for s in scores)


def test_a_build_that_recorded_no_decoder_metrics_shows_the_decoder_folder_s_marked_as_read_now(tmp_path):
    from factory.recipes.report import decoder_metrics

    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {"val_miou": 0.5}, "val_images": 1}))
    got = decoder_metrics({"config": {"generate": {"decoder": str(tmp_path)}}})
    assert got["metrics"] == {"val_miou": 0.5} and got["read_now"] == str(tmp_path)


def test_a_dataset_whose_every_sample_was_dropped_is_inspected_and_reported(tmp_path, capsys):
    """A filter that kept nothing leaves a complete dataset of 0 samples: inspect says so (it crashed
    formatting a mean of no scores) and the report is written."""
    from conftest import save_untrained_decoder

    from factory.config import load_config
    from factory.dataset import layout
    from factory.decoders.files import load_decoder
    from factory.recipes.labeling import build_shard

    cfg = load_config(None, [f"workdir={tmp_path}", "decoder.num_heads=2", "generate.batch_size=5"])
    backbone, decoder, out = save_untrained_decoder(cfg), load_decoder(cfg.generate.decoder), cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    plan = layout.plan_shards(0, 5, 5)
    records = {s.name: build_shard(backbone, decoder, cfg, s, "cfg", threshold=-1.0) for s in plan}
    manifest = layout.build_manifest(
        plan, records, {}, name="empty", package_version="0.1.0", build_hash="b" * 64, config_hash="c" * 64,
        task="segmentation", tasks=["segmentation"], labels=cfg.labels.classes, formats=["parquet"],
        image_format="png", calibration={"drop_fraction": 0.1, "threshold": -1.0, "num_scored": 5,
                                         "score_quantiles": {"p50": 0.2, "p90": 0.25}}, config={})
    layout.write_manifest(out, manifest)
    assert main(["inspect", out, "--html", str(tmp_path / "r.html")]) == 0
    text = capsys.readouterr().out
    assert "0 kept of 5 generated" in text and "no samples: no label statistics" in text
    assert "were dropped: 5 of 5 (100%" in (tmp_path / "r.html").read_text()
