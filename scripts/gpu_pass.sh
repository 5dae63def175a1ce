#!/usr/bin/env bash
# The whole GPU pass in one command, staged to finish within GPU_PASS_TOTAL_S (default 400 s, under
# the 7 minutes a lent machine's 10-minute command limit leaves after start-up) and to return numbers
# whenever it is cut off. Meant for one call of a lent GPU machine (see ../shared/GPU.md) and equally
# for a developer's own GPU box.
#
#   bash scripts/gpu_pass.sh --plan          # the stages and their time budgets; needs no GPU
#   bash scripts/gpu_pass.sh                 # everything, logs and results in $OUT (default ./out)
#   STAGES="selfcheck bench" bash scripts/gpu_pass.sh    # only these stages (setup always runs)
#   RING_STEP_COST=1 bash scripts/gpu_pass.sh            # also the ring step-cost run, in the last stage
#   GPU_PASS_BUILD=0 ...                                  # never build _C (use it if it imports)
#
# Stages run in order of value, each under its own `timeout` (never past the overall deadline, less a
# reserve for the verdict): a stage that runs out is killed, recorded as rc 124 in $OUT/stages.tsv, and
# the next stage starts. Results are appended line by line as they are measured:
#   $OUT/selfcheck.jsonl   every op and implementation at real sizes in bf16 against fp64
#   $OUT/tests/*.log       GPU test shards (pytest -v), run in parallel so that Triton compiles overlap
#   $OUT/bench.jsonl       benchmark rows (bench/harness.py's $SEEDVL_BENCH_JSONL)
# The last thing printed is scripts/gpu_verdict.py's table: one line per op and implementation.
#
# The extension: carry a _C built here (bash scripts/build_ext_for_gpu_machine.sh prints the path to
# carry); without one that imports, setup builds it on the machine for sm_90a only.
# Wheels missing on an offline machine may be carried in .whl/ and are installed into /tmp/site
# first. For the lent GPU machines (no registry access) prepare them where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl nvidia-cutlass nvtx
# (the build only needs nvidia-cutlass's headers, so its own dependencies are not needed).
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=${GPU_PASS_TOTAL_S:-400}
VERDICT_RESERVE_S=10
# name:budget seconds:what. "full" gets whatever the earlier stages left (at least its budget).
PLAN=(
  "setup:90:carried wheels; import the carried _C, else build it for sm_90a only"
  "selfcheck:60:every op x implementation at real sizes in bf16 vs fp64 (python -m seedvl_kernels.selfcheck --size real)"
  "tests:120:pytest -m gpu in ${GPU_PASS_SHARDS:-6} parallel shards (Triton compiles overlap)"
  "bench:90:curated rows vs the strongest peer without a compile: attention 1k-image ViT pack + 16k LLM pack, MoE 235B balanced + Zipf, pool_adapter, rope_2d, ring merge, GQA dK/dV split"
  "full:30:the rest of the benchmark matrix with torch.compile peers and autotune search (saved), until the deadline"
)

plan() {
  local sum=0 name budget what
  printf '%-10s %8s  %s\n' stage budget what
  for entry in "${PLAN[@]}"; do
    IFS=: read -r name budget what <<<"$entry"
    sum=$((sum + budget))
    printf '%-10s %7ss  %s\n' "$name" "$budget" "$what"
  done
  printf '%-10s %7ss  %s\n' verdict "$VERDICT_RESERVE_S" "python scripts/gpu_verdict.py \$OUT (the last lines printed)"
  sum=$((sum + VERDICT_RESERVE_S))
  printf '%-10s %7ss  %s\n' total "$sum" "budgets summed; the pass stops at GPU_PASS_TOTAL_S=$TOTAL_S s whatever happens"
}

if [ "${1:-}" = "--plan" ]; then
  plan
  exit 0
fi

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/tests"
export PYTHONUNBUFFERED=1
# One attention config per shape class, no autotune timing: fewer compiles, the same code every run.
# The last stage searches instead and saves the winners to $OUT/autotune.json: commit that file as
# bench/results/varlen_attention_autotune.json for later passes to pin.
export SEEDVL_AUTOTUNE=pinned
[ -f bench/results/varlen_attention_autotune.json ] \
  && export SEEDVL_AUTOTUNE_FILE=${SEEDVL_AUTOTUNE_FILE:-$PWD/bench/results/varlen_attention_autotune.json}
PY=${PYTHON:-python3}
T0=$(date +%s)
: >"$OUT/stages.tsv"
status=0

budget_of() {
  local entry
  for entry in "${PLAN[@]}"; do [ "${entry%%:*}" = "$1" ] && { IFS=: read -r _ b _ <<<"$entry"; echo "$b"; }; done
}

# Seconds the stage may run: its budget, or for "full" all that is left; never past the deadline.
allowance() {
  local left=$((TOTAL_S - VERDICT_RESERVE_S - ($(date +%s) - T0))) b
  b=$(budget_of "$1")
  [ "$1" = full ] && b=$left
  [ "$b" -gt "$left" ] && b=$left
  echo $((b > 0 ? b : 0))
}

wanted() { [ "$1" = setup ] || [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $1 "* ]]; }

# run_stage NAME CMD...: CMD under the stage's timeout, its output teed to $OUT/NAME.log.
run_stage() {
  local name=$1 t s0 rc
  shift
  wanted "$name" || return 0
  t=$(allowance "$name")
  if [ "$t" -lt 5 ]; then
    printf '%s\t%s\t0\tskipped\n' "$name" "$(budget_of "$name")" >>"$OUT/stages.tsv"
    echo "== $name: skipped, no time left"
    return 0
  fi
  echo "== $name (up to ${t} s, $(( $(date +%s) - T0 )) s elapsed)"
  s0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$t" "$(( $(date +%s) - s0 ))" "$rc" >>"$OUT/stages.tsv"
  [ "$rc" = 0 ] || status=1
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage_setup() {
  if "$PY" -c 'import seedvl_kernels._C as C; assert any(str(a).startswith("90") for a in C.cuda_archs), C.cuda_archs' 2>/dev/null; then
    echo "carried _C imports: $("$PY" -c 'import seedvl_kernels._C as C; print(C.__file__, list(C.cuda_archs))')"
  elif [ "${GPU_PASS_BUILD:-1}" = 0 ]; then
    echo "no carried _C for this Python and sm_90, and GPU_PASS_BUILD=0: CUDA implementations unavailable"
  else
    echo "no carried _C for this Python and sm_90: building for sm_90a only"
    SEEDVL_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1 \
      || { echo "build failed"; tail -40 "$OUT/build.log"; return 1; }
  fi
  "$PY" -m seedvl_kernels.info | tee "$OUT/info.txt"
  "$PY" -m seedvl_kernels.info --json >"$OUT/info.json"
}

stage_selfcheck() {
  "$PY" -m seedvl_kernels.selfcheck --device cuda --dtype bfloat16 --size real --jsonl "$OUT/selfcheck.jsonl"
}

stage_tests() {
  local shards=${GPU_PASS_SHARDS:-6} i pids=()
  "$PY" scripts/gpu_test_shards.py "$shards" "$OUT/tests" ${PYTEST_ARGS:-} || return 1
  for ((i = 0; i < shards; i++)); do
    [ -s "$OUT/tests/shard$i.txt" ] || continue
    mapfile -t ids <"$OUT/tests/shard$i.txt"
    "$PY" -m pytest -v -rfE -p no:cacheprovider -m gpu "${ids[@]}" >"$OUT/tests/shard$i.log" 2>&1 &
    pids+=($!)
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  tail -n 3 "$OUT"/tests/shard*.log
  return $rc
}

# Curated rows: each op's own implementations (peers' times enter as ratios, not rows of their own).
# 1k_images also selects 1k_images_d80 (issue 19: head dim 80 split into 64 + 16 columns); the
# no-RoPE forward beside it prices the fused RoPE (issue 19: sin/cos from the per-token table).
CURATED_K="(varlen_attention and (1k_images or llm_causal_gqa) and triton and not no_rope)"
CURATED_K+=" or (varlen_attention and 1k_images and not d80 and triton_no_rope and fwd)"
CURATED_K+=" or (moe_layer and 235b and 16384 and (balanced or zipf) and fwd_bwd and (triton or cuda))"
CURATED_K+=" or (pool_adapter and 16384 and 4096 and (triton or cuda))"
CURATED_K+=" or (rope_2d and 65536 and bfloat16 and (triton or cuda))"
CURATED_K+=" or (ring_attention and merge)"  # issue 19: the fused (out, lse) merge vs the eager chain
# Issue 19, MoE (profiles/grouped_gemm.md): the CUTLASS wgrad on the pingpong 128x128 schedule at 4k
# tokens (256 rows an expert when balanced: the short K it is for), and the Triton M-grouped GEMM
# whose persistent variant stage_bench times on the same rows.
CURATED_K+=" or (moe_gemm and 235b and 4096 and (balanced or zipf) and wgrad and cuda)"
CURATED_K+=" or (moe_gemm and 235b and 16384 and (balanced or zipf) and fwd and triton)"

stage_bench() {
  local rc=0
  SEEDVL_BENCH_JSONL="$OUT/bench.jsonl" SEEDVL_BENCH_RESULTS="$OUT/results_curated" \
    SEEDVL_BENCH_PEERS=copy,torch_varlen,sdpa_per_image,grouped_mm,loop,eager_unfused \
    "$PY" -m pytest bench/ -q -rs -p no:cacheprovider --benchmark-disable -k "$CURATED_K" || rc=$?
  # Issue 19: dK/dV's GQA split (profiles/varlen_attention_gqa_bwd.md): the backward of one 2k-token
  # causal sequence, Hq 32 / Hkv 4, D 128, bf16, with dkdv_splits' rule (4 parts) and with none.
  "$PY" - >>"$OUT/gqa_bwd.jsonl" <<'PY' || rc=1
import importlib, json, torch, triton
from seedvl_kernels import varlen_attention
vat = importlib.import_module("seedvl_kernels.varlen_attention_triton")
L, hq, hkv, d, dev = 2048, 32, 4, 128, torch.device("cuda")
q, k, v = (torch.randn(L, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=L, causal=True, impl="triton")
g, rule = torch.randn_like(out), vat.dkdv_splits
tiles = -(-L // vat.tiles_for(dev, d, L, L).dkdv_n)
for splits in (rule(tiles, hkv, hq // hkv, vat._num_sms(dev)), 1):
    vat.dkdv_splits = lambda *a, s=splits: s
    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
    print(json.dumps({"op": "varlen_attention_bwd", "case": "1x2k causal Hq32 Hkv4 D128 bf16",
                      "dkdv_splits": splits, "key_tiles": tiles, "ms": ms}))
PY
  # Issue 19: the warp-specialized attention forward (profiles/varlen_attention_pipelining.md): the
  # curated attention rows again with $SEEDVL_ATTENTION_WS=1 (bench_ws.jsonl), against bench.jsonl's
  # plain-kernel rows and FlashAttention in the same file.
  SEEDVL_ATTENTION_WS=1 SEEDVL_BENCH_JSONL="$OUT/bench_ws.jsonl" SEEDVL_BENCH_RESULTS="$OUT/results_ws" \
    SEEDVL_BENCH_PEERS=torch_varlen "$PY" -m pytest bench/bench_varlen_attention.py -q -rs -p no:cacheprovider \
    --benchmark-disable -k "(1k_images or llm_causal_gqa) and triton and not no_rope" || rc=$?
  # Issue 19, MoE (profiles/grouped_gemm.md), near the end so that a cut-off stage loses these first. The
  # curated triton fwd rows again: with the persistent M-grouped kernel (bench_persistent.jsonl), and
  # with the tile search keyed on (N, K, dtype) instead of the pinned heuristic (bench_search.jsonl);
  # each against bench.jsonl's per-tile, pinned rows.
  local moe_k="moe_gemm and 235b and 16384 and (balanced or zipf) and fwd and triton"
  SEEDVL_GROUPED_GEMM_PERSISTENT=1 SEEDVL_BENCH_JSONL="$OUT/bench_persistent.jsonl" \
    SEEDVL_BENCH_RESULTS="$OUT/results_persistent" SEEDVL_BENCH_PEERS=grouped_mm \
    "$PY" -m pytest bench/bench_moe.py -q -rs -p no:cacheprovider --benchmark-disable -k "$moe_k" || rc=$?
  SEEDVL_AUTOTUNE=search SEEDVL_BENCH_JSONL="$OUT/bench_search.jsonl" \
    SEEDVL_BENCH_RESULTS="$OUT/results_search" SEEDVL_BENCH_PEERS=grouped_mm \
    "$PY" -m pytest bench/bench_moe.py -q -rs -p no:cacheprovider --benchmark-disable -k "$moe_k" || rc=$?
  # Issue 19, last (every config compiles): the attention tile search (4-5 backward stages, 128-key
  # forward blocks at D <= 64), the same rows under SEEDVL_AUTOTUNE=search, its winners saved beside.
  SEEDVL_AUTOTUNE=search SEEDVL_AUTOTUNE_SAVE="$OUT/autotune_attention.json" \
    SEEDVL_BENCH_JSONL="$OUT/bench_attn_search.jsonl" SEEDVL_BENCH_RESULTS="$OUT/results_attn_search" \
    SEEDVL_BENCH_PEERS=torch_varlen "$PY" -m pytest bench/bench_varlen_attention.py -q -rs -p no:cacheprovider \
    --benchmark-disable -k "(1k_images or llm_causal_gqa) and triton and not no_rope" || rc=$?
  return $rc
}

stage_full() {
  SEEDVL_AUTOTUNE=search SEEDVL_AUTOTUNE_SAVE="$OUT/autotune.json" \
    SEEDVL_BENCH_JSONL="$OUT/bench.jsonl" SEEDVL_BENCH_RESULTS="$OUT/results" \
    "$PY" -m pytest bench/ -q -rs -p no:cacheprovider --benchmark-disable -k "not ($CURATED_K)" ${PYTEST_ARGS:-}
  if [ "${RING_STEP_COST:-0}" = 1 ]; then
    # Issue 8: one ring step's cost relative to one unsharded attention call (profiles/ring_attention_model.md).
    "$PY" profiles/ring_attention_step_cost.py --impl triton --out "$OUT"
  fi
}

export -f stage_setup stage_selfcheck stage_tests stage_bench stage_full
export PY OUT CURATED_K
run_stage setup bash -c stage_setup  # without a _C the CUDA implementations report themselves unavailable
run_stage selfcheck bash -c stage_selfcheck
run_stage tests bash -c stage_tests
run_stage bench bash -c stage_bench
run_stage full bash -c stage_full
echo "== pass took $(( $(date +%s) - T0 )) s of $TOTAL_S"
"$PY" scripts/gpu_verdict.py "$OUT"
exit $status
