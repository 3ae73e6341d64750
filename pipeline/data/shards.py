"""Sources, their sample counts, and resumable streams of raw samples read out of tar shards.

A source's shards are read one by one with webdataset's `gopen` (local paths, file:, http(s),
`pipe:` commands, ...) and its tar iterator; members are grouped into samples by key here, shard by
shard, so a truncated tar costs one sample or one shard's rest, never the run. A key read a second
time at another place of the same source (later in the tar, in another shard) is a duplicate
(`SeenKeys`, per source and reader). Every such loss is counted once per item and reason (`Skips`)
and logged.

A stream walks a sequence of shard segments (a pass) in blocks of `block` consecutive samples; each
block is shuffled with a seed of its own. Its position is a cursor (pass, block, offset), so a
stream can restart exactly where an earlier one stopped, without re-reading what came before.
"""
from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import random
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline.data.schedule import derive_seed

log = logging.getLogger("pipeline.data")


class DataError(RuntimeError):
    """The data cannot feed a run: no sample counts, no shards, or a source with no usable sample."""


@dataclass
class Source:
    name: str
    modality: str  # "image" or "video"
    weight: float
    urls: list[str]
    counts: list[int]  # usable samples per shard, as declared by sizes.json / _stats.json / num_samples
    # Positions of the samples a shard stores but that are not usable (dataprep's invalid.json), sorted.
    # The counts size the epoch; reading walks stored positions, so every usable sample is reached.
    invalid: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        self.invalid = self.invalid or [[] for _ in self.urls]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def stored(self, i: int) -> int:
        """Samples stored in shard i, usable or not."""
        return self.counts[i] + len(self.invalid[i])

    def stored_span(self, i: int, first: int, n: int) -> tuple[int, int]:
        """Usable samples first .. first + n of shard i as (first stored position, number of positions):
        the invalid samples among them (and those before the first or after the last usable sample,
        where the span starts or ends the shard) are read with them."""
        bad = self.invalid[i]
        at = lambda k: k + bisect.bisect_right([p - j for j, p in enumerate(bad)], k)  # noqa: E731
        start = 0 if first == 0 else at(first)
        end = self.stored(i) if first + n >= self.counts[i] else at(first + n)
        return start, end - start


# ---- shard lists and sample counts ----

def expand_shards(pattern: str) -> list[str]:
    """Brace pattern(s) (`a/{00000..00009}.tar`, `::`-separated lists, URLs, pipes), a local folder, or
    local globs (`a/*.tar`, `a/0000?.tar`, `a/0000[0-4].tar`: sorted; one that matches nothing is an
    error; a file whose name holds such characters is taken as it is)."""
    if os.path.isdir(pattern):
        return sorted(str(p) for p in Path(pattern).glob("*.tar"))
    return [url for part in expand_urls(pattern) for url in _glob(part)]


def _glob(url: str) -> list[str]:
    # Only local paths: in a URL `?` starts the query, and pipes are commands.
    if not (_is_local(url) and any(c in url for c in "*?[")) or os.path.exists(_local_path(url)):
        return [url]
    found = sorted(glob.glob(_local_path(url)))
    if not found:
        raise DataError(f"shard pattern '{url}' matches no file")
    return found


def missing_shards(urls: list[str]) -> list[str]:
    """The local shards among `urls` that do not exist (remote ones are not checked)."""
    return [u for u in urls if _is_local(u) and not os.path.exists(_local_path(u))]


def missing_message(what: str, urls: list[str], missing: list[str]) -> str:
    shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
    return f"{len(missing)} of {len(urls)} shards of {what} do not exist: {shown}"


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _read_json_near(url: str, name: str):
    """JSON file `name` in the shard's folder (local or http[s]); None when absent or unreachable."""
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    target = f"{folder}/{name}"
    try:
        if _is_local(url):
            path = _local_path(target)
            return json.loads(Path(path).read_text()) if os.path.exists(path) else None
        if urlparse(url).scheme in ("http", "https"):
            with urllib.request.urlopen(target, timeout=10) as f:
                return json.loads(f.read())
    except (OSError, ValueError) as err:
        log.warning("cannot read %s: %s", target, err)
    return None


def _stats_count(url: str):
    """img2dataset's `<shard>_stats.json` beside a local shard: its "successes"."""
    if not _is_local(url):
        return None
    stats = _read_json_near(url, url.rsplit("/", 1)[-1].rsplit(".", 1)[0] + "_stats.json")
    return stats.get("successes") if isinstance(stats, dict) else None


def resolve_source(name: str, modality: str, weight: float, pattern: str, num_samples: int = 0) -> Source:
    """Expand a source's shards and find how many samples each holds.

    Per-shard counts come from the folder's sizes.json (dataprep's index: shards it leaves out are
    flagged broken and are skipped; its invalid.json lists where indexed shards store samples that do
    not decode), else each shard's _stats.json. An explicit `num_samples` is the source's size; it is
    spread evenly over the shards when their own counts are missing or disagree.

    Local shards that do not exist are an error when none exists or one of them has no count of its
    own (a wrong pattern); listed in sizes.json they are only warned about and read as unreadable, so
    that every rank keeps the same layout whatever its view of the file system.
    """
    urls = expand_shards(pattern)
    if not urls:
        raise DataError(f"source {name}: '{pattern}' names no shards")
    missing = missing_shards(urls)
    if len(missing) == len(urls):
        raise DataError(missing_message(f"source '{name}'", urls, missing))
    kept, counts, invalid, excluded, unknown = _indexed_counts(urls)
    _check_listed(name, pattern, urls, missing, kept, excluded, unknown)
    if num_samples > 0 and (unknown or sum(counts) != num_samples):
        if not unknown:
            log.warning("source %s: num_samples=%d but the shards' counts total %d; using %d",
                        name, num_samples, sum(counts), num_samples)
        q, r = divmod(num_samples, len(kept))  # spread: the positions of the shards' own layout no longer apply
        counts, invalid = [q + (i < r) for i in range(len(kept))], [[] for _ in kept]
    elif unknown and num_samples <= 0:
        raise DataError(f"source {name}: no sample count for {unknown[0]} ({len(unknown)} shard(s) without one): "
                        "write sizes.json (dataprep validate), keep img2dataset's *_stats.json beside the "
                        "shards, or set num_samples for the source")
    if sum(counts) == 0:
        raise DataError(f"source {name}: its shards hold no samples")
    shards = [(u, c, bad) for u, c, bad in zip(kept, counts, invalid) if c > 0]  # empty shards hold nothing to read
    return Source(name, modality, weight, [u for u, _, _ in shards], [c for _, c, _ in shards],
                  [bad for _, _, bad in shards])


def _indexed_counts(urls: list[str]):
    """(kept urls, their counts (None: unknown), their invalid positions, urls sizes.json leaves out,
    urls without a count) from each folder's sizes.json and invalid.json, else each shard's _stats.json."""
    sizes, bad_at, kept, counts, invalid, excluded, unknown = {}, {}, [], [], [], [], []
    for url in urls:
        folder, base = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in sizes:
            sizes[folder] = _read_json_near(url, "sizes.json")
            bad_at[folder] = _read_json_near(url, INVALID_INDEX) if isinstance(sizes[folder], dict) else None
        index = sizes[folder]
        if isinstance(index, dict) and base not in index:
            excluded.append(url)
            continue
        count = _count(index[base], f"{folder}/sizes.json", base) if isinstance(index, dict) else _stats_count(url)
        if count is None:
            unknown.append(url)
        kept.append(url)
        counts.append(count)
        invalid.append(_invalid_positions(bad_at[folder], f"{folder}/{INVALID_INDEX}", base))
    return kept, counts, invalid, excluded, unknown


def _check_listed(name: str, pattern: str, urls, missing, kept, excluded, unknown) -> None:
    """A missing shard without a count of its own is a wrong pattern (an error); one that sizes.json
    lists is read as unreadable (warned), so that every rank keeps the same layout."""
    gone = set(missing)
    if gone & set(unknown):
        raise DataError(missing_message(f"source '{name}'", urls, missing))
    if gone & set(kept):
        log.warning("%s (sizes.json lists them: skipped as unreadable)",
                    missing_message(f"source '{name}'", urls, [u for u in missing if u in gone & set(kept)]))
    if excluded:
        log.warning("source %s: %d shard(s) not listed in sizes.json are skipped (e.g. %s)%s",
                    name, len(excluded), excluded[0],
                    f", {len(gone & set(excluded))} of which do not exist" if gone & set(excluded) else "")
    if not kept:
        raise DataError(f"source {name}: none of the {len(urls)} shards of '{pattern}' is listed in sizes.json")


INVALID_INDEX = "invalid.json"  # {"00000.tar": [positions of stored samples that do not decode], ...}


def _count(value, where: str, shard: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: shard {shard} has count {value!r}; sample counts must be integers >= 0 "
                        "(rewrite the index: python -m dataprep validate)")
    return value


def _invalid_positions(index, where: str, shard: str) -> list[int]:
    if not isinstance(index, dict) or shard not in index:
        return []
    positions = index[shard]
    if not isinstance(positions, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0
                                                  for p in positions):
        raise DataError(f"{where}: shard {shard}: expected a list of sample positions (integers >= 0)")
    return sorted(set(positions))


# ---- skipped-sample accounting ----

class Skips:
    """Counts lost samples per reason and logs them (every one up to `log_limit` per reason).

    An `item` (a sample's (url, index), a shard's url) is counted once per reason: a refill or a
    resampled shard reads bad items again, and the counters report items, not reads. The items
    counted since the last `drain_items()` let a rank drop those another of its readers counted.
    """

    def __init__(self, where: str = "", log_limit: int = 20):
        self.where, self.log_limit = where, log_limit
        self.pending: Counter = Counter()
        self._logged: Counter = Counter()
        self._counted: set = set()  # (reason, item): bad items are few, so is this set
        self._new_items: list = []

    def add(self, reason: str, detail: str, n: int = 1, item=None) -> bool:
        """Count and log a skip; False (neither counted nor logged) when `item` was counted before."""
        if item is not None:
            if (reason, item) in self._counted:
                log.debug("skipped (%s) again: %s", reason, detail)
                return False
            self._counted.add((reason, item))
            self._new_items.append((reason, item))
        self.pending[reason] += n
        self._logged[reason] += 1
        if self._logged[reason] <= self.log_limit:
            log.warning("skipped (%s) %s%s", reason, detail, f" [{self.where}]" if self.where else "")
            if self._logged[reason] == self.log_limit:
                log.warning("further '%s' skips%s are only counted", reason,
                            f" in {self.where}" if self.where else "")

    def drain(self) -> dict:
        out = dict(self.pending)
        self.pending.clear()
        return out

    def drain_items(self) -> list:
        out, self._new_items = self._new_items, []
        return out


def count_distinct(counts: dict, items: list, seen: set) -> dict:
    """`counts` less the `items` (reason, item) already in `seen`: counted by another reader of the rank."""
    out = Counter(counts)
    for reason, item in items:
        key = (reason, item if isinstance(item, str) else tuple(item))  # older torch pins tuples into lists
        if key in seen:
            out[reason] -= 1
        else:
            seen.add(key)
    return {k: v for k, v in out.items() if v > 0}


# ---- reading shards ----

@dataclass
class RawSample:
    key: str
    url: str
    files: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    problem: str = ""  # a reason to skip it, found while reading
    index: int = -1  # its position in the shard (-1: not read from a shard)
    note: str = ""  # more on the problem, for the log

    @property
    def item(self) -> tuple[str, int]:
        return (self.url, self.index)

    def label(self) -> str:
        """`<url> #<index> key <key>` (+ the note), for logs."""
        at = f" #{self.index}" if self.index >= 0 else ""
        return f"{self.url}{at} key {self.key}" + (f" ({self.note})" if self.note else "")


class SeenKeys:
    """Where each key of one source was first read by one reader; the key read at another place
    (later in the tar, in another shard) is a duplicate. Reading the same place again (a refill, a
    resampled shard) is not. Memory: a short key string and its place per sample read, ~150 bytes.
    """

    def __init__(self):
        self._first: dict[str, tuple[str, int]] = {}

    def check(self, s: RawSample) -> None:
        first = self._first.setdefault(s.key, s.item)
        if first != s.item and not s.problem:
            s.problem, s.note = "duplicate_key", f"key already read at {first[0]} #{first[1]}"


def _group(url: str, members) -> Iterator[RawSample]:
    """Tar members -> samples: consecutive files sharing a key (webdataset's naming rule)."""
    current = None
    for member in members:
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = RawSample(key, url)
        if ext.lower() in current.files:
            current.problem = "duplicate_key"  # the same file twice under one key
        current.files[ext.lower()] = member["data"]
    if current is not None:
        yield current


def read_shard(url: str, skips: Skips, skip: int = 0, limit: int | None = None) -> Iterator[RawSample]:
    """Samples `skip` .. `skip + limit` of one shard.

    An unreadable shard or a truncated tar ends the shard there (counted once; the sample being read
    is lost with it: a sample is complete only once the next key or the clean end is seen). A shard
    that ends cleanly before `skip + limit` samples is counted as short.
    """
    end = None if limit is None else skip + limit
    index, stream = 0, None
    try:
        stream = gopen(url, "rb")
        for sample in _group(url, tar_file_iterator(stream)):
            if end is not None and index >= end:
                break
            if index >= skip:
                sample.index = index
                yield sample
            index += 1
    except Exception as err:  # noqa: BLE001 - any reader failure costs this shard only
        reason = "unreadable_shard" if stream is None else "empty_shard" if index == 0 and "empty file" in str(err) \
            else "truncated_tar"
        skips.add(reason, f"{url} after {index} samples: {err}", item=url)
        return
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a pipe stopped early may complain on close
                pass
    if end is not None and index < end:
        skips.add("short_shard", f"{url}: {index} samples, {end} declared", item=url)


# ---- resumable streams ----

Segment = tuple[str, int, int]  # (url, first sample in the shard, number of samples)


def ranges_to_segments(urls: list, counts: list[int], start: int, length: int) -> list[Segment]:
    """The global sample range [start, start+length) of shards laid end to end, as per-shard segments
    (url or any other name of the shard, first sample in it, number of samples)."""
    out, offset = [], 0
    for url, n in zip(urls, counts):
        lo, hi = max(start, offset), min(start + length, offset + n)
        if lo < hi:
            out.append((url, lo - offset, hi - lo))
        offset += n
    return out


class SampleStream:
    """Raw samples of one source for one reader (rank x worker slot), in shuffled blocks.

    `passes(p)` gives pass p's segments (finite, or endless for resampling). Iterating yields
    (sample, cursor) where the cursor marks the position just after that sample. `mark_good()` is
    called by the consumer for each sample it could use; if every shard of the source has been read
    to its end since the last good sample, the source is unusable and the stream raises.
    """

    def __init__(self, source: Source, passes: Callable[[int], Iterator[Segment]], block: int,
                 seed_parts: tuple, skips: Skips, cursor=(0, 0, 0)):
        self.source, self.passes, self.block = source, passes, block
        self.seed_parts, self.skips, self.cursor = seed_parts, skips, tuple(cursor)
        self._dead: set[str] = set()  # shards read to their end since the last good sample
        self._keys = SeenKeys()  # this reader's keys of the source, from its (resumed) start on
        self._counts = {url: source.stored(i) for i, url in enumerate(source.urls)}  # positions per shard

    def mark_good(self) -> None:
        self._dead.clear()

    def _positions(self, segments: Iterator[Segment], begin: int):
        """(position in the pass, sample) from position `begin` on; segments before it are not opened.

        After each segment comes (end position, None): every position before it has been read.
        """
        pos = 0
        for url, first, n in segments:
            if pos + n <= begin:
                pos += n
                continue
            skip = max(0, begin - pos)
            for i, s in enumerate(read_shard(url, self.skips, first + skip, n - skip)):
                self._keys.check(s)
                yield pos + skip + i, s
            if first + n == self._counts[url]:
                self._dead.add(url)
            pos += n
            yield pos, None

    def __iter__(self) -> Iterator[tuple[RawSample, tuple[int, int, int]]]:
        p, b, o = self.cursor
        while True:
            items, block_of = [], b
            for pos, sample in self._positions(self.passes(p), b * self.block):
                if sample is None:  # a segment ended; the block may be complete even if shards were short
                    if pos // self.block > block_of:
                        yield from self._emit(p, block_of, items, o)
                        items, block_of, o = [], pos // self.block, 0
                    elif not items:
                        self._check_alive()
                    continue
                if pos // self.block != block_of:
                    yield from self._emit(p, block_of, items, o)
                    items, block_of, o = [], pos // self.block, 0
                items.append(sample)
            yield from self._emit(p, block_of, items, o)
            p, b, o = p + 1, 0, 0

    def _emit(self, p: int, block: int, items: list, offset: int):
        random.Random(derive_seed(*self.seed_parts, p, block)).shuffle(items)
        for j in range(offset, len(items)):
            yield items[j], (p, block, j + 1)
        self._check_alive()

    def _check_alive(self) -> None:
        """Called when every sample read so far has been handed out (and judged by the consumer)."""
        if len(self._dead) >= len(self._counts):
            raise DataError(f"source {self.source.name}: no usable sample in any of its "
                            f"{len(self._counts)} shards (see the skip counts)")
