"""The GPU check's figures as a RESULTS.md section, drawn from its output folder (not by hand).

    bash bench/gpu_check.sh OUT            # on the GPU machine
    python bench/gpu_report.py OUT --write bench/RESULTS.md

Takes the machine from OUT/device.txt and, from each step's log, the tables it printed (lines that
start with `|`, with the heading above them) and its `key: value` figures; a step that failed is
listed with its exit line instead.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scl import write_section  # noqa: E402

STEPS = ["mfu", "mfu_compile", "zero_memory", "sdpa_images", "sdpa_videos", "loader", "accum"]
FIGURE = re.compile(r"^[a-z_0-9]+: [-0-9.e+]+$")


def tables(log: str) -> list[str]:
    """Each markdown table (a run of `|` lines with a `|---` rule), with the `#` heading just above it."""
    lines, out, i = log.splitlines(), [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if j > i and any(line.startswith("|--") for line in lines[i:j]):
            above = next((lines[k] for k in range(i - 1, max(i - 3, -1), -1) if lines[k].strip()), "")
            head = [above.lstrip("# ").strip(), ""] if above.startswith("#") else []
            out.append("\n".join(head + lines[i:j]))
        i = max(j, i + 1)
    return out


def last_block(log: str, most: int = 15) -> list[str]:
    """The JSON lines a step printed, else its last paragraph (plain-text tables)."""
    lines = log.rstrip().splitlines()
    found = [line for line in lines if line.startswith("{")]
    if found:
        return found
    start = max((i + 1 for i, line in enumerate(lines) if not line.strip()), default=0)
    return lines[start:][-most:]


def section(out_dir: Path, label: str) -> str:
    device = (out_dir / "device.txt").read_text().strip() if (out_dir / "device.txt").exists() else "unknown"
    parts = [f"### {label}", "", "Machine: " + device.replace("\n", "; "), "",
             f"    bash bench/gpu_check.sh OUT && python bench/gpu_report.py OUT --label '{label}'"]
    for step in STEPS:
        log_path = out_dir / f"{step}.log"
        if not log_path.exists():
            continue
        log = log_path.read_text(errors="replace")
        found = tables(log)
        figures = [line for line in log.splitlines() if FIGURE.match(line)]
        parts += ["", f"**{step}**"]
        for table in found:
            parts += ["", table]
        shown = figures if figures or found else last_block(log)
        if shown:
            parts += ["", "    " + "\n    ".join(shown)]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--label", default="GPU check", help="the heading, e.g. 'H200, torch 2.14.1, CUDA 12.8'")
    ap.add_argument("--write", help="replace this section of a RESULTS.md")
    args = ap.parse_args()
    text = section(Path(args.out_dir), args.label)
    print(text)
    if args.write:
        key = re.sub(r"[^a-z0-9]+", "_", args.label.lower()).strip("_")
        write_section(Path(args.write), [key], text, name="gpu_check")


if __name__ == "__main__":
    main()
