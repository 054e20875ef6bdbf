#!/usr/bin/env bash
# Logit-drift gate of the CUDA tensor-core prefill routes (ds4 PR #15's method), on the GPU host.
#
#   scripts/drift-gate.sh BIN_DIR MODELS_DIR PROMPTS_TSV [SYNTH_LAYERS [LONG_TOKENS]]
#
# BIN_DIR: `ds4` built with --features cuda. MODELS_DIR: the fixture GGUFs written by
# `gpu_check convert` (tiny-f32, flashdims-{f32,f16,q8_0,q2,q4}). PROMPTS_TSV: `set<TAB>name<TAB>ids`
# (scripts/gpu-prep.sh writes it). SYNTH_LAYERS > 0 also writes a synthetic Flash q2 model with
# that many layers to /dev/shm (`ds4 synth`) and runs a LONG_TOKENS-token random prompt on it.
#
# For every model and prompt it dumps logits with the exact path (`--quality` plus
# DS4_CUDA_TC_DISABLE=1), with each route alone and with every route on, and compares each
# against the exact path with `ds4 drift` (row by row, every prompt position; the long prompt:
# the last prompt position and 3 greedy steps). Envelope (any row outside fails the gate):
#   same top-1, top-20 overlap ≥ DRIFT_MIN_TOP20 (default 18),
#   rms ≤ DRIFT_MAX_RMS_SHORT (default 0.30) on the fixtures, ≤ DRIFT_MAX_RMS_LONG (0.60) long.
# Logs and dumps go to $OUT/drift (default /tmp/drift-gate). Prints a table last; exit 1 on a
# failure.
set -uo pipefail
BIN=${1:?BIN_DIR}
MODELS=${2:?MODELS_DIR}
PROMPTS=${3:?PROMPTS_TSV}
SYNTH_LAYERS=${4:-0}
LONG_TOKENS=${5:-4096}
MAX_RMS_SHORT=${DRIFT_MAX_RMS_SHORT:-0.30}
MAX_RMS_LONG=${DRIFT_MAX_RMS_LONG:-0.60}
MIN_TOP20=${DRIFT_MIN_TOP20:-18}
D=${OUT:-/tmp/drift-gate}/drift
mkdir -p "$D"
DS4="$BIN/ds4"

ROUTES="DENSE ATTN_OUT F16 MOE_GATE MOE_UP MOE_DOWN"
# config name → routes left on ("" = exact path, "ALL" = every route)
declare -A KEEP=(
  [quality]=""
  [dense]="DENSE"
  [attn_out]="ATTN_OUT"
  [f16]="F16"
  [moe_gate_up]="MOE_GATE MOE_UP"
  [moe_down]="MOE_DOWN"
  [all]="ALL"
)

# env assignments for a config
cfg_env() {
  local keep=${KEEP[$1]}
  if [ -z "$keep" ]; then echo "DS4_CUDA_TC_DISABLE=1"; return; fi
  [ "$keep" = ALL ] && return
  local r out=""
  for r in $ROUTES; do
    case " $keep " in *" $r "*) ;; *) out="$out DS4_CUDA_TC_${r}_DISABLE=1" ;; esac
  done
  echo "$out"
}

# configs worth running for a model (routes that cannot apply are skipped)
cfgs_for() {
  case "$1" in
    *f32) echo "all" ;;
    *f16) echo "f16 all" ;;
    *) echo "dense attn_out f16 moe_gate_up moe_down all" ;;
  esac
}

declare -a ROWS
FAIL=0

# json_num FILE KEY → the summary value
json_num() { grep -m1 "\"$2\"" "$1" | sed -E 's/.*: *([^,]*),?/\1/'; }

compare() { # label ref cand max_rms
  local label=$1 ref=$2 cand=$3 maxrms=$4
  local js="$cand.drift.json"
  "$DS4" drift "$ref" "$cand" --json --max-rms "$maxrms" --min-top20-overlap "$MIN_TOP20" > "$js" 2> "$js.err"
  local rc=$?
  local st=PASS
  if [ $rc != 0 ]; then st=FAIL; FAIL=1; fi
  if ! grep -q '"summary"' "$js"; then
    ROWS+=("$(printf '%-44s %s (no drift output: %s)' "$label" FAIL "$(tail -1 "$js.err")")")
    FAIL=1
    return
  fi
  ROWS+=("$(printf '%-44s %5s %9.2e %9.2e %9.2e %5s %5s %5s  %s' "$label" \
    "$(json_num "$js" rows)" "$(json_num "$js" worst_rms)" "$(json_num "$js" worst_max_abs)" \
    "$(json_num "$js" worst_top20_max_abs)" "$(json_num "$js" min_top20_overlap)" \
    "$(json_num "$js" top1_mismatch)" "$(json_num "$js" worst_rank_delta)" "$st")")
}

run_cfg() { # cfg model prompt_ids_file out.npy mode(prompt|gen) ctx
  local cfg=$1 model=$2 ids=$3 out=$4 mode=$5 ctx=$6
  local qflag=""
  [ "$cfg" = quality ] && qflag="--quality"
  local dump="--dump-prompt-logits"
  local n=1
  if [ "$mode" = gen ]; then dump="--dump-logits"; n=4; fi
  env $(cfg_env "$cfg") "$DS4" run -m "$model" --backend cuda $qflag --prompt-ids-file "$ids" \
    $dump "$out" -n $n --temp 0 --ctx "$ctx" > "$out.log" 2>&1
}

echo "drift gate: envelope rms ≤ $MAX_RMS_SHORT (fixtures) / $MAX_RMS_LONG (long), top-20 ≥ $MIN_TOP20/20, same top-1"
for mf in "$MODELS"/*.gguf; do
  model=$(basename "$mf" .gguf)
  case "$model" in tiny*) set=tiny ;; flashdims*) set=flashdims ;; *) continue ;; esac
  # the shortest and the longest fixture prompt of the set
  mapfile -t lines < <(awk -F'\t' -v s="$set" '$1 == s { print length($3) "\t" $2 "\t" $3 }' "$PROMPTS" | sort -n)
  [ ${#lines[@]} -gt 0 ] || continue
  for line in "${lines[0]}" "${lines[-1]}"; do
    pname=$(echo "$line" | cut -f2)
    ids="$D/$set.$pname.json"
    echo "[$(echo "$line" | cut -f3)]" > "$ids"
    ref="$D/$model.$pname.quality.npy"
    if ! run_cfg quality "$mf" "$ids" "$ref" prompt 4096; then
      ROWS+=("$(printf '%-44s FAIL (exact run failed: %s)' "$model/$pname" "$(tail -1 "$ref.log")")")
      FAIL=1
      continue
    fi
    for cfg in $(cfgs_for "$model"); do
      out="$D/$model.$pname.$cfg.npy"
      if ! run_cfg "$cfg" "$mf" "$ids" "$out" prompt 4096; then
        ROWS+=("$(printf '%-44s FAIL (run failed: %s)' "$model/$pname/$cfg" "$(tail -1 "$out.log")")")
        FAIL=1
        continue
      fi
      compare "$model/$pname/$cfg" "$ref" "$out" "$MAX_RMS_SHORT"
    done
  done
done

SPEED=()
if [ "$SYNTH_LAYERS" -gt 0 ]; then
  sm=/dev/shm/tc-drift-flash$SYNTH_LAYERS.gguf
  if [ ! -f "$sm" ]; then
    "$DS4" synth --preset flash --quant q2 --layers "$SYNTH_LAYERS" --seed 7 -o "$sm" > "$D/synth.log" 2>&1 ||
      { echo "synth failed: $(tail -2 "$D/synth.log")"; FAIL=1; }
  fi
  if [ -f "$sm" ]; then
    ids="$D/long.json"
    awk -v n="$LONG_TOKENS" 'BEGIN { srand(11); printf "["; for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), 1000 + int(rand() * 120000); print "]" }' > "$ids"
    model="flash$SYNTH_LAYERS-q2"
    ref="$D/$model.long.quality.npy"
    ctx=$((LONG_TOKENS + 64))
    if run_cfg quality "$sm" "$ids" "$ref" gen $ctx; then
      SPEED+=("$(printf '%-12s %s' quality "$(grep -o 'prefill: [0-9.]* t/s' "$ref.log")")")
      for cfg in dense attn_out f16 moe_gate_up moe_down all; do
        out="$D/$model.long.$cfg.npy"
        if run_cfg "$cfg" "$sm" "$ids" "$out" gen $ctx; then
          compare "$model/long$LONG_TOKENS/$cfg" "$ref" "$out" "$MAX_RMS_LONG"
          SPEED+=("$(printf '%-12s %s' "$cfg" "$(grep -o 'prefill: [0-9.]* t/s' "$out.log")")")
        else
          ROWS+=("$(printf '%-44s FAIL (run failed: %s)' "$model/long/$cfg" "$(tail -1 "$out.log")")")
          FAIL=1
        fi
      done
    else
      ROWS+=("$(printf '%-44s FAIL (exact run failed: %s)' "$model/long" "$(tail -1 "$ref.log")")")
      FAIL=1
    fi
  fi
fi

echo
if [ ${#SPEED[@]} -gt 0 ]; then
  echo "== prefill speed, synthetic Flash q2 ($SYNTH_LAYERS layers), $LONG_TOKENS-token prompt (ds4 run, chunks of the backend's max_chunk)"
  printf '%s\n' "${SPEED[@]}"
fi
echo "== drift vs the exact path ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
printf '%-44s %5s %9s %9s %9s %5s %5s %5s  %s\n' "model/prompt/routes" rows rms max_abs top20_abs top20 top1x rankΔ result
printf '%s\n' "${ROWS[@]}"
if [ $FAIL != 0 ]; then
  echo "drift gate: FAIL"
  exit 1
fi
echo "drift gate: PASS"
