"""Annotation readers: the real format samples in ../shared and small generated files."""

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from dataprep.__main__ import main
from dataprep.common import DataprepError, failure_reason
from dataprep.readers import parse_iso_duration, read_corpus

ANNOTATIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "annotations"


def real(name: str) -> Path:
    path = ANNOTATIONS / name
    if not path.exists():
        pytest.skip(f"{path} not present (real annotation samples live in ../shared)")
    return path


# --- the real samples -------------------------------------------------------------------------

@pytest.mark.shared
def test_cc3m_real_validation_list_parses_every_row_exactly():
    path = real("cc3m_validation.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()
    df, report = read_corpus("cc3m", str(path), "cc3m")
    assert report["rows_read"] == len(lines) == 15833
    assert report["rows_kept"] == 15833 and report["rejected"] == {}
    assert df["caption"].iloc[0] == "author : a life in photography -- in pictures"
    assert df["url"].iloc[0] == ("https://i.pinimg.com/736x/66/01/6c/"
                                 "66016c3ba27c0e04f39e2bd81a934e3e--anita-ekberg-bob-hope.jpg")
    last_caption, last_url = lines[-1].split("\t")
    assert (df["caption"].iloc[-1], df["url"].iloc[-1]) == (" ".join(last_caption.split()), last_url)
    assert df["url"].str.match(r"^https?://").all()
    assert df["key"].is_unique and list(df.columns[:4]) == ["url", "caption", "key", "source"]


@pytest.mark.shared
def test_webvid_real_sample_keeps_quoted_commas_and_parses_durations():
    path = real("webvid_results_2M_val_sample.csv")
    df, report = read_corpus("webvid", str(path), "webvid")
    assert report["rows_kept"] == 9
    row = df.set_index("key").loc["1020335461"]
    assert row["caption"] == "Moroccan flag waving in the wind in medieval town essaouira, morocco"
    assert row["duration_s"] == 5.0 and row["src_duration"] == "PT00H00M05S"
    assert row["url"].endswith("stock-footage-moroccan-flag-waving-in-the-wind-in-medieval-town-essaouira-morocco.mp4")
    assert row["page_dir"] == "000851_000900"
    with open(path, newline="", encoding="utf-8") as f:
        assert sorted(df["key"]) == sorted(r["videoid"] for r in csv.DictReader(f))


@pytest.mark.shared
def test_msrvtt_real_jsfusion_test_split():
    path = real("msrvtt_jsfusion_test.csv")
    df, report = read_corpus("msrvtt", str(path), "msrvtt", {"video_root": "/videos"})
    assert report["rows_read"] == report["rows_kept"] == 1000
    first = df.iloc[0]
    assert (first["key"], first["vid_key"], first["video_id"]) == ("ret0", "msr9770", "video9770")
    assert first["caption"] == "a person is connecting something to system"
    assert first["path"] == "/videos/video9770.mp4"
    # The file has CRLF line ends: none may stay inside a caption.
    assert not df["caption"].str.contains("\r").any()
    assert df["video_id"].nunique() == 1000


# --- generated files, one per format ------------------------------------------------------------

def test_cc3m_counts_malformed_rows_and_empty_captions(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text("a dog\thttp://x/1.jpg\n"
                    "too\tmany\tfields\n"
                    "\n"
                    "   \thttp://x/2.jpg\n"
                    "a  cat \t http://x/3.jpg \n"
                    "no url\tnot a url\n", encoding="utf-8")
    df, report = read_corpus("cc3m", str(path), "cc3m")
    assert report["rows_read"] == 6
    assert report["rejected"] == {"malformed row": 2, "empty caption": 1, "invalid url": 1}
    assert df[["caption", "url"]].values.tolist() == [["a dog", "http://x/1.jpg"], ["a cat", "http://x/3.jpg"]]
    assert df["key"].tolist() == ["000000000", "000000004"]  # line numbers, stable across re-runs


@pytest.mark.parametrize("header", [True, False])
def test_cc12m_with_and_without_header(tmp_path, header):
    path = tmp_path / "cc12m.tsv"
    body = "http://x/1.jpg\tone <PERSON> here\nhttp://x/2.jpg\ttwo\n"
    path.write_text(("url\tcaption\n" if header else "") + body, encoding="utf-8")
    df, report = read_corpus("cc12m", str(path), "cc12m")
    assert report["rows_read"] == 2
    assert df["url"].tolist() == ["http://x/1.jpg", "http://x/2.jpg"]
    assert df["caption"].tolist() == ["one <PERSON> here", "two"]


def test_sbu_lists_json_and_misaligned_lists(tmp_path):
    urls, caps = tmp_path / "urls.txt", tmp_path / "caps.txt"
    urls.write_text("http://x/a.jpg\nhttp://x/b.jpg\n")
    caps.write_text("cap a\ncap b\n")
    df, _ = read_corpus("sbu", str(urls), "sbu", {"captions_path": str(caps)})
    assert df[["url", "caption"]].values.tolist() == [["http://x/a.jpg", "cap a"], ["http://x/b.jpg", "cap b"]]
    js = tmp_path / "sbu-captions-all.json"
    js.write_text(json.dumps({"image_urls": ["http://x/c.jpg"], "captions": ["cap c"], "user_ids": ["u"]}))
    df, _ = read_corpus("sbu", str(js), "sbu")
    assert df["caption"].tolist() == ["cap c"]
    caps.write_text("cap a\n")
    with pytest.raises(DataprepError, match="align"):
        read_corpus("sbu", str(urls), "sbu", {"captions_path": str(caps)})


def _coco_json(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.jpg", "coco_url": "http://c/000001.jpg"},
                   {"id": 2, "file_name": "000002.jpg", "coco_url": "http://c/000002.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A dog.\n"},
                        {"id": 11, "image_id": 1, "caption": "A brown dog."},
                        {"id": 12, "image_id": 2, "caption": "A cat."},
                        {"id": 13, "image_id": 99, "caption": "Lost."}]}))
    return path


def test_coco_captions_per_caption_and_per_image(tmp_path):
    path = _coco_json(tmp_path)
    df, report = read_corpus("coco", str(path), "coco", {"image_root": "/coco/val2017"})
    assert report["rejected"] == {"caption of unknown image": 1}
    assert df[["key", "caption", "path"]].values.tolist() == [
        ["10", "A dog.", "/coco/val2017/000001.jpg"], ["11", "A brown dog.", "/coco/val2017/000001.jpg"],
        ["12", "A cat.", "/coco/val2017/000002.jpg"]]
    df, _ = read_corpus("coco", str(path), "coco", {"use_url": True, "one_row_per": "image"})
    assert df["url"].tolist() == ["http://c/000001.jpg", "http://c/000002.jpg"]
    assert [list(c) for c in df["captions"]] == [["A dog.", "A brown dog."], ["A cat."]]
    assert df["caption"].tolist() == ["A dog.", "A cat."]


def test_karpathy_splits_and_grouping(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 5, "split": "test",
         "sentences": [{"raw": "one.", "tokens": ["one"]}, {"raw": "two.", "tokens": ["two"]}]},
        {"filepath": "train2014", "filename": "b.jpg", "cocoid": 6, "split": "train",
         "sentences": [{"raw": "three.", "tokens": ["three"]}]}]}))
    df, report = read_corpus("karpathy", str(path), "coco", {"image_root": "/coco", "splits": ["test"]})
    assert report["rows_read"] == 2 and len(df) == 1
    assert df["path"].iloc[0] == "/coco/val2014/a.jpg" and list(df["captions"].iloc[0]) == ["one.", "two."]
    df, _ = read_corpus("karpathy", str(path), "coco", {"one_row_per": "caption"})
    assert df["key"].tolist() == ["5_0", "5_1", "6_0"]


def test_visual_genome_regions_become_image_captions(tmp_path):
    (tmp_path / "VG_100K_2").mkdir()
    (tmp_path / "VG_100K_2" / "1.jpg").write_bytes(b"x")
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps([
        {"id": 1, "regions": [{"region_id": 100, "image_id": 1, "phrase": "a tall  tree", "x": 0, "y": 0,
                               "width": 5, "height": 5},
                              {"region_id": 101, "image_id": 1, "phrase": "A tall tree", "x": 1, "y": 1,
                               "width": 5, "height": 5},
                              {"region_id": 102, "image_id": 1, "phrase": "blue sky", "x": 1, "y": 1,
                               "width": 5, "height": 5}]},
        {"id": 2, "regions": [{"region_id": 200, "image_id": 2, "phrase": "", "x": 0, "y": 0,
                               "width": 1, "height": 1}]}]))
    df, report = read_corpus("vg", str(path), "vg", {"image_root": str(tmp_path)})
    assert df["caption"].tolist() == ["a tall tree", "blue sky"]
    assert df["path"].iloc[0] == str(tmp_path / "VG_100K_2" / "1.jpg")
    assert report["rejected"] == {"duplicate phrase in image": 1, "empty caption": 1}
    df, _ = read_corpus("vg", str(path), "vg", {"image_root": str(tmp_path), "one_row_per": "image"})
    assert len(df) == 1 and list(df["captions"].iloc[0]) == ["a tall tree", "blue sky"]


def test_webvid_generated_with_mirror_template_and_missing_columns(tmp_path):
    path = tmp_path / "results_2M_train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        w.writerow(["7", "waves, at dusk", "1", "000001_000050", "PT00H01M02S", "https://gone/7.mp4"])
    df, _ = read_corpus("webvid", str(path), "webvid", url_template="http://mirror/{page_dir}/{videoid}.mp4")
    assert df["url"].tolist() == ["http://mirror/000001_000050/7.mp4"]
    assert df["duration_s"].tolist() == [62.0] and df["caption"].tolist() == ["waves, at dusk"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,x\n")
    with pytest.raises(DataprepError, match="WebVid columns"):
        read_corpus("webvid", str(bad), "webvid")


def test_msrvtt_sentence_with_semicolon_and_bad_header(tmp_path):
    path = tmp_path / "jsfusion.csv"
    path.write_text("key;vid_key;video_id;sentence\r\nret0;msr1;video1;a man; a dog\r\nbroken\r\n")
    df, report = read_corpus("msrvtt", str(path), "msrvtt", {"video_root": "v"})
    assert df["caption"].tolist() == ["a man; a dog"] and df["path"].tolist() == [str(Path("v/video1.mp4"))]
    assert report["rejected"] == {"malformed row": 1}
    path.write_text("a;b\n")
    with pytest.raises(DataprepError, match="header"):
        read_corpus("msrvtt", str(path), "msrvtt")


def test_generic_csv_jsonl_and_normalisation(tmp_path):
    path = tmp_path / "list.csv"
    pd.DataFrame({"image": ["/a.jpg", "", "/c.jpg", "/d.jpg"], "text": ["one", "two", "three", "four"],
                  "width": ["1", "2", "3", "4"], "id": ["k1", "k2", "k1", "k4"]}).to_csv(path, index=False)
    df, report = read_corpus("generic", str(path), "mine", {"path_col": "image", "caption_col": "text",
                                                            "key_col": "id"})
    assert report["rejected"] == {"missing path": 1, "duplicate key": 1}
    assert df["key"].tolist() == ["k1", "k4"]
    # A column named like a field the shard writers set is kept under another name.
    assert "src_width" in df.columns and "width" not in df.columns
    jl = tmp_path / "list.jsonl"
    jl.write_text('{"url": "http://x/1.jpg", "caption": "hi", "lang": "en"}\n'
                  '{"url": "ftp//broken", "caption": "no"}\n')
    df, report = read_corpus("generic", str(jl), "mine")
    assert df[["url", "caption", "lang"]].values.tolist() == [["http://x/1.jpg", "hi", "en"]]
    assert report["rejected"] == {"invalid url": 1}


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataprepError, match="unknown format"):
        read_corpus("laion", str(tmp_path / "x"), "x")
    with pytest.raises(DataprepError, match="not found"):
        read_corpus("cc3m", str(tmp_path / "missing.tsv"), "x")


def test_iso_durations_and_failure_reasons():
    assert parse_iso_duration("PT00H00M17S") == 17.0
    assert parse_iso_duration("PT1H2M3.5S") == 3723.5
    assert parse_iso_duration("17") is None
    assert failure_reason("HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert failure_reason("Image decoding error") == "not_an_image"
    assert failure_reason("image too small") == "image_too_small"
    assert failure_reason("timed out") == "timeout"
    assert failure_reason("truncated download: 5 of 10 bytes") == "truncated_download"
    assert failure_reason("video too long: 35.0s > 30s") == "video_too_long"
    assert failure_reason("weird 0x7f12 thing 42") == "other: weird N thing N"


def test_cli_annotations_stage_writes_table_and_report(tmp_path, capsys):
    src = tmp_path / "cc3m.tsv"
    src.write_text("a dog\thttp://x/1.jpg\nbad row\n")
    out = tmp_path / "shards"
    assert main(["annotations", "cc3m", "--input", str(src), "--output-dir", str(out)]) == 0
    table = pd.read_parquet(out / "_prep" / "annotations.parquet")
    assert table["caption"].tolist() == ["a dog"]
    report = json.loads((out / "_prep" / "annotations.json").read_text())
    assert report["rejected"] == {"malformed row": 1} and report["rows_kept"] == 1
    assert "1 kept" in capsys.readouterr().out
    assert main(["annotations", "cc3m", "--input", str(tmp_path / "nope.tsv"), "--output-dir", str(out)]) == 2
