#!/usr/bin/env bash
# Every table and figure: each study of reproduce.py is data (studies/), run by one runner; finished
# runs are skipped, unfinished ones resumed, runs made with other settings run again.
#
#   bash run_all.sh paper --quick --seeds 1 --out results/smoke   every configuration of the paper, tiny: a smoke run
#   bash run_all.sh paper [--seeds 3]     the paper's Tables 1-4 and Figs. 3-7: needs the datasets and a GPU
#   bash run_all.sh biwi DIR              the BIWI benchmark (DIR from tools/biwi_to_npz.py): results/biwi.md
#                                         and .png; --ablations adds the variants of HMTL, --dev the flip study
#   bash run_all.sh scarcity DIR          where HMTL helps: results/scarcity.md and .png
#   bash run_all.sh STUDY ... --report    the tables and figures from the runs that finished, training none
#
# Dataset roots of the paper's study (not needed with --quick):
#   ETHXGAZE_ROOT   folder of ETH-XGaze subjectXXXX.h5 files (the 224 px face-patch release)
#   W300LP_ROOT     the 300W_LP folder (AFW, HELEN, IBUG, LFPW and their _Flip versions)
#   AFLW2000_ROOT   the AFLW2000 folder (image*.jpg + image*.mat)
#   BIWI_NPZ        optional: FSA-Net's BIWI_noTrack.npz, to also evaluate Table 2's models on BIWI
# Table 2's ImageNet rows download torchvision's weights once; offline they are reported as not run.
set -euo pipefail
cd "$(dirname "$0")"
exec python reproduce.py "$@"
