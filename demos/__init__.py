"""Gradio demos of guidance-decoding (``python -m demos.app``).

Modules: :mod:`demos.common` (limits, input checks, page errors), :mod:`demos.models` (the
model store), :mod:`demos.text_tab` and :mod:`demos.image_tab` (one tab each: callbacks and
layout), :mod:`demos.app` (assembly and the command line).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
