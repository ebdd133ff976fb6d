# Source on the GPU machine (no registry there) to install the carried MLX CUDA wheels and
# put this tree on PYTHONPATH:  . benchmarks/gpu_env.sh WHEEL_DIR...
# Each WHEEL_DIR holds *.whl files and/or the parts of a wheel split to fit one call's
# 64 MiB (`split -b 46m X.whl X.whl.part.`): parts are joined in name order first.
# See benchmarks/gpu.py's docstring.
_tree=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_wheels=/tmp/agentd-wheels
mkdir -p "$_wheels"
for _d in "$@"; do
  cp -n "$_d"/*.whl "$_wheels"/ 2>/dev/null || true
  for _p in "$_d"/*.part.*; do [ -e "$_p" ] && cp -n "$_p" "$_wheels"/; done
done
for _first in "$_wheels"/*.part.aa; do
  [ -e "$_first" ] || continue
  _whl=${_first%.part.aa}
  cat "$_whl".part.* > "$_whl" && rm -f "$_whl".part.*
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$_wheels"/*.whl \
  || { echo "gpu_env.sh: wheel install failed"; return 1; }
# agentd's packages as pyproject maps them (agentd = daemon/, agentctl = client/ + launchd/).
rm -rf /tmp/agentd-pkgs && mkdir -p /tmp/agentd-pkgs/agentctl
ln -s "$_tree/daemon" /tmp/agentd-pkgs/agentd
ln -s "$_tree"/client/*.py /tmp/agentd-pkgs/agentctl/
ln -s "$_tree/launchd" /tmp/agentd-pkgs/agentctl/service
export PYTHONPATH=/tmp/agentd-pkgs:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), "cuda:", mx.cuda.is_available())'
