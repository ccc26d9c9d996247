#!/usr/bin/env bash
# The choice benchmark's samples (digits, tiny transformer, ResNet-like) on another host, for a quiet one:
# the agreement of pack / run.py / plain-loop p50s needs a host that does not drift. No zoo (its cache is
# 1.2 GB). Runs from the repository root with whatever python3 has edgepack's requirements; OpenVINO is
# optional (without it the cpu-x86 target's OpenVINO candidates are skipped, with the reason).
#   bash benchmarks/quiet_host.sh OUT_DIR [REPEATS]
set -uo pipefail
out=${1:?usage: quiet_host.sh OUT_DIR [REPEATS]}
repeats=${2:-3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  python3 --version; nproc; uptime
  python3 -c "import onnxruntime as o, numpy, onnx; print('onnxruntime', o.__version__, o.get_available_providers())"
  python3 -m edgepack doctor
} > "$out/host.txt" 2>&1
# a GPU target on this host: what is absent is detected and said, never measured
python3 -m edgepack pack samples/digits/model.onnx --target nvidia-cuda --calib samples/digits/calib.npz \
  --eval samples/digits/eval.npz --out /tmp/quiet-cuda --force > "$out/nvidia-cuda.txt" 2>&1
echo "exit $?" >> "$out/nvidia-cuda.txt"
[ -f /tmp/quiet-cuda/report.md ] && cp /tmp/quiet-cuda/report.md "$out/nvidia-cuda-report.md"
python3 benchmarks/choice.py --zoo --repeats "$repeats" 2>&1 | tee "$out/choice.log"
cp benchmarks/results/choice.md "$out/choice.md"; cp benchmarks/results/choice.json "$out/choice.json"
uptime >> "$out/host.txt"
