"""The image download stage: img2dataset for URLs, the same resizer for local folders."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from dataclasses import dataclass

from .common import DataprepError, join, url_to_fs
from .fetch import fetch
from .shards import SampleResult

# img2dataset imports albumentations, which otherwise asks the network for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@dataclass
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset's: no, keep_ratio, center_crop, border, keep_ratio_largest
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    encode_quality: int = 95
    timeout: float = 10
    retries: int = 2
    max_bytes: int = 64 << 20
    allow_private_urls: bool = False


def _resizer(opts: ImageOptions):
    from img2dataset.resizer import Resizer

    return Resizer(image_size=opts.image_size, resize_mode=opts.resize_mode,
                   resize_only_if_bigger=opts.resize_only_if_bigger, min_image_size=opts.min_image_size,
                   max_aspect_ratio=opts.max_aspect_ratio, encode_quality=opts.encode_quality,
                   encode_format="jpg")


class LocalImageProcessor:
    """Local image file -> resized jpg, with img2dataset's own resizer so both paths match."""

    def __init__(self, opts: ImageOptions):
        self.opts = opts
        self._resize = None  # built in the worker process: cv2 objects do not travel well

    def __call__(self, row: dict) -> SampleResult:
        data, error = fetch(row, self.opts.timeout, self.opts.retries, self.opts.max_bytes, self.opts.allow_private_urls)
        if data is None:
            return SampleResult("failed_to_download", error_message=error)
        if self._resize is None:
            self._resize = _resizer(self.opts)
        img, width, height, original_width, original_height, error = self._resize(io.BytesIO(data))
        if error is not None:
            return SampleResult("failed_to_resize", error_message=error, bytes_downloaded=len(data))
        meta = {"width": width, "height": height, "original_width": original_width,
                "original_height": original_height}
        return SampleResult("success", {"jpg": img}, meta, bytes_downloaded=len(data))


_SHARD_JSON = re.compile(r"^\d+_stats\.json$")
# Our own files in a shard folder; img2dataset reads every *.json there as a shard's stats.
INDEX_FILES = ("sizes.json", "invalid.json", "report.json")


def clear_index(output_dir: str) -> None:
    """Remove sizes.json / report.json before new shards are written (they would be stale, and
    img2dataset's incremental mode parses every *.json in the folder as "<shard>_stats.json")."""
    fs, path = url_to_fs(output_dir)
    if not fs.exists(path):
        return
    for name in INDEX_FILES:
        if fs.exists(join(path, name)):
            fs.rm(join(path, name))
    foreign = [p.rsplit("/", 1)[-1] for p in fs.glob(join(path, "*.json"))
               if not _SHARD_JSON.match(p.rsplit("/", 1)[-1])]
    if foreign:
        raise DataprepError(f"{output_dir} holds {foreign}: img2dataset would read them as shard stats; "
                            "move them out of the shard folder")


def img2dataset_download(input_parquet: str, output_dir: str, opts: ImageOptions, extra_columns: list[str],
                         shard_size: int, processes: int, threads: int,
                         distributor: str = "multiprocessing") -> None:
    """One img2dataset call: webdataset output, incremental, our resize and retry settings.

    `distributor="pyspark"` runs its shards on the active SparkSession (dataprep/spark.py). Always
    incremental: its "overwrite" mode deletes the whole output folder, our _prep/ included;
    a fresh start removes the shard files instead (`shards.remove_shards`).
    """
    import img2dataset

    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        # Its worker processes are spawned and re-import __main__: from stdin they never start.
        raise DataprepError("img2dataset cannot start its workers from a script read on stdin; "
                            "run a script file, `python -c`, or `python -m dataprep`")
    previous = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(
            url_list=input_parquet,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extra_columns or None,
            output_folder=output_dir,
            output_format="webdataset",
            image_size=opts.image_size,
            resize_mode=opts.resize_mode,
            resize_only_if_bigger=opts.resize_only_if_bigger,
            min_image_size=opts.min_image_size,
            max_aspect_ratio=opts.max_aspect_ratio,
            encode_quality=opts.encode_quality,
            encode_format="jpg",
            processes_count=processes,
            distributor=distributor,
            thread_count=threads,
            number_sample_per_shard=shard_size,
            timeout=opts.timeout,
            retries=opts.retries,
            incremental_mode="incremental",
            extract_exif=False,
            compute_hash=None,
            enable_wandb=False,
        )
    except SystemExit as stop:
        # Its Ctrl-C handler ends the process with status 0; an interrupted download is no success.
        raise KeyboardInterrupt from stop
    finally:
        # img2dataset installs a Ctrl-C handler that exits with status 0; a later stage must not
        # inherit it and report an interrupted run as a success.
        signal.signal(signal.SIGINT, previous)
