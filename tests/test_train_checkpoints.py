"""A training checkpoint is whole or refused: rank 0 writes each file's size and sha256 into it last,
and resuming or publishing verifies it, naming the file that is missing, cut short or changed."""

import json
import os

import pytest
import torch

from factory.recipes.ray_train import (
    CHECKPOINT_RECORD,
    STATE_FILE,
    TrainError,
    record_checkpoint,
    verify_checkpoint,
)


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "checkpoint_000003"
    (d / "decoder").mkdir(parents=True)
    torch.save({"step": 30, "weights": torch.arange(1000.0)}, d / STATE_FILE)
    (d / "decoder" / "model.safetensors").write_bytes(os.urandom(4096))
    record_checkpoint(str(d))
    return d


def test_a_whole_checkpoint_verifies_and_lists_every_file(checkpoint):
    verify_checkpoint(str(checkpoint), "run")
    files = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())["files"]
    assert sorted(files) == ["decoder/model.safetensors", STATE_FILE]


def test_a_truncated_state_file_is_refused_naming_it(checkpoint):
    data = (checkpoint / STATE_FILE).read_bytes()
    (checkpoint / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError, match=rf"checkpoint_000003 in run: {STATE_FILE} is {len(data) // 2} bytes, "
                                         rf"its record says {len(data)} bytes"):
        verify_checkpoint(str(checkpoint), "run")


def test_a_changed_byte_a_missing_file_and_no_record_are_refused(checkpoint):
    path = checkpoint / "decoder" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainError, match="decoder/model.safetensors is 4096 bytes with another sha256"):
        verify_checkpoint(str(checkpoint), "run")
    path.unlink()
    with pytest.raises(TrainError, match="decoder/model.safetensors is missing"):
        verify_checkpoint(str(checkpoint), "run")
    (checkpoint / CHECKPOINT_RECORD).unlink()  # a copy cut short before its record: never loaded
    with pytest.raises(TrainError, match=f"incomplete: no readable {CHECKPOINT_RECORD}"):
        verify_checkpoint(str(checkpoint), "run")


def test_a_run_history_cut_short_is_refused_naming_it(tmp_path):
    """Ray Train writes its run history in place; cut short by a full disk, Ray Train could not start
    the run at all (a JSONDecodeError traceback): refused with one line naming the file instead."""
    from types import SimpleNamespace

    from factory.recipes.ray_train import RUN_HISTORY, check_run_history

    run = SimpleNamespace(storage_path=str(tmp_path), run_name="interpreter")
    check_run_history(run, "train")  # no history yet: a fresh run
    (tmp_path / "interpreter").mkdir()
    (tmp_path / "interpreter" / RUN_HISTORY).write_text('{"checkpoint_results": []}')
    check_run_history(run, "train")
    (tmp_path / "interpreter" / RUN_HISTORY).write_text('{"checkpoint_res')
    with pytest.raises(TrainError, match=rf"interpreter/{RUN_HISTORY} is cut short .* or choose a new train.run_name"):
        check_run_history(run, "train")


def test_a_run_fitted_on_other_inputs_is_refused_by_the_driver_from_its_record(tmp_path):
    """The driver refuses other inputs before Ray Train starts its workers, naming what changed, from
    the record a finished fit left; where there is no record (or no checkpoint history), the workers'
    check decides."""
    from types import SimpleNamespace

    from factory.config import ConfigError
    from factory.recipes.ray_train import RUN_HISTORY, RUN_INPUTS, check_run_inputs

    run = SimpleNamespace(storage_path=str(tmp_path), run_name="interpreter")
    folder = tmp_path / "interpreter"
    parts = {"the labeled set": "s1", "train.lr": "l1", "train.seed": "e1"}
    check_run_inputs("a", parts, run, "train", "labeled set")  # a fresh run
    folder.mkdir()
    (folder / RUN_INPUTS).write_text(json.dumps({"inputs_hash": "a", "inputs": parts}))
    check_run_inputs("b", parts, run, "train", "labeled set")  # no checkpoint history: nothing to resume
    (folder / RUN_HISTORY).write_text('{"checkpoint_results": []}')
    check_run_inputs("a", parts, run, "train", "labeled set")
    with pytest.raises(ConfigError, match=r"^run 'interpreter' in .* was fitted on other inputs: the labeled set, "
                                          r"train.lr changed since; set them back to resume it, or choose a new "
                                          r"train.run_name$"):
        check_run_inputs("b", {**parts, "train.lr": "l2", "the labeled set": "s2"}, run, "train", "labeled set")
    (folder / RUN_INPUTS).write_text('{"inputs_hash": "a"}')  # a record without parts: the general wording
    with pytest.raises(ConfigError, match=r"was fitted on different inputs \(labeled set\); choose a new train.run_name"):
        check_run_inputs("b", parts, run, "train", "labeled set")
    (folder / RUN_INPUTS).write_text('{"inputs_ha')
    check_run_inputs("b", parts, run, "train", "labeled set")  # unreadable: the workers check the checkpoint


def test_input_parts_name_each_setting_and_leave_the_hash_as_it_was(tmp_path):
    """The named parts are for messages only: `inputs_hash` is what checkpoints carry, so older
    checkpoints must keep theirs."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from factory import config as config_lib
    from factory import tensorfile
    from factory.config import load_config
    from factory.fingerprint import safetensors_fingerprint
    from factory.recipes import pretrain, train

    cfg = load_config(None, [f"workdir={tmp_path}", "train.flip=true"])
    labeled = str(tmp_path / "labeled.safetensors")
    tensorfile.write(labeled, {"x": torch.zeros(1)}, "factory.labeled_set", {})
    t = cfg.train
    legacy = {"labeled": safetensors_fingerprint(labeled), "backbone": asdict(cfg.backbone),
              "decoder": asdict(cfg.decoder), "train": [t.batch_pixels, t.batch_images, t.lr, t.lr_schedule,
                                                        t.class_balanced, t.val_images, t.seed, {"flip": True}]}
    assert train.inputs_hash(cfg, labeled) == config_lib.stable_hash(legacy)
    before = train.input_parts(cfg, labeled)
    cfg.train.lr *= 2
    after = train.input_parts(cfg, labeled)
    assert [k for k in before if before[k] != after[k]] == ["train.lr"]
    assert {"the labeled set", "backbone.weights", "decoder.num_heads", "train.seed", "train.flip"} <= before.keys()
    images = SimpleNamespace(content_hash="h")
    p = cfg.pretrain
    assert pretrain.inputs_hash(cfg, images) == config_lib.stable_hash({
        "images": "h", "kind": "stylegan2", "init_seed": cfg.backbone.init_seed, "arch": asdict(cfg.backbone.stylegan2),
        "pretrain": [p.batch_size, p.lr, p.seed, p.num_workers, p.flip, p.r1_gamma, p.r1_every, p.ema_half_life,
                     p.vae_steps, p.kl_weight, p.prompt_dropout]})
    assert {"the images", "pretrain.lr", "backbone.stylegan2.resolution"} <= pretrain.input_parts(cfg, images).keys()


def test_the_root_cause_of_a_ray_train_failure_is_one_line():
    from factory.recipes.ray_train import root_cause

    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\nTraceback (most recent call last):\n  ...")
            self.worker_failures = failures

    disk = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert root_cause(WorkerGroupError({0: disk})) == f"OSError: {disk}"
    wrapped = RuntimeError("Training failed due to controller error:")
    wrapped.__cause__ = ValueError("Expecting value: line 1 column 1 (char 0)")
    assert root_cause(wrapped) == "ValueError: Expecting value: line 1 column 1 (char 0)"
