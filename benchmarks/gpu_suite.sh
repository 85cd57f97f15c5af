#!/usr/bin/env bash
# One call on the GPU machine (under its 10-minute limit): install the wheels it lacks, unpack Market-1501, measure
# the throughput (benchmarks/throughput.py), then train the paper recipe (ResNet-50 from scratch, 256x128, P16xK4,
# bf16, cached data path) for as long as the budget allows, resumable in a second call. Everything it reports goes
# to $OUT (the device tool brings that folder back); the run folder with its checkpoints stays on the machine in
# $RUNS (default /tmp/reid_runs) so that `--resume` can continue there while the machine is still warm.
#
#   bash benchmarks/gpu_suite.sh                        # throughput + paper recipe for ~9 minutes
#   bash benchmarks/gpu_suite.sh --resume --no-throughput   # the next call: continue the same run
#   bash benchmarks/gpu_suite.sh --init lite0 --arch tf_efficientnet_lite0 --name paper_lite0
#   bash benchmarks/gpu_suite.sh --dry-run              # tiny sizes on the CPU, demo data: checks the script itself
#
# Options: --minutes M (total budget of this call, default 9), --epochs N (default 120), --init scratch|imagenet|lite0|lite1|lite2 (default scratch),
# --arch A, --name NAME (run folder name), --resume, --no-throughput, --dry-run. Needs (not for --dry-run):
# .whl/ from ../shared/tools/gpu-wheels.sh and .data/market1501.tar.xz, both carried with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
MINUTES=9; EPOCHS=120; INIT=scratch; ARCH=""; NAME=""; RESUME=""; THROUGHPUT=1; DRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2;; --epochs) EPOCHS=$2; shift 2;; --init) INIT=$2; shift 2;;
    --arch) ARCH=$2; shift 2;; --name) NAME=$2; shift 2;; --resume) RESUME=--resume; shift;;
    --no-throughput) THROUGHPUT=""; shift;; --dry-run) DRY=1; shift;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2;;
  esac
done
case "$INIT" in lite*) ARCH=${ARCH:-tf_efficientnet_$INIT};; esac; ARCH=${ARCH:-resnet50}
[ -n "$DRY" ] && NAME=${NAME:-dry_run}
NAME=${NAME:-paper_${ARCH}_${INIT}}
OUT=${OUT:-runs/gpu_suite}; RUNS=${RUNS:-/tmp/reid_runs}
mkdir -p "$OUT" "$RUNS"
log() { echo "[gpu_suite $(( $(date +%s) - start ))s] $*" | tee -a "$OUT/suite.log"; }

if [ -n "$DRY" ]; then
  log "dry run: CPU, demo data, tiny sizes"
  DATA=(--demo --device cpu); TP=(--data demo --device cpu --quick --steps 2 --size 64 32 --p 4 --k 4 --skip overhead)
  TRAIN=(--arch test_resnet --init scratch --size 64 32 --p 4 --k 4 --eval-every 1 --lr 1e-3 --pipeline cached --checkpoint-every 1)
  EPOCHS=2
else
  if [ -d .whl ] && ! python3 -c "import fastai" 2>/dev/null; then
    log "installing the wheels in .whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if [ ! -d /tmp/data/Market-1501-v15.09.15 ]; then
    [ -f .data/market1501.tar.xz ] || { echo "gpu_suite.sh: .data/market1501.tar.xz is missing (see ../shared/datasets/README.md)" >&2; exit 2; }
    log "unpacking Market-1501"
    mkdir -p /tmp/data && tar xJf .data/market1501.tar.xz -C /tmp/data
  fi
  export REID_MARKET1501=/tmp/data/Market-1501-v15.09.15 REID_FASTAI_CACHE=/tmp/reid_cache
  DATA=("$REID_MARKET1501"); TP=(); TRAIN=(--arch "$ARCH" --init "$INIT")
  python3 - <<'EOF' 2>&1 | tee -a "$OUT/suite.log"
import torch, fastai, timm
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), fastai {fastai.__version__}, timm {timm.__version__},",
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
EOF
fi

if [ -n "$THROUGHPUT" ]; then
  log "throughput"
  python3 benchmarks/throughput.py "${TP[@]}" --out "$OUT/throughput.json" 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
fi

left=$(python3 -c "print(round($MINUTES - ($(date +%s) - $start)/60 - 0.75, 2))")   # keep ~45 s for the final evaluation and export
log "training $NAME for at most $left minutes ($EPOCHS epochs, $INIT) $RESUME"
python3 benchmarks/train_market.py "${DATA[@]}" "${TRAIN[@]}" --epochs "$EPOCHS" --max-minutes "$left" \
  --out "$RUNS/$NAME" --results "$OUT" --quiet $RESUME 2>&1 | grep -v Warning | tee "$OUT/$NAME.log"
cp "$RUNS/$NAME/results.json" "$OUT/${NAME}_results.json"; cp "$RUNS/$NAME/curves.png" "$OUT/${NAME}_curves.png"
[ -f "$RUNS/$NAME/history.csv" ] && cp "$RUNS/$NAME/history.csv" "$OUT/${NAME}_history.csv"
log "done; run folder $RUNS/$NAME (checkpoints for --resume), reports in $OUT"
