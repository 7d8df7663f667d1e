#!/bin/bash
# Run (or resume) the pre-registered verdict_v1 (verdict_v1.md, sections 5, 9, 10 and the Deviations) on its pinned
# code (commit $code, in main's history through the merges of verdict-v1), checked out in its own worktree, so that
# later refactors of the library do not change the run halfway. Results go into this checkout's
# benchmarks/results/verdict_v1/<model>_<task>[_grad2]/ (stages/*.json as each (arm, rate, seed) finishes).
#   usage: benchmarks/preregistered/verdict_v1_run.sh smollm2|gemma3 [DATA_DIR] [TIERS]
#     DATA_DIR: ../shared/data;  TIERS: 1,2,3 (default), this model's commands of each tier in order.
#   or: verdict_v1_run.sh smollm2 DATA_DIR helper:ARM   (a second worker for one arm of SmolLM2's comparison folder,
#     e.g. helper:cca_nomask: it runs ARM in a copy of the folder, smollm2_comparison_helper (not committed), and
#     moves each finished point and seed preparation into the folder, where the first worker reuses it; section 9's
#     "more workers").
# Tier 1 is section 10's command. Tier 2 reruns the same folder with the tier-2 arms added (the finished points are
# reused) and, for SmolLM2, the 2 % gradient folder; tier 3 the arithmetic folders. Before a folder's tier-2 command
# its tier-1 compare.json / table.md / frontier.png / adapter are kept in tier1/ (the tier-2 command rewrites them).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
which=${1:?smollm2 or gemma3}
case $which in smollm2|gemma3) ;; *) echo "first argument: smollm2 or gemma3, not '$which'" >&2; exit 2 ;; esac
data=$(cd "${2:-$here/../shared/data}" && pwd)
tiers=${3:-1,2,3}
for tier in ${tiers//,/ }; do
  case $which:$tier in *:1|*:2|*:3|smollm2:helper:*) ;;
    *) echo "TIERS: a comma-separated list of 1, 2, 3 (or, for smollm2, helper:ARM), not '$tiers'" >&2; exit 2 ;; esac
done
code=24c2f176d661147a0e32ba6f2c9e806434d3f99e
tree=${VERDICT_TREE:-$here/../verdict-run}
[ -d "$tree" ] || git -C "$here" worktree add --detach "$tree" $code
[ "$(git -C "$tree" rev-parse HEAD)" = $code ] || { echo "$tree is not at the run's commit $code" >&2; exit 2; }
cd "$tree"
export PYTHONPATH="$tree" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
D=benchmarks/preregistered/verdict_v1_data; R=${VERDICT_RESULTS:-$here/benchmarks/results/verdict_v1}
cli=${VERDICT_CLI:-$here/.venv/bin/circuit-peft}  # VERDICT_CLI / VERDICT_RESULTS: for checking this script
COMMON=(--answer number --validation-fraction 0.3333 --seeds 0,1,2,3,4 --checkpoints 3 --epochs 3 --batch-size 8
        --grid-extensions 2 --budgets lora,lora/10 --kl-chunks 4 --side-effects-data "$data" --max-new-tokens 32
        --dtype float32 --threads 1)
CCA_LRS="cca_mask=1e-4,1e-3;cca_nomask=1e-4,1e-3;cca_twin=1e-4,1e-3"

compare() {  # compare TASK FOLDER ARGS...: one folder's command
  local task=$1 folder=$2; shift 2
  local extra_name="VERDICT_EXTRA_$folder"
  local extra=(${!extra_name:-})  # section 4's cap contingency for a folder, e.g. VERDICT_EXTRA_gemma3_arithmetic=
  # "--max-new-tokens 64 --max-cut-share 1": only in a folder whose base stage never finished (remove its run.json
  # first: the cap is part of its settings) and listed as a deviation
  "$cli" compare --data $D/${task}_pool.jsonl --heldout $D/${task}_test.jsonl --shots "$task" \
    "${COMMON[@]}" "$@" "${extra[@]}" --out "$R/$folder"  # a later flag overrides an earlier one
}

keep_tier1() {  # the tier-1 outputs of a folder, before its tier-2 command rewrites them
  local f="$R/$1"
  [ -f "$f/compare.json" ] || { echo "tier 1 of $1 has not finished (no compare.json)" >&2; exit 3; }
  [ -d "$f/tier1" ] && return 0
  mkdir -p "$f/tier1.tmp" && cp -r "$f/compare.json" "$f/table.md" "$f/frontier.png" "$f/tier1.tmp/"
  [ -d "$f/adapter" ] && cp -r "$f/adapter" "$f/tier1.tmp/"
  mv "$f/tier1.tmp" "$f/tier1"
}

tier1_budgets() {  # B1,B2 of a folder's tier 1 as numbers (nats per token): for a folder without the lora arm
  "$here/.venv/bin/python" -c 'import json, sys; print(",".join(repr(v) for v in json.load(open(sys.argv[1]))["budgets"].values()))' \
    "$R/$1/tier1/compare.json"
}

deliver() {  # deliver FROM TO: FROM's finished point files and CCA preparations that TO lacks, each moved in whole
  local from=$1 to=$2 f name seed
  for f in "$from"/stages/point_*.safetensors "$from"/stages/point_*.json; do  # a point's .json last: it marks it done
    [ -e "$f" ] || continue
    name=$(basename "$f")
    [ -e "$to/stages/$name" ] || { cp "$f" "$to/stages/.$name.part" && mv "$to/stages/.$name.part" "$to/stages/$name"; }
  done
  for f in "$from"/cca/dcm_seed*_stats.json; do  # a seed's mining and DCM mask, once both are written
    seed=${f##*/dcm_seed}; seed=${seed%_stats.json}
    [ -e "$from/cca/dcm_seed$seed.json" ] && [ ! -e "$to/cca/mining_seed$seed" ] || continue
    mkdir -p "$to/cca" && cp -r "$from/cca/mining_seed$seed" "$to/cca/.mining_seed$seed.part"
    mv "$to/cca/.mining_seed$seed.part" "$to/cca/mining_seed$seed"
    cp "$f" "$from/cca/dcm_seed$seed.json" "$to/cca/"
  done
}

helper() {  # helper ARM: a second worker for one arm of SmolLM2's comparison folder (see the usage above)
  local arm=$1 main="$R/smollm2_comparison" copy="$R/smollm2_comparison_helper"
  case $arm in cca_mask|cca_nomask) ;; *) echo "helper: cca_mask or cca_nomask (their grid is 1e-4,1e-3), not '$arm'" >&2; exit 2 ;; esac
  [ -f "$main/run.json" ] || { echo "$main has no run.json: start its tier 1 first" >&2; exit 3; }
  mkdir -p "$copy/stages" "$copy/cca"
  cp "$main/run.json" "$copy/" && cp -n "$main"/stages/base_seed*.json "$copy/stages/"
  deliver "$main" "$copy"  # preparations the first worker already has
  compare comparison smollm2_comparison_helper --model smollm2 --locate gradient_contrast --circuit-fraction 0.005 \
    --arms "base,$arm" --lrs "$arm=1e-4,1e-3" --budgets 1 --comparisons "$arm:base" &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do deliver "$copy" "$main"; sleep "${VERDICT_DELIVER_EVERY:-60}"; done
  wait $pid
  deliver "$copy" "$main"
}

smollm2_primary() {  # smollm2_primary TASK: section 10's SmolLM2 command on TASK (tier 1: comparison, tier 3: arithmetic)
  compare "$1" "smollm2_$1" --model smollm2 --locate gradient_contrast --circuit-fraction 0.005 \
    --arms base,located,twin,lora,cca_mask,cca_nomask --lrs "3e-4,1e-3,3e-3;cca_mask=1e-4,1e-3;cca_nomask=1e-4,1e-3" \
    --comparisons located@gradient_contrast:twin@gradient_contrast,located@gradient_contrast:lora,cca_mask:cca_nomask
}

gemma3_primary() {  # gemma3_primary TASK: section 10's Gemma-3 command on TASK (tier 1: comparison, tier 3: arithmetic)
  compare "$1" "gemma3_$1" --model gemma3-270m --locate ablation --circuit-fraction 0.05 --arms base,located,twin,lora \
    --lrs "1e-4,3e-4,1e-3;lora=3e-5,1e-4,3e-4" --comparisons located@ablation:twin@ablation,located@ablation:lora
}

smollm2() {  # smollm2 TIER
  local S=(--model smollm2)
  case $1 in
  1) smollm2_primary comparison ;;
  2) keep_tier1 smollm2_comparison
     compare comparison smollm2_comparison "${S[@]}" --locate gradient_contrast --circuit-fraction 0.005 \
       --arms base,located,twin,lora,cca_mask,cca_nomask,cca_twin,cca_sft,lora_matched,full \
       --lrs "3e-4,1e-3,3e-3;$CCA_LRS;full=1e-5,3e-5,1e-4" \
       --comparisons cca_mask:cca_twin,cca_sft:cca_mask,cca_sft:located@gradient_contrast,located@gradient_contrast:lora_matched@gradient_contrast,located@gradient_contrast:full
     local budgets
     budgets=$(tier1_budgets smollm2_comparison)
     compare comparison smollm2_comparison_grad2 "${S[@]}" --locate gradient --circuit-fraction 0.02 \
       --arms base,located,twin --lrs "3e-4,1e-3,3e-3" --comparisons located@gradient:twin@gradient \
       --budgets "$budgets" ;;
  3) smollm2_primary arithmetic ;;
  esac
}

gemma3() {  # gemma3 TIER
  local G=(--model gemma3-270m --locate ablation --circuit-fraction 0.05)
  case $1 in
  1) gemma3_primary comparison ;;
  2) keep_tier1 gemma3_comparison
     compare comparison gemma3_comparison "${G[@]}" --arms base,located,twin,lora,cca_mask,cca_nomask,cca_twin \
       --lrs "1e-4,3e-4,1e-3;lora=3e-5,1e-4,3e-4;$CCA_LRS" --comparisons cca_mask:cca_nomask,cca_mask:cca_twin ;;
  3) gemma3_primary arithmetic ;;
  esac
}

for tier in ${tiers//,/ }; do
  if [ "$tier" = 1 ] && [ -d "$R/${which}_comparison/tier1" ]; then
    echo "== verdict_v1 $which tier 1: finished (its outputs are in ${which}_comparison/tier1/)"; continue
  fi
  echo "== verdict_v1 $which tier $tier ($(date -u +%FT%TZ))"
  case $tier in helper:*) helper "${tier#helper:}" ;; *) "$which" "$tier" ;; esac
done
