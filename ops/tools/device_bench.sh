#!/usr/bin/env bash
# Issue 11's GPU measurements as one command, for a lent GPU machine that has torch and
# sentence-transformers but not chromadb, huey or sqlite-utils, no network, and no room
# for the model's 90 MB of weights. Prepared here:
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl <what it lacks>
#   python -m ops.tools.random_model skeleton .whl/minilm
#   cp py-spy .whl/   (optional: a profile of the writer)
# There, from the repository root, with .whl carried:
#   bash ops/tools/device_bench.sh [chunks]       # results under $OUT
# It runs the benchmark's bare loop and pipeline on the GPU (fp32, with the bare loop
# upserting indexq's records too; then with Chroma's full-text index off), compares fp16 with fp32 vectors, profiles the writer with py-spy
# if time is left, and runs the benchmark once more in fp16. Random weights: the speed is the model's, the
# search results are not.
set -u
CHUNKS=${1:-10000}
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
BUDGET=${BUDGET:-330}  # seconds after which the optional steps are skipped
started=$(date +%s)
exec > >(tee "$OUT/device.log") 2>&1

if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  # The benchmark starts `indexq` from beside the interpreter, as a user's install has it.
  bin=$($PY -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent)')
  printf '#!%s\nfrom pipeline.cli import main\nmain()\n' "$($PY -c 'import sys; print(sys.executable)')" > "$bin/indexq"
  chmod +x "$bin/indexq" || { echo "cannot write $bin/indexq"; exit 1; }
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MODEL=/tmp/minilm-random
rm -rf $MODEL && cp -r .whl/minilm $MODEL && $PY -m ops.tools.random_model weights $MODEL || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
$PY - <<EOF || exit 1
import chromadb, huey, sqlite_utils, torch
from pipeline.embedder import load_embedder
e = load_embedder("$MODEL", "auto", "fp32")
print("smoke:", chromadb.__version__, torch.__version__, e.device, e.cpu_bound, e.embed(["hello world"]).shape)
EOF

elapsed() { echo $(( $(date +%s) - started )); }
bench() {  # NAME [bench options]
  local name=$1; shift
  echo "== $name at $(elapsed) s"
  $PY -m ops.tools.bench --model $MODEL --chunks "$CHUNKS" --stages bare,pipeline --keep \
    --output "$OUT/$name.json" "$@" | grep -v ' n/a '
}
# STEPS picks and orders them: check (the GPU's queued micro-batch against embed),
# oom (a micro-batch over the GPU's memory is halved, not lost), pipeline and bare (one
# stage each), fp32, full-text-off, precision, profile, fp16.
STEPS=${STEPS:-fp32 full-text-off precision profile fp16}
for step in $STEPS; do case $step in
check)
  echo "== check at $(elapsed) s"
  $PY - <<EOF
import numpy as np
from pipeline.embedder import load_embedder
texts = [f"chunk {i}: " + "resume the bulk index where it stopped " * (i % 9 + 1) for i in range(300)]
for precision in ("fp32", "fp16"):
    e = load_embedder("$MODEL", "cuda", precision)
    queued, direct = e.start(texts)(), e.embed(texts)
    print("check", precision, e.launches, queued.shape, float(np.abs(queued - direct).max()))
EOF
  ;;
oom)
  # A GPU that has room for a quarter of a micro-batch of long texts: torch's caching
  # allocator refuses past the fraction set, as a small card would.
  echo "== oom at $(elapsed) s"
  $PY - <<EOF
import logging, time, numpy as np, torch
from pipeline.embedder import load_embedder
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
texts = [f"chunk {i}: " + " ".join(f"token{(i * 7 + j) % 997}" for j in range(300)) for i in range(1024)]
e = load_embedder("$MODEL", "cuda", "fp32")
whole = e.start(texts)()
torch.cuda.synchronize(); torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(1.5e9 / torch.cuda.get_device_properties(0).total_memory)
started = time.perf_counter()
halved = e.start(texts)()
again = e.embed(texts[:300])
print("oom: forward_batch", e.forward_batch, "largest difference", float(np.abs(halved - whole).max()),
      float(np.abs(again - whole[:300]).max()), f"{time.perf_counter() - started:.2f} s",
      "peak GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2))
EOF
  ;;
pipeline|bare) bench "gpu-$step" --stages "$step" ;;
fp32) bench gpu-fp32 --stages bare,bare_records,pipeline ;;  # the last --stages wins
full-text-off) bench gpu-fp32-full-text-off --full-text off ;;
precision)
  echo "== precision at $(elapsed) s"
  $PY -m ops.tools.precision --model $MODEL --device "${DEVICE:-cuda}" --chunks 2000 --queries 200 --batch 256 \
    | tee "$OUT/precision.json"
  ;;
profile)
  # The writer under py-spy (threads, idle included) on the first run's corpus, if time is left.
  work=$(ls -dt /tmp/indexq-bench-* 2>/dev/null | tail -1)
  if [ -x .whl/py-spy ] && [ -n "$work" ] && [ "$(elapsed)" -lt "$BUDGET" ]; then
    echo "== profile at $(elapsed) s"
    home=/tmp/profile-home
    INDEXQ_HOME=$home INDEXQ_MODEL=$MODEL indexq worker > /tmp/profile-writer.out 2> /tmp/profile-writer.log &
    writer=$!
    until grep -q "tasks requeued" /tmp/profile-writer.log 2>/dev/null || ! kill -0 $writer 2>/dev/null; do sleep 0.2; done
    .whl/py-spy record --idle --threads --nonblocking --rate 50 --format raw -o "$OUT/writer.spy" --pid $writer \
      > /tmp/profile-spy.log 2>&1 &
    spy=$!
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > /tmp/gpu-util.txt 2>/dev/null &
    smi=$!
    s=$(date +%s%N)
    INDEXQ_HOME=$home INDEXQ_MODEL=$MODEL indexq index "$work/corpus" --collection bench --wait --json > /dev/null 2>&1
    echo "profiled pipeline: $(( ($(date +%s%N) - s) / 1000000 )) ms"
    kill -INT $spy; wait $spy
    kill $smi 2>/dev/null
    $PY -c "import sqlite3, statistics; c = sqlite3.connect('$home/ledger.db'); n, a, b = c.execute(\"SELECT count(*), min(committed_at), max(committed_at) FROM chunks WHERE committed_at\").fetchone(); print(f'profiled: {n} chunks, first to last commit {n / (b - a):.1f} chunks/s'); u = [float(x) for x in open('/tmp/gpu-util.txt') if x.strip()]; print(f'GPU utilisation: mean {statistics.mean(u):.1f} %, samples {len(u)}') if u else None"
    kill -TERM $writer; wait $writer
    tail -3 /tmp/profile-spy.log
  fi
  ;;
fp16) bench gpu-fp16 --precision fp16 ;;
*) echo "unknown step $step"; exit 2 ;;
esac; done
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("gpu-*.json")):
    r = json.loads(path.read_text())
    b, p, rec = r.get("bare", {}), r.get("pipeline", {}), r.get("bare_records", {})
    print(f"{path.stem:<26} device {p.get('device')}/{b.get('device')} mb {p.get('micro_batch')}"
          f" bare wall {b.get('wall_chunks_per_s')} loop {b.get('chunks_per_s')}"
          f" | with indexq's records loop {rec.get('chunks_per_s')}"
          f" | pipeline e2e {p.get('chunks_per_s')} commits {p.get('commit_chunks_per_s')}"
          f" | ratios {r.get('end_to_end_ratio')} {r.get('throughput_ratio')}")
EOF
tar czf "$OUT/logs.tgz" /tmp/indexq-bench-*/*.log /tmp/profile-writer.log 2>/dev/null
echo "== done at $(elapsed) s"
