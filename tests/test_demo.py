"""The README's main job, end to end in its short form:
dataprep -> shards -> DeepSpeed -> TensorBoard -> retrieval -> VQA and NLVR2 fine-tuning."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import read_scalars

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_retrieval_beside_chance(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("image-text (40 items, 40 captions)", "video-text (20 items, 20 captions)",
                   "i2t R@1", "t2i R@10", "(chance 2.5)", "(chance 5.0)", "tensorboard --logdir",
                   "== 5/5 fine-tuning", "vqa: val vqa_score", "nlvr2: val accuracy", "consistency"):
        assert needle in text, needle
    results = json.loads((out / "run" / "demo_results.json").read_text())
    assert results["scl"] is True and results["steps"] == 16
    for modality, n in (("image", 40), ("video", 20)):
        m = results["retrieval"][modality]
        assert (m["n_items"], m["n_captions"]) == (n, n)
        assert m["chance_t2i_r1"] == pytest.approx(100 / n)
        assert 0 <= m["itm_r_mean"] <= 100
    tags = set(read_scalars(out / "run"))
    assert {"loss/total", "loss/itc", "loss/itm", "loss/mlm", "loss/scl_vision", "loss/scl_text"} <= tags, tags
    assert any(t.startswith("eval/") for t in tags), tags
    # step 5: each task fine-tuned from the pre-trained run and scored on its validation split
    for task, key in (("vqa", "vqa_score"), ("nlvr2", "accuracy")):
        ft = results["finetune"][task]
        assert 0 <= ft["val"][key] <= 100 and 0 < ft["chance"] < 100, ft
        run = out / f"run_{task}"
        assert (run / "metrics.json").exists() and (run / "checkpoints" / "best.json").exists(), task
