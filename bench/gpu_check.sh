#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one go, sized for a few minutes on one GPU:
#   1. bench_mfu.py, base, bf16, ZeRO-2, batch 32: MFU, samples/s, peak memory (compile off, then on)
#   2. bench_engine.py --parts memory: ZeRO 0-3 max_memory_allocated
#   3. bench_sdpa.py: which attention kernel the vision tower and the fusion run (images, 4-frame videos)
#   4. bench_loader.py: loader samples/s per worker on this machine's cores
#   5. bench_accum.py speed, base: contrastive vs plain accumulation (step time, max_memory_allocated)
#
#   bash bench/gpu_check.sh [OUT_DIR]          # on the GPU machine (~6-8 min on an H100/H200)
#   bash bench/gpu_check.sh OUT_DIR --smoke    # the same steps, tiny and short, on a CPU
#
# Every step has its own time limit and the script goes on after a failure; each step's output is
# in OUT_DIR/<step>.log, the JSON lines are gathered in OUT_DIR/summary.jsonl, and
# bench/gpu_report.py draws OUT_DIR/report.md (the RESULTS.md section) from them.
set -u
OUT=${1:-gpu_check_out}
SMOKE=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-} NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
if [ "$SMOKE" = "--smoke" ]; then
  export DS_ACCELERATOR=cpu
  MFU="--tiny --steps 2 --warmup 1 --batch-size 4"; SDPA="--tiny --batch-size 2"; MEM="--steps 1 --batch-size 2"
  LOADER="--images 16 --videos 16 --sizes 64 --repeats 1"; LIMIT=300
  ACCUM="--accum 2 --batch-size 2 --steps 1 --order plain,cached"
else
  MFU="--steps 60 --warmup 15 --batch-size 32"; SDPA="--batch-size 8"; MEM="--steps 3 --batch-size 8"
  LOADER="--images 128 --videos 16 --sizes 224 --repeats 1"; LIMIT=150
  ACCUM="--config base --accum 4 --batch-size 16 --steps 4 --order plain,cached,large"
fi
RUN1=(python -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port $((29500 + RANDOM % 1000)))

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"
  grep -h '^{' "$OUT/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/summary.jsonl"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
}

: > "$OUT/summary.jsonl"
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
  > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step mfu           "$LIMIT" "${RUN1[@]}" bench/bench_mfu.py $MFU
if [ "$SMOKE" != "--smoke" ]; then  # inductor's CPU C++ codegen fails on this model in bf16 (torch 2.14.1)
  step mfu_compile "$((LIMIT + 60))" "${RUN1[@]}" bench/bench_mfu.py $MFU train.compile=true
fi
step zero_memory   "$LIMIT" "${RUN1[@]}" bench/bench_engine.py --parts memory $MEM
step sdpa_images   60 python bench/bench_sdpa.py $SDPA
step sdpa_videos   60 python bench/bench_sdpa.py $SDPA --frames 4
step loader        "$LIMIT" python bench/bench_loader.py $LOADER
step accum         "$LIMIT" "${RUN1[@]}" bench/bench_accum.py speed $ACCUM
python bench/gpu_report.py "$OUT" --label "$(head -n 1 "$OUT/device.txt")" > "$OUT/report.md"
echo "done: $OUT/summary.jsonl, $OUT/report.md (python bench/gpu_report.py $OUT --write bench/RESULTS.md)"
