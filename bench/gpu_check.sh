#!/usr/bin/env bash
# GPU throughput check, one call on a lent H100/H200, under 6 minutes:
# raw model vs Triton (dynamic batching vs none) vs indexer vs /v1/search, same run, same GPU.
#
#   bench/gpu_prepare.sh                      # here, once: builds .carry/ (~50 MB)
#   device run: command "bash bench/gpu_check.sh", carry [".carry"], timeout_s 480
#   -> $OUT/gpu-<date>.json (+ logs); copy it to bench/results/ and commit it
#
#   GPU_CHECK_DRY=1 bench/gpu_check.sh        # on a CPU: the script end to end, tiny model,
#                                                # short durations (figures meaningless)
#
# On the device: Python 3.12 with torch/torchvision/numpy 2.5; .carry/ brings the wheel's
# tritonserver, the launcher-side packages (tritonclient, gateway stack, pymilvus +
# milvus-lite + faiss), numpy<2 for the Python-backend stub, and this project installed
# (project.tar.xz). The stub takes its packages from the first python3 on the server's PATH
# (PYTHONPATH is not honoured there), so it gets a small environment of its own: numpy 1.26
# first, then the image's site-packages and the installed project (for imgsearch, which the
# preprocess model imports).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s)
export OUT=${OUT:-$REPO/loadtest/out}
mkdir -p "$OUT"
T=${GPU_CHECK_TMP:-/tmp/gc}
rm -rf "$T" && mkdir -p "$T"
export GPU_CHECK_WORK=$T/work

CARRY=${GPU_CHECK_CARRY_DIR:-.carry}
PROJECT=$REPO  # where the stub finds imgsearch: the venv's editable install maps it to the repository
if [ "${GPU_CHECK_DRY:-}" = 1 ] && [ "${GPU_CHECK_USE_CARRY:-}" != 1 ]; then
  PY=${PY:-$REPO/.venv/bin/python}
  BUDGET=${GPU_CHECK_BUDGET_S:-900}
else
  # the device path; bench/gpu_sim.sh also takes it on a CPU (GPU_CHECK_DRY=1 GPU_CHECK_USE_CARRY=1)
  PY=${PY:-python3}
  if [ "${GPU_CHECK_DRY:-}" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-900}; else BUDGET=${GPU_CHECK_BUDGET_S:-345}; fi
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2; df -h /dev/shm | tail -1
    "$PY" -c "import sys,torch,torchvision,numpy;print(sys.version.split()[0],torch.__version__,torchvision.__version__,numpy.__version__,torch.cuda.get_device_name())"
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  for f in tritonbin site stubnumpy project; do
    [ -s "$CARRY/$f.tar.xz" ] || { echo "missing $CARRY/$f.tar.xz: run bench/gpu_prepare.sh and carry $CARRY" >&2; exit 2; }
  done
  "$PY" - "$T" "$CARRY" <<'EOF' || exit 2
import sys, tarfile
t, carry = sys.argv[1], sys.argv[2]
for name, dest in (("tritonbin", "tb"), ("site", "site"), ("stubnumpy", "stubnumpy"), ("project", "project")):
    with tarfile.open(f"{carry}/{name}.tar.xz") as tf:
        tf.extractall(f"{t}/{dest}")
EOF
  # the launcher (and uvicorn, milvus-lite, clients) import the carried packages first, then
  # the installed project; the pytriton/ folder of the packed binary is found as a namespace
  # package by LocalTriton; the repository last, for bench/ and harness/ (not installed).
  # PYTHONSAFEPATH: `python -m` must not put the working directory (the repository, whose
  # imgsearch/ lacks the components) before the installed project, here or in any child.
  PROJECT=$T/project
  export PYTHONPATH=$T/site:$PROJECT:$T/tb:$REPO${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONSAFEPATH=1
fi

# the stub's environment: a venv-shaped folder whose python3 is the base interpreter
VER=$("$PY" -c "import sys;print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
BASE=$("$PY" -c "import sys;print(getattr(sys,'_base_executable',sys.executable))")
SITE=$("$PY" -c "import site;print(site.getsitepackages()[0])")
SP=$T/stubenv/lib/python$VER/site-packages
mkdir -p "$T/stubenv/bin" "$SP"
ln -sf "$BASE" "$T/stubenv/bin/python3"
printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' "$(dirname "$BASE")" "$VER" > "$T/stubenv/pyvenv.cfg"
[ -d "$T/stubnumpy" ] && cp -r "$T/stubnumpy"/. "$SP"/
printf 'import site; site.addsitedir(%s)\n%s\n' "'$SITE'" "$PROJECT" > "$SP/zz_imgsearch.pth"
export GPU_CHECK_STUB_PYTHON=$T/stubenv/bin
# the stub links libpython<ver>.so.1.0: where the interpreter keeps it (the calibration found it in
# /usr/lib/x86_64-linux-gnu on the device; a pyenv build keeps it in its own lib/)
LIBDIR=$("$PY" -c "import sysconfig;print(sysconfig.get_config_var('LIBDIR') or '')")
export LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$T/stubenv/bin/python3" -c "import numpy, torch, PIL, imgsearch.imaging; print('stub env: numpy', numpy.__version__, 'torch', torch.__version__)" \
  || { echo "the stub environment is broken" >&2; exit 2; }

export GPU_CHECK_BUDGET_S=$((BUDGET - ($(date +%s) - START)))
echo "setup $(($(date +%s) - START))s; bench budget ${GPU_CHECK_BUDGET_S}s"
timeout -k 10 $((GPU_CHECK_BUDGET_S + 25)) "$PY" -m bench.gpu 2>&1 \
  | grep --line-buffered -v -iE "unclosed|connector|connections:" | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
for f in tritonserver.log gateway.log milvus.log index_report.json; do
  [ -f "$GPU_CHECK_WORK/$f" ] && tail -c 4000000 "$GPU_CHECK_WORK/$f" > "$OUT/$f"
done
# the markdown for the issue note, from the result file alone (bench/gpu_summary.py)
for f in "$OUT"/gpu-*.json; do
  [ -f "$f" ] && "$PY" -m bench.gpu_summary "$f" > "$OUT/summary.md" 2>&1
done
echo "gpu_check: rc=$rc in $(($(date +%s) - START))s; files in $OUT"
exit "$rc"
