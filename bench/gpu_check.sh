#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py run) from the repository's sources, on a machine where the
# package may not be installed: `bash bench/gpu_check.sh --device cuda --pack .gpu_pack --out DIR`.
# Wheels in .whl/ (soundfile, soxr and cffi, for a bare GPU image) are installed into a scratch
# folder first when those modules are missing. Every argument goes to `gpu_check.py run`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import soundfile, soxr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/affectlens-wheels .whl/*.whl
  export PYTHONPATH=/tmp/affectlens-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
exec python3 bench/gpu_check.py run "$@"
