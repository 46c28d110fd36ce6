#!/bin/bash
# The GPU checks, in one run on a machine with an NVIDIA GPU and CuPy, from the repository root:
# the `gpu` tests (tests/test_gpu.py: CuPy against NumPy, external GPU and CPU workers) and
# bench/gpu.py with CuPy. Results go to $OUT (default /tmp/m3dicom-gpu): pytest.log, cupy.json,
# bench.log, nvidia.txt.
#
# A machine that cannot reach PyPI gets the packages as wheels in .whl/ (Python 3.12, manylinux;
# see docs/gpu.md) and the plug-in entry points from m3dicom.egg-info/ (made by `make install`).
# The bone-model checks read Debian's Cranium.inv3: when it is not installed, from .gpu-data/cranium-slim.tar.xz
# (its volume alone, made by bench/gpu-check.sh's caller; see docs/gpu.md).
set -u
OUT=${OUT:-/tmp/m3dicom-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
CRANIUM=/usr/share/doc/invesalius-examples/examples/Cranium.inv3
if [ ! -e $CRANIUM ] && [ -e .gpu-data/cranium-slim.tar.xz ]; then   # its main.plist and matrix.dat only
    mkdir -p "$(dirname $CRANIUM)" && $PY -c "import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" \
        .gpu-data/cranium-slim.tar.xz > $CRANIUM
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia.txt"
$PY -c "import cupy; print('CuPy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())" \
    | tee -a "$OUT/nvidia.txt"
timeout ${TEST_TIMEOUT:-400} $PY -m pytest -p no:cacheprovider -p no:warnings -o addopts="" -s -rA \
    --timeout 300 tests/test_gpu.py > "$OUT/pytest.log" 2>&1
tests=$?
grep -E "GPU-|passed|failed|Error|error|assert" "$OUT/pytest.log" | head -60
timeout ${BENCH_TIMEOUT:-300} $PY bench/gpu.py --backend cupy --json "$OUT/cupy.json" ${BENCH_ARGS:-} \
    > "$OUT/bench.log" 2>&1
bench=$?
grep -v '^{' "$OUT/bench.log"
exit $(( tests || bench ))
