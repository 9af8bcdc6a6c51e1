#!/usr/bin/env bash
# The accuracy tables of docs/results.md on the bundled model: every method x budget on the three held-out
# question sets, the matched-budget baselines of the seeds' claims, ST3's annealing on scene captions,
# then the claims themselves (scripts/accuracy_claims.py). Each `vtprune eval` call appends to the same
# OUT/results.jsonl (a rerun skips what is done, so an interrupted grid resumes); the unpruned model's
# answers are computed once.
#
# Usage: scripts/accuracy_grid.sh OUT [N] [N_CAPTIONS] [N_SCENES]
#   N questions per set (default 200), captions N_CAPTIONS (100), scene questions N_SCENES (650: the test
#   scenes interleave subject / background / periphery questions, and 650 gives each kind >= 200, the
#   claims' paired tests per kind)
# Stages run in order of what the claims need, so a partial run already answers them.
set -euo pipefail
OUT=${1:?usage: scripts/accuracy_grid.sh OUT [N] [N_CAPTIONS]}
N=${2:-200}
NC=${3:-100}
NS=${4:-650}
V=${VTPRUNE:-.venv/bin/vtprune}
SETS=imagenet-pope,easy-vqa,imagenet-category
GRID=parvts,st3,fastv,vtw,pdrop,visionzip,random,pool
# the claims' ablations (ParVTS with its non-subject path off, VisionZip's dominant tokens only) at 12.5 % only
METHODS=$GRID,parvts:fusion=fixed:alpha=1,visionzip:contextual=0
# FastV / random / pool / VisionZip at the equivalent budgets of ParVTS @ 12.5 % (42 of 196 visual tokens, 21.5 %) and
# of ST3's defaults (64, 32.8 %) on the bundled model's 30 layers (FastV at K = 2: (2 x 196 + 28 x b) / 30)
MATCHED=st3@default,fastv@31,random@42,pool@42,visionzip@42,fastv@55,random@64,pool@64,visionzip@64
mkdir -p "$OUT"
run() { echo "+ vtprune eval $*" | tee -a "$OUT/commands.txt"; "$V" eval --no-progress --out "$OUT" "$@"; }

run --data scenes --limit "$NS" --methods "$METHODS" --budgets 12.5%
run --data scenes --limit "$NS" --methods "$MATCHED"
run --data "$SETS" --limit "$N" --methods "$METHODS" --budgets 12.5%
run --data "$SETS" --limit "$N" --methods "$MATCHED"
run --data scene-captions --limit "$NC" --budgets 12.5% \
    --methods parvts,fastv,visionzip,random,pool,st3@default,st3:anneal=none@default,st3:anneal_every=1@default,st3:anneal_every=4@default,st3:anneal_every=8@default
run --data imagenet-naming --limit "$N" --budgets 12.5% --methods parvts,st3@default,fastv,visionzip,random,pool
for budget in 25% 6.25% 50%; do  # one budget per call: an interrupted grid still has whole columns
    run --data scenes --limit "$NS" --methods "$GRID" --budgets "$budget"
    run --data "$SETS" --limit "$N" --methods "$GRID" --budgets "$budget"
done
"$V" eval --tables-only --out "$OUT"
.venv/bin/python scripts/accuracy_claims.py "$OUT"
