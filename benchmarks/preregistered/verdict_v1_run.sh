#!/bin/bash
# Run (or resume) tier 1 of the pre-registered verdict_v1 (verdict_v1.md, section 10 and Deviations 2-3) on the code it
# started with (commit 8d70bc2, in main's history through the merges of verdict-v1), checked out in its own worktree, so that later refactors of the library do not
# change the run halfway (evaluation decoding and sampling changed after it started). Results go into this checkout's
# benchmarks/results/verdict_v1/<model>_comparison/ (stages/*.json as each (arm, rate, seed) finishes).
#   usage: benchmarks/preregistered/verdict_v1_run.sh smollm2|gemma3 [DATA_DIR]   (DATA_DIR: ../shared/data)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
which=${1:?smollm2 or gemma3}
data=$(cd "${2:-$here/../shared/data}" && pwd)
code=8d70bc240adfcec70c4dd54f939ba02b6effdbeb
tree=${VERDICT_TREE:-$here/../verdict-run}
[ -d "$tree" ] || git -C "$here" worktree add --detach "$tree" $code
[ "$(git -C "$tree" rev-parse HEAD)" = $code ] || { echo "$tree is not at the run's commit $code" >&2; exit 2; }
cd "$tree"
export PYTHONPATH="$tree" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
D=benchmarks/preregistered/verdict_v1_data; R="$here/benchmarks/results/verdict_v1"
COMMON=(--answer number --validation-fraction 0.3333 --seeds 0,1,2,3,4 --checkpoints 3 --epochs 3 --batch-size 8
        --grid-extensions 2 --budgets lora,lora/10 --kl-chunks 4 --side-effects-data "$data" --max-new-tokens 32
        --dtype float32 --threads 1)
if [ "$which" = smollm2 ]; then
  exec "$here/.venv/bin/circuit-peft" compare --model smollm2 --data $D/comparison_pool.jsonl \
    --heldout $D/comparison_test.jsonl --shots comparison --locate gradient_contrast --circuit-fraction 0.005 \
    --arms base,located,twin,lora,cca_mask,cca_nomask --lrs "3e-4,1e-3,3e-3;cca_mask=1e-4,1e-3;cca_nomask=1e-4,1e-3" \
    --comparisons located@gradient_contrast:twin@gradient_contrast,located@gradient_contrast:lora,cca_mask:cca_nomask \
    "${COMMON[@]}" --out "$R/smollm2_comparison"
else
  exec "$here/.venv/bin/circuit-peft" compare --model gemma3-270m --data $D/comparison_pool.jsonl \
    --heldout $D/comparison_test.jsonl --shots comparison --locate ablation --circuit-fraction 0.05 \
    --arms base,located,twin,lora --lrs "1e-4,3e-4,1e-3;lora=3e-5,1e-4,3e-4" \
    --comparisons located@ablation:twin@ablation,located@ablation:lora "${COMMON[@]}" --out "$R/gemma3_comparison"
fi
