#!/usr/bin/env bash
# Here (with network access), before a GPU session: fill .gpu_carry/ (git-ignored) with what
# benchmarks/gpu_check.py needs on a bare CUDA machine without network, well under the 64 MiB that
# travel with the working tree (the `run` tool's carry: [".gpu_carry"]):
#   .gpu_carry/wheels/  ../shared/gpu/fetch-deps.sh's wheels + setup-here.sh, and Pillow + tqdm
#                       (Pillow reads the images; tqdm is the bundle's progress bar), Python 3.12
#   .gpu_carry/kvasir/  the first N Kvasir-SEG training images + masks, train.txt, and gaze.csv
#                       (their rows of the GazeMedSeg fixation CSV)
# Usage: bash benchmarks/gpu_prepare.sh [N=64]   (from the repository root)
set -euo pipefail
n=${1:-64}
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${GAZEMONAI_SHARED:-$root/../shared}
carry=$root/.gpu_carry
rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/kvasir/images" "$carry/kvasir/masks"
bash "$shared/gpu/fetch-deps.sh" "$carry/wheels" > /dev/null
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$carry/wheels" pillow tqdm
src=$shared/data/kvasir-seg
head -n "$n" "$src/train.txt" > "$carry/kvasir/train.txt"
while read -r id; do
  id=${id%.jpg}
  cp "$src/images/$id.jpg" "$carry/kvasir/images/" && cp "$src/masks/$id.jpg" "$carry/kvasir/masks/"
done < "$carry/kvasir/train.txt"
python3 - "$shared/data/gazemedseg/kvasir_fixation.csv" "$carry/kvasir" <<'PY'
import csv, sys
from pathlib import Path
keep = {line.strip().removesuffix(".jpg") + ".jpg" for line in open(Path(sys.argv[2]) / "train.txt") if line.strip()}
with open(sys.argv[1], newline="") as f, open(Path(sys.argv[2]) / "gaze.csv", "w", newline="") as g:
    rows = csv.reader(f)
    w = csv.writer(g)
    w.writerow(next(rows))
    n = sum(w.writerow(r) is not None for r in rows if r and r[0] in keep)
print(f"gaze.csv: {n} fixations of {len(keep)} images")
PY
du -sh "$carry" "$carry"/*
