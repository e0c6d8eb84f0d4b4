# Sourced by scripts/shapes.sh and scripts/scenes.sh: strict mode, the repository root as working folder,
# the python to use (PY), and `stage MESSAGE`, which prints MESSAGE with the minutes since the start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
T0=$(date +%s)
stage() { echo "== [$(( ($(date +%s) - T0) / 60 )) min] $*"; }
