#!/usr/bin/env bash
# Build .carry/: what bench/gpu_check.sh needs on a lent GPU box that its image lacks.
#
#   bench/gpu_prepare.sh            # here, before each device call (downloads from PyPI once: ~150 MB, packs ~50 MB)
#   then the device call:  command "bash bench/gpu_check.sh", carry [".carry"], timeout_s 480
#
# The GPU image (Python 3.12, torch 2.11, torchvision, numpy 2.5, aiohttp, grpcio, pandas,
# pyarrow, pillow) lacks: the tritonserver binary, tritonclient, the gateway's web stack,
# pydantic-settings, pymilvus + milvus-lite (+ faiss-cpu), and a numpy<2 for the
# Python-backend stub (with numpy 2 the stub crashes on BYTES inputs and corrupts numpy
# tensors). Everything travels as .tar.xz of unpacked wheels (xz beats the wheels' zip by
# ~2x), under the device tool's 64 MiB limit for the whole working tree. The project itself
# travels installed too (project.tar.xz): its components import as imgsearch.gateway,
# imgsearch.export, ... only once installed (package-dir), not from the repository on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
PY=${PY:-.venv/bin/python}
# the device's Python; another minor only for bench/gpu_sim.sh (a CPU stand-in for the device image)
PYVER=${PYVER:-3.12}
LIMIT_MB=${LIMIT_MB:-60}
mkdir -p "$CARRY"
# kept out of git (the device tool carries it by name); .gitignore already covers .carry*/
git check-ignore -q "$CARRY/" || echo "/$CARRY/" >> "$(git rev-parse --git-path info/exclude)"

# the device is Python 3.12 on x86-64 (glibc 2.35+)
PLAT=(--python-version "$PYVER" --implementation cp --only-binary=:all: --no-deps
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform any)

# the launcher side (PYTHONPATH on the device): versions as tested in this repo's venv
SITE_PKGS=(
  tritonclient==2.73.0 python-rapidjson==1.25
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0 typing_extensions==4.16.0
  fastapi==0.163.2 starlette==0.52.1 annotated-doc==0.0.7 opentelemetry-api==1.45.2 importlib_metadata==10.2.0
  uvicorn==0.54.0 httptools==0.9.0 python-multipart==0.0.34 swagger-ui-bundle-v2==5.31.0
  pymilvus==3.0.2 milvus-lite==3.2.2 cachetools==8.0.2 orjson==3.13.0 faiss-cpu==1.15.1
  # the image has grpcio and protobuf, in versions not known here: bring the tested pair
  grpcio==1.85.3 protobuf==6.33.6
)
# the Python-backend stub's side only
STUB_PKGS=(numpy==1.26.4)

pack() {  # pack NAME PKG... : download wheels, unpack, strip tests and caches, tar.xz
  local name=$1; shift
  local out="$CARRY/$name.tar.xz"
  if [ -s "$out" ] && [ "$out" -nt "$0" ]; then echo "have $out"; return; fi
  local tmp; tmp=$(mktemp -d)
  "$PY" -m pip download -q "${PLAT[@]}" -d "$tmp/whl" "$@" 2>&1 | grep -v "^WARNING: Location" || true
  ls "$tmp"/whl/*.whl >/dev/null
  mkdir -p "$tmp/site"
  for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
  find "$tmp/site" -depth \( -name tests -o -name __pycache__ \) -type d -exec rm -rf {} +
  XZ_OPT=-9e tar -C "$tmp/site" -cJf "$out" .
  rm -rf "$tmp"
  ls -la "$out"
}

if [ ! -s "$CARRY/tritonbin.tar.xz" ]; then
  # tritonserver 2.51 + libraries + the Python backend with the 3.12 stub (about 27 MB)
  PACK=${PACK_TRITONSERVER:-/work/shared/tools/pack-tritonserver}
  "$PACK" "$CARRY/tritonbin.tar.xz" "$PYVER"
fi
pack site "${SITE_PKGS[@]}"
pack stubnumpy "${STUB_PKGS[@]}"

# the working tree as it is now, installed (pure Python: any interpreter builds it); repacked
# on every run so that the device never serves an older copy of the code
proj=$(mktemp -d)
had_build=$([ -e build ] && echo 1 || true)
"$PY" -m pip install -q --no-deps --no-compile --target "$proj/site" . 2>&1 | grep -v "^WARNING: Location" || true
[ -n "$had_build" ] || rm -rf build  # setuptools builds in the tree; not part of it
[ -d "$proj/site/imgsearch/gateway" ] || { echo "the project did not install into $proj/site" >&2; exit 1; }
rm -rf "$proj/site/bin"
XZ_OPT=-9e tar -C "$proj/site" -cJf "$CARRY/project.tar.xz" .
rm -rf "$proj"
ls -la "$CARRY/project.tar.xz"

total=$(du -cm "$CARRY"/*.tar.xz | tail -1 | cut -f1)
tree_kb=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "carry: ${total} MB in $CARRY (+ working tree ~$((tree_kb / 1024)) MB); device limit 64 MiB in all"
if [ "$total" -gt "$LIMIT_MB" ]; then
  echo "too big for the device call: drop faiss-cpu/milvus-lite from SITE_PKGS (search is then measured without Milvus)" >&2
  exit 1
fi
