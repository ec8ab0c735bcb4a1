#!/usr/bin/env bash
# The gpu32 protocol (Fashion-MNIST 32x32, 15.7M-parameter UNet; see benchmarks/protocols.py) on one CUDA GPU:
# uniform, KNN-8, candidate-scope NoiseRater (argmax) at seeds 0-2 and the oracle at seed 0, FD on 5,000
# generated vs 5,000 real test images. Results land in benchmarks/results/gpu32/ and are reported in their own
# section of BENCHMARKS.md. Resumable: run it again to continue.
#
#   bash benchmarks/gpu_benchmark.sh                         # the whole protocol (about 1 h on one large GPU)
#   MAX_HOURS=0.2 bash benchmarks/gpu_benchmark.sh           # one piece within 12 minutes
#   bash benchmarks/gpu_benchmark.sh --methods uniform knn --seeds 0     # any run_benchmark.py options
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: the gpu32 protocol needs a CUDA GPU (torch.cuda.is_available() is False)')"
FMNIST="${NOISE_RATER_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
for f in train-images-idx3-ubyte.gz t10k-images-idx3-ubyte.gz; do
  if [ ! -f "$FMNIST/$f" ]; then
    echo "error: $FMNIST/$f not found (apt-get install dataset-fashion-mnist, or set NOISE_RATER_FASHION_MNIST_DIR)" >&2
    exit 2
  fi
done
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
"$PY" benchmarks/run_benchmark.py --protocol gpu32 --max_hours "${MAX_HOURS:-2.3}" "$@"
"$PY" benchmarks/report.py
