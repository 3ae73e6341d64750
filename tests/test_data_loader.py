"""The training loader on real tar shards: splitting, mixing, equal steps, batch contract, resume."""
import json
from collections import Counter

import pytest
import torch

from data_fixtures import serve, tiny_config, write_shards
from pipeline.config import ConfigError, validate
from pipeline.data import DataError, build_train_loader
from pipeline.data.schedule import epoch_schedule, interleave, split_quotas
from pipeline.objectives import IGNORE_INDEX


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Images in shards of uneven sizes (40 samples) and videos (16 samples)."""
    root = tmp_path_factory.mktemp("corpus")
    keys = {"img": [], "vid": []}
    for shard, n in enumerate([7, 9, 5, 11, 8]):
        keys["img"] += write_shards(root / "img" / f"part{shard}", 1, n, prefix=f"p{shard}_", index=None)
    sizes = {}
    for shard in range(5):  # gather the shards in one folder with one sizes.json
        src = root / "img" / f"part{shard}" / "00000.tar"
        src.rename(root / "img" / f"{shard:05d}.tar")
        sizes[f"{shard:05d}.tar"] = [7, 9, 5, 11, 8][shard]
    (root / "img" / "sizes.json").write_text(json.dumps(sizes))
    keys["vid"] = write_shards(root / "vid", 2, 8, modality="video", prefix="v", index="stats")
    return root, keys


def sources(root, img_weight=1.0, vid_weight=1.0):
    return [dict(name="img", shards=str(root / "img" / "{00000..00004}.tar"), weight=img_weight),
            dict(name="vid", shards=str(root / "vid"), modality="video", weight=vid_weight)]


def run_epoch(loader):
    return [(b["step"], b["source"], b["modality"], tuple(b["pixels"].shape), list(b["keys"])) for b in loader]


def test_split_reads_every_sample_once_across_2_ranks_x_2_workers(corpus, tok):
    root, keys = corpus
    cfg = tiny_config(sources(root), sharding="split", workers=2, batch_size=4, shuffle_buffer=3)
    loaders = [build_train_loader(cfg, rank, 2, tok) for rank in range(2)]
    epochs = [run_epoch(ld) for ld in loaders]
    # 40 images and 16 videos, 8 per step over 2 ranks: 5 + 2 steps, nothing left over
    assert [ld.steps_per_epoch for ld in loaders] == [7, 7] and [len(e) for e in epochs] == [7, 7]
    read = Counter(k for e in epochs for *_, ks in e for k in ks)
    assert set(read) == set(keys["img"]) | set(keys["vid"]) and set(read.values()) == {1}
    # the same modality and shapes on both ranks at every step
    assert [e[:4] for e in epochs[0]] == [e[:4] for e in epochs[1]]
    assert [e[0] for e in epochs[0]] == list(range(7))


def test_split_reshuffles_per_epoch_and_keeps_steps_equal(corpus, tok):
    root, keys = corpus
    # 3 per step x 2 ranks: 40 // 6 = 6 image steps (4 samples wait), 16 // 6 = 2 video steps
    cfg = tiny_config(sources(root), sharding="split", workers=2, batch_size=3, mixing="sample")
    loaders = [build_train_loader(cfg, rank, 2, tok) for rank in range(2)]
    first = [run_epoch(ld) for ld in loaders]
    second = [run_epoch(ld) for ld in loaders]
    for epoch in (first, second):
        assert [len(e) for e in epoch] == [8, 8]
        read = Counter(k for e in epoch for *_, ks in e for k in ks)
        assert max(read.values()) == 1 and len(read) == 8 * 2 * 3
        assert [s[1:4] for s in epoch[0]] == [s[1:4] for s in epoch[1]]
    assert [s[4] for s in first[0]] != [s[4] for s in second[0]]  # a new order each epoch


def test_alternate_mixing_follows_weights_exactly(corpus, tok):
    root, _ = corpus
    cfg = tiny_config(sources(root, 3.0, 1.0), sharding="resample", workers=2, batch_size=1, epoch_samples=40)
    loader = build_train_loader(cfg, 0, 1, tok)
    got = [b["source"] for b in loader]
    assert Counter(got) == {"img": 30, "vid": 10}
    # evenly spread: every window of 4 consecutive steps holds exactly one video batch
    assert all(got[i:i + 4].count("vid") == 1 for i in range(0, 40, 4))


def test_sample_mixing_respects_weights_statistically(corpus, tok):
    root, _ = corpus
    cfg = tiny_config(sources(root, 3.0, 1.0), sharding="resample", mixing="sample", workers=0, batch_size=1,
                      epoch_samples=300)
    loader = build_train_loader(cfg, 0, 1, tok)
    got = [b["source"] for b in loader]
    share = got.count("img") / len(got)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 300) ** 0.5  # within 4 standard deviations
    assert got == [["img", "vid"][i] for i in loader.schedule(0)]
    # the schedule itself over many steps and epochs
    long = [s for e in range(5) for s in epoch_schedule("sample", "resample", 4000, [3.0, 1.0], [], 0, e)]
    assert abs(long.count(0) / len(long) - 0.75) < 0.01


def test_schedule_helpers():
    assert split_quotas(10, [1, 1, 1]) == [4, 3, 3] and sum(split_quotas(7, [0.2, 0.5])) == 7
    order = interleave([2, 6])
    assert Counter(order) == {0: 2, 1: 6} and order.index(0) < 4
    assert epoch_schedule("alternate", "split", 0, [1, 1], [3, 1], 0, 0) == interleave([3, 1])
    assert Counter(epoch_schedule("sample", "split", 0, [1, 1], [3, 1], 0, 1)) == {0: 3, 1: 1}


def test_resample_streams_differ_by_rank_and_are_reproducible(corpus, tok):
    root, keys = corpus
    cfg = tiny_config(sources(root), sharding="resample", workers=2, batch_size=4)
    a0, a1 = (run_epoch(build_train_loader(cfg, r, 2, tok)) for r in (0, 1))
    assert run_epoch(build_train_loader(cfg, 0, 2, tok)) == a0
    assert [s[4] for s in a0] != [s[4] for s in a1]
    assert [s[1:4] for s in a0] == [s[1:4] for s in a1]
    assert len(a0) == (40 + 16) // 8
    assert {k for s in a0 + a1 for k in s[4]} <= set(keys["img"]) | set(keys["vid"])


def test_batch_contract(corpus, tok):
    root, _ = corpus
    cfg = tiny_config(sources(root), sharding="split", workers=0, batch_size=4, image_size=32, video_size=16)
    cfg.model.vision.patch_size = 8
    loader = build_train_loader(cfg, 0, 1, tok)
    seen = set()
    for b in loader:
        video = b["modality"] == "video"
        t, size = (cfg.data.num_frames, 16) if video else (1, 32)
        assert b["pixels"].shape == (4, t, 3, size, size) and b["pixels"].dtype == torch.float32
        L = cfg.model.text.max_len
        for key in ("text_ids", "attention_mask", "mlm_ids", "mlm_labels", "scl_ids"):
            assert b[key].shape == (4, L) and b[key].dtype == torch.long
        ids, mask = b["text_ids"], b["attention_mask"]
        assert (ids[:, 0] == tok.bos_token_id).all() and (ids[mask == 0] == tok.pad_token_id).all()
        assert tok.decode(ids[0], skip_special_tokens=True).split()[0] in caption_words()
        picked = b["mlm_labels"] != IGNORE_INDEX
        assert (b["mlm_labels"][picked] == ids[picked]).all() and not picked[mask == 0].any()
        assert ((b["scl_ids"] == tok.mask_token_id).sum(1) >= 1).all()
        n_patches = (size // 8) ** 2
        keep = b["patch_keep"]
        assert keep.dtype == torch.long and keep.shape == (4, n_patches - int(0.8 * n_patches))
        assert (keep.diff(dim=1) > 0).all() and keep.max() < n_patches
        assert b["skipped"] == {}
        seen.add(b["modality"])
    assert seen == {"image", "video"}


def caption_words():
    from data_fixtures import WORDS
    return set(WORDS)


def test_masks_and_augmentation_are_seeded(corpus, tok):
    root, _ = corpus
    cfg = tiny_config(sources(root), sharding="split", workers=2, batch_size=4)
    one, two = (list(build_train_loader(cfg, 0, 1, tok)) for _ in range(2))
    for a, b in zip(one, two):
        for key in ("pixels", "mlm_ids", "mlm_labels", "scl_ids", "patch_keep"):
            assert torch.equal(a[key], b[key])
    loader = build_train_loader(cfg, 0, 1, tok)
    loader.set_epoch(1)
    other = list(loader)
    assert not all(torch.equal(a["patch_keep"], b["patch_keep"]) for a, b in zip(one, other))


@pytest.mark.parametrize("sharding", ["split", "resample"])
def test_resume_continues_from_saved_position(corpus, tok, sharding, tmp_path):
    root, _ = corpus
    # corrupt samples early in the data: saved positions must account for skipped samples too
    bad = tmp_path / "bad"
    write_shards(bad, 2, 6, media=lambda s, i: b"\xff\xd8 broken" if i in (0, 1, 3) else None, prefix="b")
    src = [sources(root)[0], dict(name="bad", shards=str(bad))]
    cfg = tiny_config(src, sharding=sharding, workers=2, batch_size=2, shuffle_buffer=4)
    full = run_epoch(build_train_loader(cfg, 0, 1, tok))
    first = build_train_loader(cfg, 0, 1, tok)
    it = iter(first)
    head = [next(it) for _ in range(9)]
    it.close()
    assert first.counters().get("corrupt_image", 0) >= 2
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    assert state["epoch"] == 0 and state["step_in_epoch"] == 9
    resumed = build_train_loader(cfg, 0, 1, tok)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert [b["step"] for b in head] + [s[0] for s in rest] == list(range(len(full)))
    assert [list(b["keys"]) for b in head] + [s[4] for s in rest] == [s[4] for s in full]
    assert resumed.epoch == 1 and resumed.step == 0
    assert resumed.counters()["corrupt_image"] >= state["skipped"]["corrupt_image"]
    # another rank's state: the saved stream positions don't apply, the step does; on another world
    # size the step keeps the share of the epoch done (elastic resume)
    same_world = build_train_loader(cfg, 0, 1, tok)
    same_world.load_state_dict(dict(state, rank=1))
    assert next(iter(same_world))["step"] == 9
    other = build_train_loader(cfg, 1, 2, tok)
    other.load_state_dict(state)
    assert other.steps_per_epoch < first.steps_per_epoch
    assert next(iter(other))["step"] == round(9 * other.steps_per_epoch / first.steps_per_epoch)


def test_counts_and_config_errors(tmp_path, tok):
    write_shards(tmp_path / "nocount", 2, 4, index=None)
    with pytest.raises(DataError, match="num_samples"):
        build_train_loader(tiny_config([dict(name="x", shards=str(tmp_path / "nocount"))]), 0, 1, tok)
    # an explicit count is enough
    cfg = tiny_config([dict(name="x", shards=str(tmp_path / "nocount"), num_samples=8)], batch_size=2)
    assert build_train_loader(cfg, 0, 1, tok).steps_per_epoch == 4
    # too few samples for one split step on every rank
    cfg = tiny_config([dict(name="x", shards=str(tmp_path / "nocount"), num_samples=8)], batch_size=8,
                      sharding="split")
    with pytest.raises(DataError, match="fewer than"):
        build_train_loader(cfg, 0, 2, tok)
    # the model's vocabulary must hold the tokenizer's
    cfg.data.batch_size, cfg.model.text.vocab_size = 2, len(tok) - 1
    with pytest.raises(ValueError, match="vocab_size"):
        build_train_loader(cfg, 0, 1, tok)
    cfg = tiny_config([dict(name="a", shards="a.tar", weight=2.0), dict(name="b", shards="b.tar")],
                      sharding="split")
    with pytest.raises(ConfigError, match="weights apply only"):
        validate(cfg)


def test_sizes_json_is_the_index(tmp_path, tok):
    keys = write_shards(tmp_path / "d", 3, 4)
    (tmp_path / "d" / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00002.tar": 4}))  # 00001 flagged
    cfg = tiny_config([dict(name="x", shards=str(tmp_path / "d" / "{00000..00002}.tar"))], batch_size=2,
                      sharding="split", workers=0)
    loader = build_train_loader(cfg, 0, 1, tok)
    got = {k for s in run_epoch(loader) for k in s[4]}
    assert loader.steps_per_epoch == 4 and got == set(keys[:4] + keys[8:])


def test_shards_over_http_and_from_a_pipe(corpus, tok):
    root, keys = corpus
    with serve(root) as base:
        # counts from sizes.json fetched beside the shards; the shards through webdataset's gopen (curl)
        cfg = tiny_config([dict(name="web", shards=f"{base}/img/{{00000..00004}}.tar")], sharding="split",
                          workers=2, batch_size=4)
        got = [k for s in run_epoch(build_train_loader(cfg, 0, 1, tok)) for k in s[4]]
    assert sorted(got) == sorted(keys["img"])
    pipe = f"pipe:cat {root / 'vid'}/{{00000..00001}}.tar"  # no index reachable: the count is explicit
    cfg = tiny_config([dict(name="p", shards=pipe, modality="video", num_samples=16)], sharding="split",
                      workers=0, batch_size=4, allow_pipe=True)
    got = [k for s in run_epoch(build_train_loader(cfg, 0, 1, tok)) for k in s[4]]
    assert sorted(got) == sorted(keys["vid"])
