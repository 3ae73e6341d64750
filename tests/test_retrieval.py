"""Retrieval metrics on hand-made matrices, chance level of an untrained model, ITM re-ranking, 2 ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train_fixtures import free_port

from pipeline import zeroshot
from pipeline.config import load_config
from pipeline.data import train_tokenizer
from pipeline.model import build_model


def test_recall_at_k_on_a_hand_made_matrix_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    txt2img = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([
        [0.1, 0.9, 0.8, 0.0, 0.2],  # image 0: best text 1 (own) -> hit@1
        [0.7, 0.1, 0.2, 0.6, 0.0],  # image 1: texts 0 (no), 3 (own) -> hit@2
        [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: own text 4 ranked last -> hit@5 only
    ])
    m = zeroshot.recall_at_k(sim, sim.t(), txt2img, ks=(1, 2, 5))
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r2"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)
    # Text -> image, columns: t0 best image 1 (miss, own 0 second), t1 image 0 (hit), t2 image 0 (miss;
    # own 1 is third), t3 image 1 (hit), t4 image 0 (miss; own 2 is third).
    assert m["t2i_r1"] == pytest.approx(40.0)
    assert m["t2i_r2"] == pytest.approx(60.0)
    assert m["t2i_r5"] == pytest.approx(100.0)
    assert m["r_mean"] == pytest.approx(sum(m[k] for k in m if k != "r_mean") / 6)


def test_chance_recall_formula():
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    c = zeroshot.chance_recall(txt2img, 3, ks=(1, 2))
    assert c["t2i_r1"] == pytest.approx(100 / 3) and c["t2i_r2"] == pytest.approx(200 / 3)
    assert c["i2t_r1"] == pytest.approx(100 * 2 / 6)
    assert c["i2t_r2"] == pytest.approx(100 * (1 - 6 / 15))  # 1 - C(4,2)/C(6,2)


def test_rerank_changes_order_only_within_top_k():
    torch.manual_seed(0)
    sim = torch.randn(6, 20)
    k = 4
    out = zeroshot.rerank(sim, k, lambda r, cols: torch.randn(len(cols)))
    for r in range(6):
        before, after = sim[r].argsort(descending=True), out[r].argsort(descending=True)
        assert set(before[:k].tolist()) == set(after[:k].tolist())
        assert before[k:].tolist() == after[k:].tolist()
    assert not torch.equal(sim.argsort(1, descending=True)[:, :k], out.argsort(1, descending=True)[:, :k])
    assert torch.equal(zeroshot.rerank(sim, 0, None), sim)


def _random_eval_set(n, frames=1, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "left", "right", "moving", "a", "the", "big", "small"]
    samples = []
    for i in range(n):
        caps = [" ".join(words[j] for j in torch.randint(len(words), (6,), generator=g)) for _ in range(2)]
        samples.append((f"{i:05d}", torch.randn(frames, 3, size, size, generator=g), caps))
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_config("tiny", ["eval.batch_size=16", "eval.itm_rerank_k=3"])
    tok = train_tokenizer(["red green blue circle square left right moving a the big small"] * 4,
                          tmp_path_factory.mktemp("tok"), vocab_size=300)
    return cfg, tok


def test_untrained_model_scores_at_chance(tiny):
    cfg, tok = tiny
    torch.manual_seed(0)
    model = build_model(cfg)
    samples = _random_eval_set(150)
    m = zeroshot.evaluate_retrieval(model, samples, tok, cfg, rerank_k=0)
    assert m["n_items"] == 150 and m["n_captions"] == 300
    # Random images and captions carry no signal: R@10 within ~4 standard deviations of chance.
    for d, n in (("t2i", 300), ("i2t", 150)):
        p = m[f"chance_{d}_r10"] / 100
        sd = 100 * (p * (1 - p) / n) ** 0.5
        assert abs(m[f"itc_{d}_r10"] - m[f"chance_{d}_r10"]) < 4 * sd + 1.0, m
    assert model.training  # restored


def _dist_eval(rank, port, cfg, tok, samples, state, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = build_model(cfg)
    model.load_state_dict(state)
    out[rank] = zeroshot.evaluate_retrieval(model, samples, tok, cfg)
    dist.destroy_process_group()


def test_distributed_evaluation_equals_single_rank(tiny):
    cfg, tok = tiny
    torch.manual_seed(1)
    model = build_model(cfg)
    samples = _random_eval_set(13, frames=2, seed=1)  # odd count: ranks get unequal shares
    single = zeroshot.evaluate_retrieval(model, samples, tok, cfg)
    assert "itm_r_mean" in single
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(_dist_eval, args=(port, cfg, tok, samples, model.state_dict(), out), nprocs=2)
    for rank in (0, 1):
        assert out[rank].keys() == single.keys()
        for k, v in single.items():
            assert out[rank][k] == pytest.approx(v, abs=1e-6), k


def test_real_coco_bookkeeping(tiny, shared_data):
    """Real COCO images with 5 human captions each: ids, counts and chance level on real data."""
    import json

    cfg, tok = tiny
    ann = shared_data / "coco_239" / "captions.jsonl"
    rows = [json.loads(line) for line in ann.read_text().splitlines()][:40]
    samples = list(zeroshot.load_eval_set(str(ann), "image", cfg, num_samples=40))
    assert [k for k, _, _ in samples] == [f"{r['coco_id']:012d}" for r in rows]
    assert [c for _, _, c in samples] == [[c.strip() for c in r["captions"]] for r in rows]
    assert all(p.shape == (1, 3, 32, 32) for _, p, _ in samples)
    torch.manual_seed(0)
    m = zeroshot.evaluate_retrieval(build_model(cfg), samples, tok, cfg, rerank_k=0)
    n_caps = sum(len(r["captions"]) for r in rows)
    assert (m["n_items"], m["n_captions"]) == (40, n_caps)
    assert m["chance_t2i_r1"] == pytest.approx(100 / 40)
    assert m["chance_i2t_r1"] == pytest.approx(100 * 5 / n_caps * 1.0, rel=0.05)  # 5 of n_caps are hits
    assert 0 <= m["itc_r_mean"] <= 100


def test_skipped_eval_items_are_reported_with_the_score(tiny, tmp_path):
    import io
    import json

    from PIL import Image
    from webdataset import TarWriter

    cfg, tok = tiny
    with TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (40 * i, 200 - 30 * i, 90)).save(buf, "JPEG")
            jpg = b"<html>not an image</html>" if i == 2 else buf.getvalue()
            sink.write({"__key__": f"{i:05d}", "jpg": jpg, "txt": "a red circle"})
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6}))
    samples = zeroshot.load_eval_set(str(tmp_path / "00000.tar"), "image", cfg)
    torch.manual_seed(0)
    m = zeroshot.evaluate_retrieval(build_model(cfg), samples, tok, cfg)
    assert m["n_items"] == 5 and sum(v for k, v in m.items() if k.startswith("skipped/")) == 1, m
    reason = next(k for k in m if k.startswith("skipped/")).split("/", 1)[1]
    assert f"; skipped: {reason} 1" in zeroshot.format_metrics(m)
