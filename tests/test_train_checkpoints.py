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
    """The driver refuses other inputs before Ray Train starts its workers, from the record a finished
    fit left; where there is no record (or no checkpoint history), the workers' check decides."""
    from types import SimpleNamespace

    from factory.recipes.ray_train import RUN_HISTORY, RUN_INPUTS, check_run_inputs

    run = SimpleNamespace(storage_path=str(tmp_path), run_name="interpreter")
    folder = tmp_path / "interpreter"
    check_run_inputs("a", run, "train", "labeled set")  # a fresh run
    folder.mkdir()
    (folder / RUN_INPUTS).write_text('{"inputs_hash": "a"}')
    check_run_inputs("b", run, "train", "labeled set")  # no checkpoint history: nothing to resume
    (folder / RUN_HISTORY).write_text('{"checkpoint_results": []}')
    check_run_inputs("a", run, "train", "labeled set")
    with pytest.raises(TrainError, match=r"^run 'interpreter' in .* was fitted on different inputs \(labeled set\); "
                                         r"choose a new train.run_name$"):
        check_run_inputs("b", run, "train", "labeled set")
    (folder / RUN_INPUTS).write_text('{"inputs_ha')
    check_run_inputs("b", run, "train", "labeled set")  # unreadable: the workers check the checkpoint


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
