"""Checkpoint reliability drills (issue 12) on a real DeepSpeed engine in this process (CPU, gloo,
world size 1): a damaged newest checkpoint (a file deleted or truncated) and a disk that fills up
during a save."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
from pathlib import Path


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train_fixtures import free_port  # noqa: E402

from pipeline.train import checkpoint, engine as engine_lib  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group for the module (DeepSpeed needs one), torn down after."""
    owned = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        if owned:
            for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(free_port())).items():
                mp.setenv(k, v)
            engine_lib.init_distributed()
        yield
        if owned:
            dist.destroy_process_group()


@pytest.fixture
def new_engine(process_group):
    cfg = load_config("tiny")

    def make(seed: int = 0):
        torch.manual_seed(seed)
        return engine_lib.initialize(build_model(cfg), cfg)
    return make


def _save(engine, out, step, keep_last=2):
    return checkpoint.save(engine, out, step, {"marker": f"client {step}"}, {"marker": f"rank {step}"}, keep_last)


def _two_checkpoints(new_engine, out):
    e = new_engine()
    return e, _save(e, out, 1), _save(e, out, 2)


def _assert_loads(new_engine, saver, tag_dir, step):
    """`tag_dir` loads into a fresh engine (other initial weights) and brings the saver's weights back."""
    fresh = new_engine(seed=1)
    resumed = checkpoint.load(fresh, tag_dir)
    assert (resumed.step, resumed.client_state["marker"], resumed.rank_state["marker"]) == \
        (step, f"client {step}", f"rank {step}")
    want = saver.module.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.module.state_dict().items())


def _damage(tag_dir: Path, how: str, name: str) -> Path:
    path = next(tag_dir.glob(name))
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.unlink()
    return path


# ---------------------------------------------------------------- a damaged newest checkpoint
def test_complete_json_lists_every_file_with_its_size(new_engine, tmp_path):
    _, _, newest = _two_checkpoints(new_engine, tmp_path)
    files = json.loads((newest / checkpoint.COMPLETE).read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in newest.iterdir() if p.name != checkpoint.COMPLETE}
    assert files == on_disk and MODEL_STATES in files and "rank_00000.pt" in files
    assert checkpoint.verify(newest) == []


@pytest.mark.parametrize("how,name", [("truncate", MODEL_STATES), ("delete", MODEL_STATES),
                                      ("delete", "*optim_states.pt"), ("truncate", "rank_00000.pt")])
def test_auto_resume_skips_a_damaged_newest_checkpoint(new_engine, tmp_path, caplog, how, name):
    saver, older, newest = _two_checkpoints(new_engine, tmp_path)
    size = next(newest.glob(name)).stat().st_size
    path = _damage(newest, how, name)
    assert checkpoint.verify(newest) == [{"truncate": f"{path} is {size // 2} bytes, expected {size}",
                                          "delete": f"{path} missing (expected {size} bytes)"}[how]]
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert checkpoint.resolve(tmp_path, "auto") == older
    assert str(path) in caplog.text and "damaged" in caplog.text and f"resuming from {older}" in caplog.text
    assert (tmp_path / "checkpoints" / checkpoint.LATEST).read_text() == newest.name  # resolve only reads
    assert newest.is_dir()
    _assert_loads(new_engine, saver, older, 1)


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(new_engine, tmp_path):
    _, _, newest = _two_checkpoints(new_engine, tmp_path)
    path = _damage(newest, "truncate", MODEL_STATES)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{path} is ")) as err:
        checkpoint.resolve(tmp_path, str(newest))
    assert isinstance(err.value, FileNotFoundError) and "train.resume=auto" in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(path))):
        checkpoint.consolidate(newest, tmp_path / "fp32.pt")


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(new_engine, tmp_path, caplog):
    _, older, newest = _two_checkpoints(new_engine, tmp_path)
    for d in (older, newest):
        _damage(d, "delete", MODEL_STATES)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        with pytest.raises(checkpoint.CheckpointError, match="every complete checkpoint .* is damaged"):
            checkpoint.resolve(tmp_path, "auto")
    assert caplog.text.count(MODEL_STATES) == 2
    assert checkpoint.resolve(tmp_path, "none") is None


def test_a_legacy_checkpoint_without_file_list_still_resumes(new_engine, tmp_path, caplog):
    saver, _, newest = _two_checkpoints(new_engine, tmp_path)
    written = json.loads((newest / checkpoint.COMPLETE).read_text())
    legacy = {k: written[k] for k in ("step", "world_size", "time")}  # complete.json before the file list
    (newest / checkpoint.COMPLETE).write_text(json.dumps(legacy))
    with caplog.at_level(logging.DEBUG, logger="pipeline.train.checkpoint"):
        assert checkpoint.resolve(tmp_path, "auto") == newest
        assert checkpoint.resolve(tmp_path, str(newest)) == newest
    assert "not verified" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _assert_loads(new_engine, saver, newest, 2)


def test_next_save_keeps_the_new_checkpoint_and_drops_the_damaged_one(new_engine, tmp_path):
    e = new_engine()
    first, damaged = _save(e, tmp_path, 1), _save(e, tmp_path, 3)
    _damage(damaged, "truncate", MODEL_STATES)
    assert checkpoint.resolve(tmp_path, "auto") == first
    new = _save(e, tmp_path, 2, keep_last=1)  # the resumed run saves before reaching step 3 again
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [new.name]
    assert checkpoint.resolve(tmp_path, "auto") == new


# ---------------------------------------------------------------- a full disk during a save
def test_enospc_while_writing_is_a_clear_error_and_the_previous_checkpoint_stays(new_engine, tmp_path,
                                                                                  monkeypatch):
    saver = new_engine()
    previous = _save(saver, tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kw):  # what a filling disk does: part of the file, then ENOSPC
        if "optim_states" in str(f):
            Path(f).write_bytes(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"no space left on device while writing \S+step_00000002/\S*optim_states.pt") as err:
        _save(saver, tmp_path, 2)
    assert err.value.errno == errno.ENOSPC and "are unchanged" in str(err.value)
    monkeypatch.undo()
    _assert_previous_is_current(new_engine, saver, tmp_path, previous)


def _assert_previous_is_current(new_engine, saver, out, previous):
    root = checkpoint.checkpoint_root(out)
    assert (root / checkpoint.LATEST).read_text() == previous.name
    assert not checkpoint.is_complete(root / checkpoint.tag_for(2))
    assert checkpoint.resolve(out, "auto") == previous
    _assert_loads(new_engine, saver, previous, 1)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a tmpfs of `size` bytes, or a skip where mounting is not allowed."""
    mounted = []

    def mount(size: int) -> Path:
        d = tmp_path / "small_disk"
        d.mkdir()
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode}); "
                        "the injected-ENOSPC test covers the error path")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)]).returncode != 0:
            subprocess.run(["umount", "-l", str(d)])


def test_a_really_full_disk_during_a_save(new_engine, tmp_path, small_disk):
    saver = new_engine()
    size = sum(p.stat().st_size for p in _save(saver, tmp_path / "probe", 1).rglob("*"))
    out = small_disk(int(size * 1.5))  # room for one checkpoint, not two
    previous = _save(saver, out, 1)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"no space left on device while writing \S+/step_00000002 ") as err:
        _save(saver, out, 2)
    assert err.value.errno == errno.ENOSPC
    _assert_previous_is_current(new_engine, saver, out, previous)


def test_write_error_tells_a_full_disk_from_other_failures(tmp_path):
    tag = tmp_path / "checkpoints" / "step_00000002"
    torch_msg = "[enforce fail at inline_container.cc:672] . unexpected pos 51072 vs 50966"
    err = checkpoint.write_error(RuntimeError(torch_msg), tag)  # plenty of room here: not "no space"
    assert str(err).startswith(f"write failed (a quota or I/O error?) while writing {tag} (") and torch_msg in str(err)
    quota = checkpoint.write_error(OSError(errno.EDQUOT, "Disk quota exceeded", str(tag / "x.pt")), tag)
    assert str(quota).startswith(f"disk quota exceeded while writing {tag / 'x.pt'}")
    assert checkpoint.write_error(RuntimeError("CUDA out of memory"), tag) is None
    assert checkpoint.write_error(PermissionError(errno.EACCES, "Permission denied"), tag) is None
