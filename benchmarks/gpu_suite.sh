#!/usr/bin/env bash
# Every figure that still needs a GPU, planned to fit one lent GPU session: 30 minutes of device time,
# at most 10 minutes per command, results back through $OUT. Three parts, one command each:
#
#   checks   CUDA tests; Inception FID floor + FID speed at 10k; method overhead at size S;
#            training memory at 256 tokens (S…XL, largest batch); throughput / MFU      (~8 min)
#   conv-a   MNIST size-S convergence: flow matching, dual-timestep only, Self-Flow     (~8.5 min)
#   conv-b   the same: single timestep, REPA (Inception encoder)                         (~8.5 min)
#
# Before the first call (here, on the development machine):
#   mkdir -p .carry && cp -r ../shared/data/mnist .carry/ && cp ../shared/models/fid_inception_v3_fp16.pt .carry/
# Device calls (DEVELOPERS.md, "A lent GPU session"):
#   run: bash benchmarks/gpu_suite.sh checks          carry: [".carry"]
#   run: STEPS=N bash benchmarks/gpu_suite.sh conv-a  carry: [".carry"]
#   run: STEPS=N bash benchmarks/gpu_suite.sh conv-b  carry: [".carry", "runs/convergence_mnist_gpu"]
# Each part packs what it wrote into $OUT/<part>.tgz (docs/benchmarks/ files and the convergence
# run records, never checkpoints); unpack it in the repository root with `tar xzf`.
# STEPS: choose it from the checks part's method_overhead_mnist_gpu.md so that the slowest part
# (conv-a: 1 + 1.2 + 1.6 flow-matching step times per step) fits in 8 minutes with its evaluations.
# SMOKE=1 runs the same steps on the CPU with tiny sizes and counts, writing under outputs/gpu_suite_smoke
# instead of docs/benchmarks: a check of the plumbing before a GPU session is spent on it.
set -uo pipefail
part="${1:?usage: bash benchmarks/gpu_suite.sh checks|conv-a|conv-b}"
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_suite}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export SELFFLOW_INCEPTION="${SELFFLOW_INCEPTION:-$PWD/.carry/fid_inception_v3_fp16.pt}"
MNIST="${MNIST:-.carry/mnist}"
STEPS="${STEPS:-3000}"
EVAL_EVERY="${EVAL_EVERY:-$(( STEPS / 3 ))}"
BUDGET="${BUDGET:-560}"  # seconds for the whole part: under the device tool's 600 s per command, packing included
if [ "${SMOKE:-0}" = 1 ]; then
    DEV=cpu DOCS=outputs/gpu_suite_smoke WORK=outputs/gpu_suite_smoke/convergence
    SIZE=tiny MEM_SIZES="tiny mini" TP_SIZES="tiny" TP_SHAPE="--image-size 8 --channels 1" MEM_BATCHES="8 16" MAX_BATCH=64 FID_N=20 BATCH=16 CONV_BATCH="--batch-size 16 --set model.size=tiny"
    CONV_EVAL="--num-samples 100 --sample-steps 2 --fd-steps 20" OVERHEAD="--steps 1 --rounds 1 --warmup 1"
    MEM_EXTRA="--memory-limit-gib 1"
else
    DEV=cuda DOCS=docs/benchmarks WORK=runs/convergence_mnist_gpu
    SIZE=S MEM_SIZES="S B L XL" TP_SIZES="S B" TP_SHAPE="--image-size 32 --channels 4" MEM_BATCHES="32 256" MAX_BATCH=2048 FID_N=10000 BATCH=256 CONV_BATCH=""
    CONV_EVAL="--num-samples 2000 --sample-steps 32" OVERHEAD="--steps 10 --rounds 3 --warmup 3" MEM_EXTRA=""
fi
mkdir -p "$DOCS"
export SELFFLOW_BENCH_DIR="$DOCS"
stamp=$(mktemp) && touch -d '-1 second' "$stamp"
deadline=$(( SECONDS + BUDGET ))
failed=()

step() {  # step NAME SECONDS COMMAND...: a time limit, cut to what is left of the budget; failures are reported, not fatal
    local name="$1" limit="$2"; shift 2
    local left=$(( deadline - SECONDS - 15 ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then echo "=== $name SKIPPED: the part's budget is spent"; failed+=("$name(skipped)"); return; fi
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" || { echo "=== $name FAILED or timed out (rc $?)"; failed+=("$name"); }
    echo "=== $name took $(( SECONDS - start ))s"
}

[ -f "$SELFFLOW_INCEPTION" ] && [ -d "$MNIST" ] || { echo "missing $MNIST or $SELFFLOW_INCEPTION (see the top of this file)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

# the convergence benchmark with the MNIST size-S configs, one seed (an array: `timeout` runs programs, not functions)
conv=(python benchmarks/convergence.py --data mnist --data-path "$MNIST" --device "$DEV" --inception "$SELFFLOW_INCEPTION"
      --steps "$STEPS" --eval-every "$EVAL_EVERY" --seeds 0 $CONV_EVAL $CONV_BATCH --work "$WORK" --out "$DOCS/convergence_mnist_gpu")

case "$part" in
checks)  # in order of what the issues need most
    step cuda-tests 150 python -m pytest -q tests/test_cuda.py -p no:cacheprovider
    step real-floor 150 python benchmarks/real_floor.py --data mnist --data-path "$MNIST" --device "$DEV" --fid-count "$FID_N" \
        --name "real_floor_mnist_fid10k_$DEV"
    step memory-table 150 python benchmarks/memory.py --device "$DEV" --latent --sizes $MEM_SIZES --batches $MEM_BATCHES \
        --options bf16 bf16+ckpt fp32 --method self_flow $MEM_EXTRA --name "memory_$DEV"
    step method-overhead 90 python benchmarks/method_overhead.py --data mnist --data-path "$MNIST" --device "$DEV" --size "$SIZE" \
        --batch-size "$BATCH" $OVERHEAD --repa-encoder inception --inception "$SELFFLOW_INCEPTION" --out "$DOCS/method_overhead_mnist_gpu"
    step throughput 120 python benchmarks/throughput.py --device "$DEV" --sizes $TP_SIZES $TP_SHAPE --batch "$BATCH" --compile both --steps 5 \
        --name "throughput_$DEV"
    step memory-max 180 python benchmarks/memory.py --device "$DEV" --latent --sizes $MEM_SIZES --batches "${MEM_BATCHES%% *}" \
        --options bf16 bf16+ckpt --find-max --max-batch "$MAX_BATCH" --granularity 32 --method self_flow $MEM_EXTRA \
        --name "memory_${DEV}_max"
    ;;
conv-a) step convergence-a 540 "${conv[@]}" --methods flow_matching self_flow_dual_timestep_only self_flow --max-minutes 7.5 ;;
conv-b) step convergence-b 540 "${conv[@]}" --methods self_flow_single_timestep repa --max-minutes 7.5 ;;
*) echo "unknown part $part (checks | conv-a | conv-b)"; exit 2 ;;
esac

# pack what this part wrote: new benchmark files and the convergence records (no checkpoints)
files=$(find "$DOCS" -type f -newer "$stamp"; [ -d "$WORK" ] && find "$WORK" -path '*/checkpoints' -prune -o -type f \
        \( -name '*.json' -o -name '*.npz' -o -name '*.safetensors' \) -print)
tar czf "$OUT/$part.tgz" $files && echo "packed $(echo $files | wc -w) files into $OUT/$part.tgz"
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
