#!/usr/bin/env bash
# Scale-out plumbing cost: 673 chunks (stdlib json, logging, http) through
# (a) the SQLite queue and a persistent Chroma directory, (b) a Redis queue with a remote
# producer (its own home) and a Chroma server; with hash:384 (plumbing only), then the
# real model. Needs redis-server and the sqlite3 CLI. Usage: bash ops/bench_scaleout.sh
set -euo pipefail
cd "$(dirname "$0")/.."; . .venv/bin/activate
W=$(mktemp -d); WRITERS=()
cleanup() {
  for pid in "${WRITERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  redis-cli -p 16401 shutdown nosave >/dev/null 2>&1 || true
  pkill -f "chroma run --path $W" || true
}
trap cleanup EXIT
trap "exit 143" TERM INT
redis-server --port 16401 --bind 127.0.0.1 --dir $W --save '' --appendonly yes --appendfsync always --daemonize yes >/dev/null
ANONYMIZED_TELEMETRY=False chroma run --path $W/srv --host 127.0.0.1 --port 18767 > $W/chroma.log 2>&1 &
sleep 2
CORPUS=$(python -c 'import json,os;print(os.path.dirname(os.path.dirname(json.__file__)))')
PATHS="$CORPUS/json $CORPUS/logging $CORPUS/http"
run() {  # name, model, extra env...
  local name=$1 model=$2; shift 2
  local home=$W/$name-writer
  env "$@" INDEXQ_MODEL=$model INDEXQ_HOME=$home indexq worker > $W/$name.log 2>&1 &
  local wpid=$!
  WRITERS+=("$wpid")
  until grep -q "tasks requeued" $W/$name.log; do sleep 0.2; done
  local t0=$(date +%s.%N)
  local phome=$home; case $name in remote*) phome=$W/$name-producer;; esac
  env "$@" INDEXQ_MODEL=$model INDEXQ_HOME=$phome indexq index $PATHS --collection measure --json > $W/$name.sub
  local t1=$(date +%s.%N)
  local n=$(python -c "import json;print(json.load(open('$W/$name.sub'))['chunks'])")
  until [ "$(sqlite3 $home/ledger.db "select count(*) from chunks where state='committed'" 2>/dev/null || echo 0)" = "$n" ]; do sleep 0.2; done
  local t2=$(date +%s.%N)
  kill -TERM $wpid; wait $wpid || true
  python -c "n=$n; a=$t1-$t0; b=$t2-$t0; print(f'$name: {n} chunks, producer {a:.2f}s ({n/a:.0f} chunks/s), first enqueue to last commit {b:.2f}s ({n/b:.1f} chunks/s)')"
}
run local-hash hash:384
run remote-hash hash:384 INDEXQ_QUEUE_URL=redis://127.0.0.1:16401/0 INDEXQ_CHROMA_URL=http://127.0.0.1:18767 INDEXQ_SECRET=x
run local-model all-MiniLM-L6-v2
run remote-model all-MiniLM-L6-v2 INDEXQ_QUEUE_URL=redis://127.0.0.1:16401/1 INDEXQ_CHROMA_URL=http://127.0.0.1:18767 INDEXQ_SECRET=x
