"""Readers: each corpus's own annotation format -> one normalised table.

Every reader returns a `ReadResult`: a DataFrame with `caption`, `key` and either `url` or `path`
(plus the corpus's other columns), the number of rows it read, and the rows it rejected, by reason.
`normalise` then applies the checks common to all corpora. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .common import RESERVED_COLUMNS, DataprepError, url_to_fs


@dataclass
class ReadResult:
    df: pd.DataFrame
    rows_read: int
    rejected: Counter = field(default_factory=Counter)


def _open_text(path: str):
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise DataprepError(f"annotation file not found: {path}")
    # newline="" keeps "\r\n" visible so that it is stripped, never left inside a caption.
    return fs.open(p, "r", encoding="utf-8", newline="")


def _lines(path: str) -> list[str]:
    with _open_text(path) as f:
        return [line.rstrip("\r\n") for line in f]


def _index_keys(n: int) -> list[str]:
    return [f"{i:09d}" for i in range(n)]


def read_cc3m(path: str) -> ReadResult:
    """Conceptual Captions 3M: `caption<TAB>url`, no header, no quoting."""
    rows, keys, rejected = [], [], Counter()
    lines = _lines(path)
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if len(parts) != 2:
            rejected["malformed row"] += 1
            continue
        rows.append((parts[1], parts[0]))
        keys.append(f"{i:09d}")  # the line number: stable across re-runs of the same file
    df = pd.DataFrame(rows, columns=["url", "caption"])
    df["key"] = keys
    return ReadResult(df, len(lines), rejected)


def _looks_like_url(text: str) -> bool:
    return "://" in text


def read_cc12m(path: str) -> ReadResult:
    """Conceptual 12M: `url<TAB>caption`; the header line is optional (the release has none)."""
    lines = _lines(path)
    header = ["url", "caption"]
    start = 0
    if lines and not _looks_like_url(lines[0].split("\t")[0]):
        header = lines[0].split("\t")
        start = 1
        if "url" not in header or "caption" not in header:
            raise DataprepError(f"{path}: header {header} lacks 'url' and 'caption'")
    rows, keys, rejected = [], [], Counter()
    for i, line in enumerate(lines[start:]):
        parts = line.split("\t")
        if len(parts) != len(header):
            rejected["malformed row"] += 1
            continue
        rows.append(parts)
        keys.append(f"{i:09d}")
    df = pd.DataFrame(rows, columns=header)
    df["key"] = keys
    return ReadResult(df, len(lines) - start, rejected)


def read_sbu(path: str, captions_path: str | None = None) -> ReadResult:
    """SBU Captions: a URL list plus a caption list, line-aligned (or the release's JSON of both)."""
    if path.endswith(".json"):
        with _open_text(path) as f:
            data = json.load(f)
        urls, captions = data["image_urls"], data["captions"]
    else:
        if captions_path is None:
            raise DataprepError("sbu needs reader.captions_path (the caption list beside the URL list)")
        urls, captions = _lines(path), _lines(captions_path)
    if len(urls) != len(captions):
        # Pairing two lists of different length would attach captions to the wrong images.
        raise DataprepError(f"sbu: {len(urls)} URLs but {len(captions)} captions; the lists must align")
    df = pd.DataFrame({"url": urls, "caption": captions, "key": _index_keys(len(urls))})
    return ReadResult(df, len(urls))


def _group_per_image(df: pd.DataFrame, image_col: str) -> pd.DataFrame:
    """One row per image: `caption` is the first caption, `captions` holds them all (retrieval)."""
    grouped = df.groupby(image_col, sort=False)
    out = grouped.first().reset_index()
    out["captions"] = grouped["caption"].agg(list).values
    return out


def _check_one_row_per(value: str) -> None:
    if value not in ("caption", "image"):
        raise DataprepError(f"one_row_per must be 'caption' or 'image', not {value!r}")


def read_coco(path: str, image_root: str = "", use_url: bool = False, one_row_per: str = "caption") -> ReadResult:
    """COCO captions JSON (`captions_train2017.json`): images + annotations."""
    _check_one_row_per(one_row_per)
    with _open_text(path) as f:
        data = json.load(f)
    images = {img["id"]: img for img in data["images"]}
    rows, rejected = [], Counter()
    for ann in data["annotations"]:
        img = images.get(ann["image_id"])
        if img is None:
            rejected["caption of unknown image"] += 1
            continue
        row = {"image_id": ann["image_id"], "caption": ann["caption"], "key": str(ann["id"])}
        if use_url:
            row["url"] = img["coco_url"]
        else:
            row["path"] = str(Path(image_root) / img["file_name"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if one_row_per == "image" and len(df):
        df = _group_per_image(df, "image_id")
        df["key"] = df["image_id"].astype(str)
    return ReadResult(df, len(data["annotations"]), rejected)


def read_karpathy(path: str, image_root: str = "", splits: list[str] | None = None,
                  one_row_per: str = "image") -> ReadResult:
    """Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`) used for retrieval."""
    _check_one_row_per(one_row_per)
    with _open_text(path) as f:
        data = json.load(f)
    rows, rejected = [], Counter()
    n_read = 0
    for img in data["images"]:
        if splits and img.get("split") not in splits:
            continue
        image_id = str(img.get("cocoid", img.get("imgid")))
        image_path = str(Path(image_root, img.get("filepath", ""), img["filename"]))
        for j, sent in enumerate(img.get("sentences", [])):
            n_read += 1
            rows.append({"image_id": image_id, "split": img.get("split"), "path": image_path,
                         "caption": sent.get("raw", " ".join(sent.get("tokens", []))),
                         "key": f"{image_id}_{j}"})
    df = pd.DataFrame(rows)
    if one_row_per == "image" and len(df):
        df = _group_per_image(df, "image_id")
        df["key"] = df["image_id"]
    return ReadResult(df, n_read, rejected)


def _vg_image_path(image_root: str, image_id: int) -> str:
    """VG images ship in two folders (VG_100K, VG_100K_2); take the one that holds the file."""
    root = Path(image_root)
    for sub in ("", "VG_100K", "VG_100K_2"):
        candidate = root / sub / f"{image_id}.jpg"
        if candidate.exists():
            return str(candidate)
    return str(root / f"{image_id}.jpg")


def read_vg(path: str, image_root: str = "", one_row_per: str = "caption",
            max_per_image: int | None = None) -> ReadResult:
    """Visual Genome `region_descriptions.json`: region phrases used as captions of the whole image.

    As in ALBEF-style pre-training, each distinct phrase of an image is one image-level caption.
    """
    _check_one_row_per(one_row_per)
    with _open_text(path) as f:
        data = json.load(f)
    rows, rejected, n_read = [], Counter(), 0
    for entry in data:
        image_id = entry.get("id", entry.get("image_id"))
        seen: set[str] = set()
        for region in entry.get("regions", []):
            n_read += 1
            phrase = " ".join(str(region.get("phrase", "")).split())
            if not phrase:
                rejected["empty caption"] += 1
                continue
            if phrase.lower() in seen:
                rejected["duplicate phrase in image"] += 1
                continue
            if max_per_image is not None and len(seen) >= max_per_image:
                rejected["over max_per_image"] += 1
                continue
            seen.add(phrase.lower())
            rows.append({"image_id": image_id, "caption": phrase, "key": str(region["region_id"]),
                         "path": _vg_image_path(image_root, image_id)})
    df = pd.DataFrame(rows)
    if one_row_per == "image" and len(df):
        df = _group_per_image(df, "image_id")
        df["key"] = df["image_id"].astype(str)
    return ReadResult(df, n_read, rejected)


_ISO_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


def parse_iso_duration(text: str) -> float | None:
    """WebVid's `PT00H00M17S` -> 17.0; None where it does not parse."""
    m = _ISO_DURATION.match(str(text).strip())
    if not m or not any(m.groups()):
        return None
    h, mnt, s = m.groups()
    return int(h or 0) * 3600 + int(mnt or 0) * 60 + float(s or 0)


def read_webvid(path: str) -> ReadResult:
    """WebVid `results_*.csv`: videoid,name,page_idx,page_dir,duration,contentUrl (quoted CSV)."""
    with _open_text(path) as f:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
    needed = {"videoid", "name", "contentUrl"}
    if not needed <= set(df.columns):
        raise DataprepError(f"{path}: WebVid columns {sorted(needed)} expected, found {list(df.columns)}")
    df = df.rename(columns={"contentUrl": "url", "name": "caption"})
    df["key"] = df["videoid"]
    if "duration" in df.columns:
        df["duration_s"] = df["duration"].map(parse_iso_duration)
    return ReadResult(df, len(df))


def read_msrvtt(path: str, video_root: str = "videos", ext: str = ".mp4") -> ReadResult:
    """MSR-VTT JSFusion CSV (`key;vid_key;video_id;sentence`); videos come from a local folder."""
    lines = _lines(path)
    header = lines[0].split(";") if lines else []
    if header != ["key", "vid_key", "video_id", "sentence"]:
        raise DataprepError(f"{path}: expected header key;vid_key;video_id;sentence, found {header}")
    rows, rejected = [], Counter()
    for line in lines[1:]:
        parts = line.split(";", 3)  # the sentence is last, so a ';' inside it stays in it
        if len(parts) != 4:
            rejected["malformed row"] += 1
            continue
        key, vid_key, video_id, sentence = parts
        rows.append({"key": key, "vid_key": vid_key, "video_id": video_id, "caption": sentence,
                     "path": str(Path(video_root) / f"{video_id}{ext}")})
    return ReadResult(pd.DataFrame(rows), len(lines) - 1, rejected)


def read_generic(path: str, url_col: str = "url", path_col: str = "path", caption_col: str = "caption",
                 key_col: str | None = None, sep: str | None = None) -> ReadResult:
    """Any CSV/TSV/JSONL/JSON/parquet table with a `url` or `path` column and a caption column."""
    suffixes = "".join(Path(path).suffixes[-2:]).lower()
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise DataprepError(f"annotation file not found: {path}")
    with fs.open(p, "rb") as f:
        if ".parquet" in suffixes:
            df = pd.read_parquet(f)
        elif ".jsonl" in suffixes:
            df = pd.read_json(f, lines=True, dtype=False)
        elif ".json" in suffixes:
            df = pd.read_json(f, dtype=False)
        else:
            delim = sep or ("\t" if ".tsv" in suffixes else ",")
            df = pd.read_csv(f, sep=delim, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    if caption_col not in df.columns:
        raise DataprepError(f"{path}: no caption column {caption_col!r} in {list(df.columns)}")
    if url_col not in df.columns and path_col not in df.columns:
        raise DataprepError(f"{path}: needs a {url_col!r} or {path_col!r} column, found {list(df.columns)}")
    if key_col:
        df["key"] = df[key_col].astype(str)
    elif "key" not in df.columns:
        df["key"] = _index_keys(len(df))
    df = df.rename(columns={caption_col: "caption", url_col: "url", path_col: "path"})
    return ReadResult(df, len(df))


READERS: dict[str, Callable[..., ReadResult]] = {
    "cc3m": read_cc3m,
    "cc12m": read_cc12m,
    "sbu": read_sbu,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "vg": read_vg,
    "webvid": read_webvid,
    "msrvtt": read_msrvtt,
    "generic": read_generic,
}


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def normalise(result: ReadResult, source: str, url_template: str | None = None,
              path_template: str | None = None) -> tuple[pd.DataFrame, Counter]:
    """Checks common to every corpus; returns the kept rows and all rejections by reason.

    `url_template` / `path_template` (e.g. "http://mirror/{videoid}.mp4") rebuild the location
    from a row's columns: dataset sites change or vanish, the annotations stay.
    """
    df = result.df.copy()
    rejected = Counter(result.rejected)
    if len(df) == 0:
        return pd.DataFrame(columns=["key", "caption", "source"]), rejected
    rows = df.to_dict("records")
    if url_template:
        df["url"] = [url_template.format(**r) for r in rows]
    if path_template:
        df["path"] = [path_template.format(**r) for r in rows]
    loc = "url" if "url" in df.columns else "path"
    keep = []
    captions = []
    for loc_value, caption in zip(df[loc].tolist(), df["caption"].tolist()):
        caption = "" if _is_missing(caption) else " ".join(str(caption).split())
        captions.append(caption)
        if _is_missing(loc_value):
            reason = f"missing {loc}"
        elif loc == "url" and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://\S+$", str(loc_value).strip()):
            reason = "invalid url"
        elif not caption:
            reason = "empty caption"
        else:
            reason = None
        if reason:
            rejected[reason] += 1
        keep.append(reason is None)
    df["caption"] = captions
    if "captions" in df.columns:  # the per-image caption lists get the same clean-up
        df["captions"] = [[" ".join(str(c).split()) for c in cs if not _is_missing(c)] for cs in df["captions"]]
    df = df[keep].copy()
    df[loc] = df[loc].astype(str).str.strip()
    df["key"] = df["key"].astype(str)
    dup = df["key"].duplicated()
    if dup.any():
        rejected["duplicate key"] += int(dup.sum())
        df = df[~dup]
    df["source"] = source
    extras = [c for c in df.columns if c not in (loc, "caption", "key", "source")]
    df = df.rename(columns={c: f"src_{c}" for c in extras if c in RESERVED_COLUMNS})
    first = [loc, "caption", "key", "source"]
    df = df[first + [c for c in df.columns if c not in first]]
    return df.reset_index(drop=True), rejected


def read_corpus(fmt: str, path: str, source: str, options: dict | None = None,
                url_template: str | None = None, path_template: str | None = None):
    """Read and normalise one corpus's annotations; returns (table, report)."""
    if fmt not in READERS:
        raise DataprepError(f"unknown format {fmt!r}; known: {', '.join(sorted(READERS))}")
    try:
        result = READERS[fmt](path, **(options or {}))
    except TypeError as err:
        raise DataprepError(f"reader {fmt!r}: bad option ({err})") from err
    df, rejected = normalise(result, source, url_template, path_template)
    report = {
        "format": fmt,
        "input": str(path),
        "rows_read": int(result.rows_read),
        "rows_kept": int(len(df)),
        "rejected": dict(sorted(rejected.items())),
    }
    return df, report
