#!/usr/bin/env bash
# Rehearse the device call on this CPU box: bench/gpu_check.sh down its device path
# (unpack the carry, the stub's own numpy<2 environment, PYTHONPATH order) in a Python that
# looks like the GPU image, not like this repository's venv.
#
#   bench/gpu_sim.sh          # ~3 min here after the first build (~2 min, ~150 MB from PyPI)
#
# The stand-in image: a bare venv with numpy 2, the packages the device's image lists
# (/work/.library/device/KINDS.md: pillow, aiohttp, grpcio, protobuf, pandas, pyarrow, onnx,
# onnxruntime, ml-dtypes, requests, ...) and torch/torchvision linked from .venv; none of
# this project's dependencies. The carry is built for this Python's minor (.carry-sim/), as
# gpu_prepare.sh builds .carry/ for the device's 3.12. The plan is the dry run's (resnet18,
# torch engine on the CPU, short levels): it proves the script and the carry, not the GPU.
# What only the GPU can show (CUDA graphs, nvJPEG, KIND_GPU instances) stays for the device.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SIM=${SIM_IMAGE:-/tmp/imgsearch-gpu-sim-image}
OUT=${OUT:-$REPO/loadtest/out/gpu-sim}
# where torch is installed: the venv's own site-packages, or the one it sees through a .pth
VENV_SITE=$(.venv/bin/python -c "import pathlib, torch;print(pathlib.Path(torch.__file__).parents[1])")
PYVER=$(.venv/bin/python -c "import sys;print(f'{sys.version_info[0]}.{sys.version_info[1]}')")

if [ ! -x "$SIM/bin/python" ] || [ ! -f "$SIM/.ready" ]; then
  rm -rf "$SIM"
  "$(.venv/bin/python -c "import sys;print(getattr(sys,'_base_executable',sys.executable))")" -m venv "$SIM"
  # torch and torchvision (~5 GB) by reference, with the pure-Python packages they import
  mkdir -p "$SIM/linked"
  for d in torch torchgen torchvision torchvision.libs nvidia triton sympy mpmath networkx jinja2 markupsafe \
           fsspec filelock typing_extensions.py "$(cd "$VENV_SITE" && ls -d torch-*.dist-info)" \
           "$(cd "$VENV_SITE" && ls -d torchvision-*.dist-info)"; do
    [ -e "$VENV_SITE/$d" ] && ln -sfn "$VENV_SITE/$d" "$SIM/linked/$d"
  done
  echo "$SIM/linked" > "$SIM/lib/python$PYVER/site-packages/linked.pth"
  "$SIM/bin/pip" install -q "numpy>=2" pillow aiohttp grpcio protobuf pandas pyarrow onnx onnxruntime ml-dtypes \
    requests prometheus-client httpx anyio h11 click uvloop packaging pyyaml tqdm psutil 2>&1 \
    | grep -vE "dependency resolver|requires|incompatible|Location" || true
  touch "$SIM/.ready"
fi
"$SIM/bin/python" -c "import numpy, torch; assert int(numpy.__version__.split('.')[0]) >= 2, numpy.__version__
try:
    import pydantic_settings, fastapi, pymilvus, tritonclient  # noqa: F401
    raise SystemExit('the stand-in image has project packages: it would hide a missing carry')
except ImportError:
    pass
print('stand-in image: numpy', numpy.__version__, 'torch', torch.__version__)"

CARRY=.carry-sim PYVER=$PYVER bash bench/gpu_prepare.sh
rm -rf "$OUT" && mkdir -p "$OUT"
GPU_CHECK_DRY=1 GPU_CHECK_USE_CARRY=1 GPU_CHECK_CARRY_DIR=.carry-sim PY="$SIM/bin/python" OUT="$OUT" \
  GPU_CHECK_TMP=${GPU_CHECK_TMP:-/tmp/gc-sim} bash bench/gpu_check.sh
# every phase must have run: a failure here is one the device call would have met
"$SIM/bin/python" - "$OUT" <<'EOF'
import json, pathlib, sys
res = json.loads(next(pathlib.Path(sys.argv[1]).glob("gpu-*-dry.json")).read_text())
bad = {k: v["status"] for k, v in res["phases"].items() if v.get("status") != "ok"}
missing = [k for k in ("raw_model_img_s", "triton_img_s", "dyn_vs_nobatch", "indexer_img_s", "bytes_path_img_s",
                      "search_req_s")
           if not isinstance(res.get(k), (int, float))]
print("gpu_sim: phases", {k: v["status"] for k, v in res["phases"].items()}, "triton_input", res.get("triton_input"))
if bad or missing:
    sys.exit(f"gpu_sim: FAILED phases {bad} missing {missing}")
print("gpu_sim: ok - the device path of gpu_check.sh runs end to end")
EOF
