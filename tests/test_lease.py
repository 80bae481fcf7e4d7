"""Two builds into one output: one holds the lease, the other is refused; a crashed holder's lease is
taken over once it expires (or at once when its process is gone); a holder that lost it is told."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from factory import lease, storage


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
    else:
        yield storage.join(request.getfixturevalue("s3_bucket"), "out")


def plant(output: str, **fields) -> None:
    """A lease record as another build would have written it."""
    record = {"owner": "other-build", "host": "elsewhere", "pid": 1, "heartbeat": time.time(),
              "expires": time.time() + 60, **fields}
    storage.makedirs(output)
    storage.write_bytes(storage.join(output, lease.LEASE_FILE), json.dumps(record).encode())


def test_second_holder_is_refused_until_release(output):
    first = lease.acquire(output, seconds=30)
    with pytest.raises(lease.LeaseError, match=r"is being built by another build \(owner") as e:
        lease.acquire(output, seconds=30)
    assert output in str(e.value) and "\n" not in str(e.value)
    first.release()
    assert lease.holder(output) is None
    with lease.acquire(output, seconds=30) as second:
        assert lease.holder(output)["owner"] == second.owner
    assert not storage.exists(storage.join(output, lease.LEASE_FILE))


def test_expired_lease_is_taken_over(output):
    plant(output, expires=time.time() - 1)
    with lease.acquire(output, seconds=30) as taken:
        assert lease.holder(output)["owner"] == taken.owner


def test_live_lease_of_another_host_is_respected(output):
    plant(output)
    with pytest.raises(lease.LeaseError, match="elsewhere pid 1"):
        lease.acquire(output, seconds=30)


def test_lease_of_a_dead_local_process_is_taken_over_at_once(output):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(output, host=socket.gethostname(), pid=dead.pid)
    with lease.acquire(output, seconds=30) as taken:
        assert lease.holder(output)["owner"] == taken.owner


def test_heartbeat_renews_and_a_lost_lease_is_reported(output):
    held = lease.acquire(output, seconds=0.6)
    first = lease.holder(output)["expires"]
    time.sleep(0.5)
    assert lease.holder(output)["expires"] > first  # renewed, so no one may take it over
    held.check()
    plant(output, owner="thief")  # someone took it over (e.g. after this holder stalled)
    time.sleep(0.5)
    with pytest.raises(lease.LeaseError, match="lost its lease"):
        held.check()
    held.release()
    assert lease.holder(output)["owner"] == "thief"  # the thief's lease is left alone


def test_a_local_lease_appears_only_whole(tmp_path, monkeypatch):
    """A local lease is written under a private name and linked into place: while its creator is
    still writing it, no lease is there to read (an empty one would read as stale, be taken over,
    and leave two builds each holding the output)."""
    output, seen, real_fsync = str(tmp_path / "out"), [], os.fsync

    def spy(fd):
        seen.append(lease.holder(output))
        real_fsync(fd)

    monkeypatch.setattr(lease.os, "fsync", spy)
    with lease.acquire(output, seconds=30) as held:
        assert seen[0] is None
        assert lease.holder(output)["owner"] == held.owner
    assert os.listdir(output) == []  # no private copy left behind

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lease.os, "link", no_links)  # a disk without hard links: an exclusive create
    with lease.acquire(output, seconds=30) as held:
        assert lease.holder(output)["owner"] == held.owner
        with pytest.raises(lease.LeaseError, match="is being built by another build"):
            lease.acquire(output, seconds=30)
    assert os.listdir(output) == []


def test_racing_processes_one_wins(tmp_path):
    """Eight processes race for one local lease at the same instant: exactly one gets it (and holds it
    until the other seven have been refused)."""
    out, votes = str(tmp_path / "race"), tmp_path / "votes"
    os.makedirs(out)
    votes.mkdir()
    code = ("import os,sys,time,uuid; from factory import lease\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
            "try:\n  held = lease.acquire(sys.argv[1], 30)\n"
            "except lease.LeaseError:\n  open(os.path.join(sys.argv[3], uuid.uuid4().hex), 'w').close(); print('refused')\n"
            "else:\n  deadline = time.time() + 60\n"
            "  while len(os.listdir(sys.argv[3])) < 7 and time.time() < deadline: time.sleep(0.1)\n"
            "  held.release(); print('won')\n")
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, out, str(start), str(votes)], stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["refused"] * 7 + ["won"]
    assert os.listdir(out) == []


def test_generate_into_a_held_output_is_refused_by_the_cli(tmp_path, tiny_cfg, capsys):
    """The second build's CLI prints one line naming the output and exits 1; it writes nothing."""
    from conftest import save_untrained_decoder

    from factory import config as config_lib
    from factory.cli import main

    save_untrained_decoder(tiny_cfg)
    config = tmp_path / "factory.yaml"
    config.write_text(config_lib.to_yaml(tiny_cfg))
    out = tiny_cfg.generate.output
    plant(out, host="node-2", pid=4242)
    assert main(["generate", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("factory: error: ") and out in err and "node-2 pid 4242" in err and "\n" not in err
    assert os.listdir(out) == [lease.LEASE_FILE]  # the other build's lease, and nothing of ours


def test_a_lease_that_cannot_be_released_never_hides_the_builds_error(tmp_path, monkeypatch):
    """A disk turned read-only under a build: the build's own error propagates (not the release's
    OSError, which the CLI would show as a traceback); after a clean build it is one StorageError."""
    def read_only(url, tag):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lease, "_delete", read_only)
    with pytest.raises(storage.StorageError, match="cannot write the manifest"):
        with lease.acquire(str(tmp_path / "a"), 20):
            raise storage.StorageError("cannot write the manifest")
    with pytest.raises(storage.StorageError, match=r"cannot release the lease .*/b/_lease.json: Read-only file system"):
        with lease.acquire(str(tmp_path / "b"), 20):
            pass
