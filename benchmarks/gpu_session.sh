#!/usr/bin/env bash
# The GPU checks and benchmarks of one session on a lent H100/H200, in one command:
#   bash benchmarks/gpu_session.sh [step|tests|unet|speed|sdxl|all]      (default all)
# Writes logs and results to $OUT (default benchmarks/results/gpu-run). Python packages the
# machine lacks (diffusers; onnxscript and onnx-ir for the onnxruntime backend's export) travel
# as wheels in .whl/ (see the device notes), installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
what=${1:-all}

# the compiled ops for Hopper (C++ and CUDA); torch finds the toolkit from CUDA_HOME (else from
# where nvcc is, which may be a link outside the toolkit)
if [[ -z ${CUDA_HOME:-} && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi
TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
python3 -m pyinv info --json > "$OUT/info.json" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.csv" 2>&1

if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_guided_step_cuda.py tests/test_guided_step.py \
    -k "gpu or dispatch or opcheck" > "$OUT/gpu-tests.log" 2>&1
  tail -3 "$OUT/gpu-tests.log"
  # the compile backend's CUDA-graph replay against eager on whole edits
  python3 -m pytest -q -p no:cacheprovider tests/test_backends.py -k cuda_graphs > "$OUT/backend-tests.log" 2>&1
  tail -3 "$OUT/backend-tests.log"
fi
if [[ $what == step || $what == all ]]; then
  for dt in fp16 fp32; do
    python3 benchmarks/bench_step.py --device cuda --dtype $dt --size 64 --size 128 --batch 3 --batch 8 \
      --json "$OUT/step-gpu-$dt.json" > "$OUT/step-gpu-$dt.log" 2>&1
    tail -8 "$OUT/step-gpu-$dt.log"
  done
fi
if [[ $what == unet || $what == all ]]; then
  # one UNet call per backend at batch 1-4 (SD 1.5 architecture, 64² latents, fp16); the
  # onnxruntime rows need onnxruntime-gpu (its CUDA provider), else they report why not
  python3 benchmarks/bench_unet.py --model sd15-arch --device cuda --dtype fp16 --resolution 64 \
    --backend eager --backend compile --backend onnxruntime --batch 1 --batch 2 --batch 3 --batch 4 \
    --json "$OUT/unet-sd15-arch.json" > "$OUT/unet.log" 2>&1
  tail -14 "$OUT/unet.log"
fi
if [[ $what == speed || $what == all ]]; then
  python3 -m pyinv benchmark --model sd15-arch --device cuda --dtype fp16 --backend eager --backend compile \
    --method direct --method ddim --method negative-prompt -q \
    --json "$OUT/speed-sd15-arch.json" --markdown "$OUT/speed-sd15-arch.md" --plot "$OUT/speed-sd15-arch.png" \
    > "$OUT/speed.log" 2>&1
  tail -16 "$OUT/speed.log"
fi
if [[ $what == sdxl || $what == all ]]; then
  # SDXL base's architecture (random weights, built on the GPU in fp16): Direct + P2P at 1024²,
  # 50 steps, end to end and peak memory (targets: <= 4 s, <= 12 GiB), eager and compile
  python3 -m pyinv benchmark --model sdxl-arch --device cuda --dtype fp16 --backend eager --backend compile \
    --method direct --control p2p --no-baseline --warmup 1 --repeats 3 -q \
    --json "$OUT/speed-sdxl-arch-1024.json" --markdown "$OUT/speed-sdxl-arch-1024.md" \
    > "$OUT/speed-sdxl.log" 2>&1
  tail -8 "$OUT/speed-sdxl.log"
fi
