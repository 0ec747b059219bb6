#!/usr/bin/env bash
# Reproduces every table and figure of the paper (docs/method.md, section 7): results/tables.md and
# results/fig*.png, from runs kept in runs/paper (finished runs are skipped, unfinished resumed).
#
#   bash run_all.sh --quick          every configuration on tiny synthetic heads: a smoke run
#   bash run_all.sh [--seeds 3]      the paper's runs: needs the datasets and, realistically, a GPU
#   bash run_all.sh --real DIR       the real-face benchmark on BIWI (DIR from tools/biwi_to_npz.py):
#                                    results/biwi.md and results/biwi.png; add --ablations for the
#                                    variants of HMTL, --dev for the flip study, or --scarcity for
#                                    where HMTL helps (results/scarcity.md and results/scarcity.png)
#
# Dataset roots (not needed with --quick or --real):
#   ETHXGAZE_ROOT   folder of ETH-XGaze subjectXXXX.h5 files (the 224 px face-patch release)
#   W300LP_ROOT     the 300W_LP folder (AFW, HELEN, IBUG, LFPW and their _Flip versions)
#   AFLW2000_ROOT   the AFLW2000 folder (image*.jpg + image*.mat)
#   BIWI_NPZ        optional: FSA-Net's BIWI_noTrack.npz, to also evaluate Table 2's models on BIWI
# Table 2's ImageNet rows download torchvision's weights once; offline they are reported as not run.
set -euo pipefail
cd "$(dirname "$0")"
exec python reproduce.py "$@"
