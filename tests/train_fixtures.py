"""Shared by the trainer and SLURM tests: tiny shards + tokenizer + ViT file + config, and TensorBoard read-back."""
from __future__ import annotations

import io
import json
from pathlib import Path

import os
import socket
import subprocess
import sys

from pipeline.train.monitor import read_scalars  # noqa: F401 - the tests' TensorBoard read-back

REPO = Path(__file__).resolve().parents[1]

STEPS = 8
WORDS = "red green blue yellow black white dog cat car tree sky sea on the a with near small big".split()


def write_train_data(root: Path) -> Path:
    """Two shards of random-colour images + captions (one corrupt image), a tokenizer, a ViT
    state dict for `model.vision.pretrained`, and the YAML config of the runs."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from webdataset import TarWriter

    from pipeline.data import train_tokenizer

    rng = np.random.default_rng(0)
    captions, sizes = [], {}
    for s in range(2):
        name = f"{s:05d}.tar"
        with TarWriter(str(root / name)) as sink:
            for i in range(32):
                buf = io.BytesIO()
                Image.new("RGB", (24, 20), tuple(int(c) for c in rng.integers(0, 256, 3))).save(buf, "JPEG")
                jpg = b"not a jpeg" if (s, i) == (1, 5) else buf.getvalue()
                captions.append(" ".join(rng.choice(WORDS, 6)))
                sink.write({"__key__": f"{s:04d}{i:05d}", "jpg": jpg, "txt": captions[-1]})
        sizes[name] = 32
    (root / "sizes.json").write_text(json.dumps(sizes))
    train_tokenizer(captions, root / "tokenizer", vocab_size=320)
    torch.manual_seed(123)
    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=64, depth=2, num_heads=2)
    torch.save(vit.state_dict(), root / "vit.pth")
    config = root / "train.yaml"
    config.write_text(f"""\
inherit: tiny
model:
  vision: {{pretrained: {root}/vit.pth, pretrained_depth: 2, depth: 1, image_size: 16}}
  text: {{layers: 1, vocab_size: 320, max_len: 16}}
  fusion: {{layers: 1}}
data:
  tokenizer: {root}/tokenizer
  sources: [{{name: toy, shards: "{root}/{{00000..00001}}.tar"}}]
  batch_size: 4
  image_size: 16
  workers: 0
train: {{steps: {STEPS}, warmup_steps: 2, lr: 2.0e-3, log_every: 1, save_every: 4, keep_last: 1}}
""")
    return config


# ---------------------------------------------------------------- launching and killing real runs
def run_driver(driver) -> None:
    """A test file run under torchrun as a driver: `driver(config, out)` from --config and --out."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    driver(args.config, args.out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra) -> dict:
    """The environment of a process a test starts: conftest's (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR:
    DeepSpeed's comm op is compiled once, ...) with one thread per rank and unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def torchrun(args, log: Path, nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-6000:]}"
    return text


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each worker in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def newest_complete_step(run_dir: Path) -> int:
    """The highest step with a complete.json: where a killed run resumes (`latest` may lag it by the
    rename that follows complete.json)."""
    return max(int(d.name.split("_")[-1]) for d in (Path(run_dir) / "checkpoints").glob("step_*")
               if (d / "complete.json").is_file())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL every process below `proc` (the ranks run in their own sessions), then `proc`."""
    import signal

    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
