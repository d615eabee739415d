#!/usr/bin/env bash
# SDXL end to end at full size on one GPU: bench/h200_e2e.sh with KIND=sdxl (its header says what it runs).
#   OUT=... bash bench/h200_sdxl_e2e.sh
KIND=sdxl exec bash bench/h200_e2e.sh "$@"
