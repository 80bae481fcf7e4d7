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
    for path in ("gan", "dm"):
        r = report["paths"][path]
        assert r["num_synthetic"] == 64  # drop_uncertain=0: every sample kept for the filtering run
        assert r["decoder"]["miou"] > chance, (path, r["decoder"])
        runs = r["downstream"]
        assert set(runs) == {"synthetic", "both", "synthetic_filtered_10"}
        assert runs["synthetic_filtered_10"]["train_images"] < runs["synthetic"]["train_images"]
        for name, run in runs.items():
            assert run["miou"] > chance, (path, name, run)
            assert len(run["iou"]) == len(report["classes"])
