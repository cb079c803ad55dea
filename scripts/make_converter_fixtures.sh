#!/usr/bin/env bash
# Rebuild tests/fixtures/converters/ from converters/designs.py, each framework in its own venv.
#
# Usage: scripts/make_converter_fixtures.sh [--install] [torch|sklearn|keras|jax|paddle ...]
#   --install   first create the missing venvs under $VENVS (default /work/venvs)
#   no names    rebuild every framework's fixtures
# Interpreters: $TORCH_PYTHON and $SKLEARN_PYTHON default to the python on PATH (the project's
# dev environment has torch, scikit-learn and skl2onnx); keras, jax and paddle use $VENVS/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."

VENVS=${VENVS:-/work/venvs}
OUT=tests/fixtures/converters
declare -A PYTHON=(
  [torch]=${TORCH_PYTHON:-python}
  [sklearn]=${SKLEARN_PYTHON:-python}
  [keras]=$VENVS/tf/bin/python
  [jax]=$VENVS/jax/bin/python
  [paddle]=$VENVS/paddle/bin/python
)
# the install line of each framework's venv, as in docs/converters.md
declare -A PACKAGES=(
  [keras]="tensorflow-cpu tf2onnx onnx onnxruntime"
  [jax]="jax jaxlib flax jax2onnx onnxruntime"
  [paddle]="paddlepaddle paddle2onnx onnxruntime onnx-graphsurgeon sympy"
)
declare -A VENV_NAME=([keras]=tf [jax]=jax [paddle]=paddle)

install=0
if [[ ${1:-} == --install ]]; then install=1; shift; fi
frameworks=("$@")
[[ ${#frameworks[@]} -gt 0 ]] || frameworks=(torch sklearn keras jax paddle)

for framework in "${frameworks[@]}"; do
  [[ -n ${PYTHON[$framework]:-} ]] || { echo "make_converter_fixtures: unknown framework $framework" >&2; exit 2; }
  venv=${VENV_NAME[$framework]:-}
  if [[ $install == 1 && -n $venv && ! -x $VENVS/$venv/bin/python ]]; then
    python3 -m venv "$VENVS/$venv"
    # shellcheck disable=SC2086  # the package list is meant to split
    "$VENVS/$venv/bin/pip" install -q ${PACKAGES[$framework]}
  fi
  echo "== $framework (${PYTHON[$framework]})"
  "${PYTHON[$framework]}" converters/fixtures.py "$framework" --out "$OUT"
done
