"""The image stage: img2dataset against a loopback server serving real COCO images, with faults."""

import json
import random
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_fixtures import image_bytes
from dataprep import shapes, stages
from dataprep.config import CorpusConfig
from dataprep.serve import Faults, LoopbackServer

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_239"
N_GOOD = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, [(file name, caption)]): real COCO images and their first captions, or generated ones."""
    if (COCO / "captions.jsonl").exists():
        rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()][:N_GOOD]
        return COCO / "images", [(Path(r["image"]).name, r["captions"][0]) for r in rows]
    folder = tmp_path_factory.mktemp("images")
    rng, items = random.Random(0), []
    for i in range(N_GOOD):
        spec = shapes._image_spec(rng)
        shapes.render_image(spec, 96, rng).save(folder / f"{i}.jpg")
        items.append((f"{i}.jpg", spec["caption"]))
    return folder, items


# What the server gets wrong, and the reason each must be counted under.
FAULTS = Faults(status={"/flaky.jpg": 500},
                payload={"/page.jpg": b"<!doctype html><title>404</title>",
                         "/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(300),
                         "/tiny.jpg": image_bytes((90, 140, 200), (8, 8))})
BAD_URLS = ["missing_1.jpg", "page.jpg", "missing_2.jpg", "corrupt.jpg", "tiny.jpg", "flaky.jpg", "missing_3.jpg"]
EXPECTED_REASONS = {"http_404": 3, "http_500": 1, "not_an_image": 2, "image_too_small": 1}


def _write_list(path: Path, base: str, items) -> None:
    """A CC3M-format list: good rows with the bad ones spread among them, plus two malformed rows."""
    bad, lines = list(BAD_URLS), []
    for i, (name, caption) in enumerate(items):
        lines.append(f"{' '.join(caption.split())}\t{base}/{name}")
        if i % 3 == 2 and bad:
            lines.append(f"picture {bad[0]}\t{base}/{bad.pop(0)}")
    lines += [f"picture {name}\t{base}/{name}" for name in bad]
    lines.insert(5, "a row without its url")
    lines.insert(9, f"  \t{base}/{items[0][0]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _config(tmp: Path) -> CorpusConfig:
    return CorpusConfig(name="coco_web", modality="image", format="cc3m", input=str(tmp / "list.tsv"),
                        output_dir=str(tmp / "shards"), shard_size=8, processes=1, threads=8, retries=1,
                        timeout=5, image_size=64, min_image_size=16, allow_private_urls=True,  # a loopback server
                        retry_rounds=0)  # the injected faults are final here (retries: tests/test_trust.py)


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    folder, items = source
    tmp = tmp_path_factory.mktemp("img2dataset")
    cfg = _config(tmp)
    with LoopbackServer(folder, FAULTS) as srv:
        _write_list(tmp / "list.tsv", srv.url, items)
        stages.annotations(cfg)
        stages.download(cfg)
    report = stages.validate_stage(cfg)
    return {"cfg": cfg, "tmp": tmp, "out": Path(cfg.output_dir), "report": report, "items": items,
            "folder": folder}


def _read(out: Path):
    ds = wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False).decode("pil")
    return [(img, txt, meta) for img, txt, meta in ds.to_tuple("jpg", "txt", "json")]


@pytest.mark.slow
def test_shards_hold_exactly_the_good_images_with_their_captions(prepared):
    samples = _read(prepared["out"])
    expected = {name: " ".join(caption.split()) for name, caption in prepared["items"]}
    got = {meta["url"].rsplit("/", 1)[1]: txt for _, txt, meta in samples}
    assert got == expected
    for img, txt, meta in samples:
        assert isinstance(img, Image.Image) and min(img.size) == 64  # keep_ratio: shorter side 64
        assert meta["caption"] == txt and meta["source"] == "coco_web" and meta["status"] == "success"
        assert meta["source_key"].isdigit()


@pytest.mark.slow
def test_failures_are_counted_by_reason(prepared):
    report = prepared["report"]
    assert report["failed_by_reason"] == EXPECTED_REASONS
    assert report["annotations"]["rejected"] == {"malformed row": 1, "empty caption": 1}
    assert report["attempted"] == N_GOOD + len(BAD_URLS) == report["annotations"]["rows_kept"]
    assert report["succeeded"] == report["samples"]["valid"] == N_GOOD
    assert report["ok"] and report["shards"]["total"] == 4
    assert sum(json.loads((prepared["out"] / "sizes.json").read_text()).values()) == N_GOOD


@pytest.mark.slow
def test_interrupted_shard_is_caught_then_redone_alone(prepared):
    out, cfg = prepared["out"], prepared["cfg"]
    before = {(txt, meta["url"].rsplit("/", 1)[1]) for _, txt, meta in _read(out)}
    # What a kill leaves of the shard img2dataset was writing: a partial tar and no stats.
    tar = out / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 2 // 5])
    (out / "00001_stats.json").unlink()
    report = stages.validate_stage(cfg)
    assert not report["ok"]
    assert "00001.tar" not in json.loads((out / "sizes.json").read_text())
    assert any("truncated" in e for e in report["errors"])
    assert any("of 31 annotation rows" in e for e in report["errors"])

    others = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"}
    # Resumed from another port: the same corpus, so the finished shards still count.
    with LoopbackServer(prepared["folder"], FAULTS) as srv:
        _write_list(Path(cfg.input), srv.url, prepared["items"])
        stages.annotations(cfg)
        stages.download(cfg)
        report = stages.validate_stage(cfg)
        assert report["ok"] and report["failed_by_reason"] == EXPECTED_REASONS
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"} == others
        assert {(txt, meta["url"].rsplit("/", 1)[1]) for _, txt, meta in _read(out)} == before
        # Finished: a further run starts no download at all.
        stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
        assert stages.download(cfg)["attempted"] == report["attempted"]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps
