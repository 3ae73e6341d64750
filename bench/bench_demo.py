"""The demo's figures, with and without SCL: `python -m pipeline.demo` run for each seed and arm, its
demo_results.json collected, and a table written for bench/RESULTS.md ("The demo").

    python bench/bench_demo.py [--seeds 0] [--out demo_out] [--write bench/RESULTS.md] [-- DEMO ARGS]

Each run pre-trains afresh (the corpus and tokenizer in --out are built once and reused); results
land in <out>/bench_demo/<arm>_seed<k>.json, so a rerun with --render only redraws the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scl import mean_std, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARMS = {"SCL on (the demo)": [], "SCL off (--no-scl)": ["--no-scl"]}


def run(out: Path, seeds: list[int], demo_args: list[str]) -> None:
    for seed in seeds:
        for arm, flags in ARMS.items():
            cmd = [sys.executable, "-m", "pipeline.demo", "--out", str(out), "--seed", str(seed), *flags, *demo_args]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
            run_dir = out / ("run_noscl" if flags else "run")
            shutil.copy(run_dir / "demo_results.json", results_dir(out) / f"{_slug(arm)}_seed{seed}.json")


def results_dir(out: Path) -> Path:
    path = out / "bench_demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(arm: str) -> str:
    return "noscl" if "off" in arm else "scl"


def _rows(results: list[dict]) -> dict[str, list[float]]:
    """The figures of one arm's runs, each a list over seeds."""
    rows: dict[str, list[float]] = {}
    for r in results:
        for modality, m in r["retrieval"].items():
            best = m.get("rerank", "itc") if f"{m.get('rerank')}_r_mean" in m else "itc"
            rows.setdefault(f"zero-shot {modality}-text R_mean [{best}]", []).append(m[f"{best}_r_mean"])
            rows.setdefault(f"zero-shot {modality}-text R_mean, chance", []).append(m["chance_r_mean"])
        for task, key in (("vqa", "vqa_score"), ("nlvr2", "accuracy")):
            if task in r.get("finetune", {}):
                t = r["finetune"][task]
                rows.setdefault(f"{task} val {key}", []).append(t["val"][key])
                rows.setdefault(f"{task} val {key}, chance", []).append(t["chance"])
                if task == "nlvr2":
                    rows.setdefault("nlvr2 val consistency", []).append(t["val"]["consistency"])
        rows.setdefault("minutes (whole demo)", []).append(r["minutes"])
    return rows


def render(out: Path, seeds: list[int]) -> str:
    arms = {arm: [json.loads((results_dir(out) / f"{_slug(arm)}_seed{s}.json").read_text()) for s in seeds]
            for arm in ARMS}
    tables = {arm: _rows(rs) for arm, rs in arms.items()}
    names = list(next(iter(tables.values())))
    first = next(iter(arms.values()))[0]
    steps, tuned = first["steps"], ", then VQA and NLVR2 fine-tuning" if "finetune" in first else ""
    lines = ["## The demo (`bench/bench_demo.py`)", "",
             f"`python -m pipeline.demo` ({steps} pre-training steps of the tiny model on the shapes corpus"
             f"{tuned}), seeds {', '.join(map(str, seeds))}"
             f"{', mean ± std over seeds' if len(seeds) > 1 else ' (one run per arm: no gain can be read from it)'}; "
             "2-core CPU session machine.", "",
             f"    python bench/bench_demo.py --seeds {' '.join(map(str, seeds))} --write bench/RESULTS.md", "",
             "| figure | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    cell = mean_std if len(seeds) > 1 else (lambda v: f"{v[0]:.1f}" if v else "-")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(tables[arm].get(name, [])) for arm in ARMS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--render", action="store_true", help="only redraw the table from collected results")
    ap.add_argument("--write", help="replace this benchmark's section of a RESULTS.md")
    args, demo_args = ap.parse_known_args()
    out = Path(args.out).resolve()
    if not args.render:
        run(out, args.seeds, [a for a in demo_args if a != "--"])
    text = render(out, args.seeds)
    print(text)
    if args.write:
        write_section(Path(args.write), ["demo"], text, name="bench_demo")


if __name__ == "__main__":
    main()
