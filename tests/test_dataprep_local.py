"""Local-path corpora packed without HTTP, changed tables, and the CLI's `run` on the embedded default."""

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
import yaml
from PIL import Image

from dataprep import stages
from dataprep.__main__ import main
from dataprep.common import DataprepError
from dataprep.config import load_config

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_239"


def _images(folder: Path, n: int) -> list[str]:
    """n image files: real COCO images where ../shared has them, generated ones otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    real = sorted((COCO / "images").glob("*.jpg"))[:n] if (COCO / "images").is_dir() else []
    for i in range(n):
        name = f"{i:012d}.jpg"
        if real:
            shutil.copy(real[i], folder / name)
        else:
            Image.new("RGB", (120, 90), (20 * i % 255, 90, 160)).save(folder / name)
        names.append(name)
    return names


def test_local_coco_folder_is_packed_directly_with_all_captions(tmp_path):
    names = _images(tmp_path / "val2017", 5)
    (tmp_path / "val2017" / names[3]).write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "val2017" / names[4]).unlink()
    coco = {"images": [{"id": i, "file_name": n, "coco_url": ""} for i, n in enumerate(names)],
            "annotations": [{"id": 100 + 2 * i + j, "image_id": i, "caption": f"image {i} caption {j}"}
                            for i in range(5) for j in range(2)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    cfg = load_config("coco", {"format": "coco", "input": str(tmp_path / "captions.json"),
                               "reader": {"image_root": str(tmp_path / "val2017"), "one_row_per": "image"},
                               "output_dir": str(tmp_path / "shards"), "image_size": 48, "shard_size": 2,
                               "threads": 2, "processes": 1})
    stages.annotations(cfg)
    stages.download(cfg)
    report = stages.validate_stage(cfg)
    assert report["failed_by_reason"] == {"file_not_found": 1, "not_an_image": 1}
    assert report["samples"]["valid"] == report["succeeded"] == 3 and report["ok"]
    ds = wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False)
    samples = list(ds.decode("pil").to_tuple("jpg", "txt", "json"))
    assert [meta["captions"] for _, _, meta in samples] == [[f"image {i} caption 0", f"image {i} caption 1"]
                                                            for i in range(3)]
    for img, txt, meta in samples:
        assert min(img.size) == 48 and txt == meta["captions"][0]
        assert meta["path"].endswith(".jpg") and "url" not in meta


def _video_corpus(tmp_path, n: int, caption: str):
    from dataprep import shapes

    root = tmp_path / "syn"
    paths = shapes.generate(root, n_images=1, n_videos=n, n_eval_images=1, n_eval_videos=1)
    table = pd.read_csv(paths["videos_train"])
    listing = tmp_path / "videos.jsonl"
    pd.DataFrame({"path": [str(root / "videos" / f"{v}.mp4") for v in table["videoid"]],
                  "caption": [f"{caption} {i}" for i in range(n)]}).to_json(listing, orient="records", lines=True)
    config = tmp_path / "clips.yaml"
    config.write_text(yaml.safe_dump({"name": "clips", "modality": "video", "format": "generic",
                                      "input": str(listing), "output_dir": str(tmp_path / "shards"),
                                      "shard_size": 2, "threads": 2, "video_size": 32}))
    return config


def test_shards_of_a_changed_table_are_not_reused_silently(tmp_path, capsys):
    config = _video_corpus(tmp_path, 4, "first")
    assert main(["run", str(config)]) == 0
    _video_corpus(tmp_path, 4, "second")  # same files, other captions
    assert main(["annotations", str(config)]) == 0
    with pytest.raises(DataprepError, match="changed"):
        stages.download(load_config(str(config)))
    assert main(["download", str(config)]) == 2
    assert "--fresh" in capsys.readouterr().err
    assert main(["download", str(config), "--fresh"]) == 0
    assert main(["validate", str(config)]) == 0
    ds = wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False)
    assert sorted(t.decode() for (t,) in ds.to_tuple("txt")) == [f"second {i}" for i in range(4)]


def test_cli_run_on_the_embedded_video_default(tmp_path):
    args = ["run", "synthetic_videos", "--data-root", str(tmp_path), "--video-size", "32",
            "--set", "synthetic.n_images=2", "--set", "synthetic.n_videos=6", "--set", "synthetic.n_eval_images=2",
            "--set", "synthetic.n_eval_videos=3", "--shard-size", "4"]
    assert main(args) == 0
    train, evals = tmp_path / "shards" / "synthetic_videos", tmp_path / "shards" / "synthetic_videos_eval"
    assert json.loads((train / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    assert json.loads((evals / "sizes.json").read_text()) == {"00000.tar": 3}
    report = json.loads((train / "report.json").read_text())
    assert report["modality"] == "video" and report["video_seconds"] == pytest.approx(12.0)
    # Re-running the whole thing on a finished corpus changes no file.
    stamps = {p: p.stat().st_mtime_ns for p in train.iterdir() if p.is_file()}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in train.iterdir() if p.is_file()} == stamps
    img = Image.open(io.BytesIO((tmp_path / "synthetic" / "images" / "train_000000.jpg").read_bytes()))
    assert img.size == (64, 64)
