"""Shared by the trainer and SLURM tests: tiny shards + tokenizer + ViT file + config, and TensorBoard read-back."""
from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.monitor import read_scalars  # noqa: F401 - the tests' TensorBoard read-back

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
