"""Gradio demo of classifier-free guidance for text and images, on the embedded models.

Start it with::

    python -m demos.app            # http://127.0.0.1:7860
    python -m demos.app --port 8000 --host 0.0.0.0

Two tabs:

* **Text** (:mod:`demos.text_tab`): SmolLM2-135M-Instruct, unguided and guided continuations
  side by side, streamed token by token with tokens per second (guidance scale and schedule,
  negative prompt, typical sampling, sentiment steering with the shipped classifier).
* **Image** (:mod:`demos.image_tab`): the class-conditional digits diffusion model; one column
  of samples per guidance scale, drawn from the same initial noise, with the network
  evaluations each used (CFG, APG, guidance rescale, CFG-Zero*, CFG++; schedules; adaptive
  guidance).

Everything runs offline. The models load in a background thread at start-up
(:mod:`demos.models`; the page is served at once, a request that arrives earlier waits for
its model). Requests are queued, one generation per tab at a time, and every input is
bounded (:mod:`demos.common`), so concurrent users cannot exhaust memory. Bad input shows as
a message in the page.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

if __name__ == "__main__" and not __package__:  # `python demos/app.py` in a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import demos  # noqa: F401  (sets the offline environment before gradio and the hub client load)

import gradio as gr  # noqa: E402

from demos.common import LIMITS, LOG, SCHEDULES, make_schedule  # noqa: E402
from demos.image_tab import (  # noqa: E402
    IMAGE_METHODS,
    DigitsColumn,
    DigitsRequest,
    build_image_tab,
    make_guider,
    parse_scales,
    render_grid,
    sample_columns,
    sample_digits,
)
from demos.models import ModelStore  # noqa: E402
from demos.text_tab import TextRequest, build_text_tab, stream_text  # noqa: E402

__all__ = [
    "IMAGE_METHODS",
    "LIMITS",
    "SCHEDULES",
    "DigitsColumn",
    "DigitsRequest",
    "ModelStore",
    "TextRequest",
    "build_app",
    "main",
    "make_guider",
    "make_schedule",
    "parse_scales",
    "render_grid",
    "sample_columns",
    "sample_digits",
    "stream_text",
]

INTRO = """\
# guidance-decoding demo
Classifier-free guidance and its successors on the embedded models, offline.
**Text**: SmolLM2-135M-Instruct, the same seed with and without guidance.
**Image**: an 8×8 class-conditional digits diffusion model, one column per guidance scale from the same noise.
"""

CSS = """
.stats { min-height: 3.2em; }
"""


def build_app(store: ModelStore | None = None) -> gr.Blocks:
    """The two-tab Gradio app (not launched). ``store`` defaults to the embedded models."""
    store = store or ModelStore()
    with gr.Blocks(title="guidance-decoding demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            build_text_tab(store)
            build_image_tab(store)
    demo.queue(max_size=LIMITS.queue_size, default_concurrency_limit=1, api_open=False)
    return demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demos.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--share", action="store_true", help="also make a public gradio.live link (off by default)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="load each model on its first request instead of in the background at start",
    )
    return parser


def _set_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch is imported: every thread uses it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    """Serve the app (see ``python -m demos.app --help``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _set_threads(parser, args.threads)
    start = time.perf_counter()
    store = ModelStore()
    if not args.lazy:
        store.preload()
    demo = build_app(store)
    LOG.info("App built in %.1f s (since start of main)", time.perf_counter() - start)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        inbrowser=False,
        show_error=False,
        css=CSS,
        footer_links=[],
    )


if __name__ == "__main__":
    main()
