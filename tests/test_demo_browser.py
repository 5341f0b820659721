"""End to end: the demo app in a subprocess on localhost, driven by headless Chromium (Playwright for Python).

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and ``pip install playwright``
(``.ci/install_browser.sh``); Playwright's own browser download is never used. Skips, saying why,
only where either is missing. Screenshots of both tabs go to ``artifacts/`` (git-ignored).

Runs are kept short for CI (a few tokens, a few diffusion steps, a small grid). With
``GUIDANCE_DEMO_README=1`` the tests use fuller settings, for the README screenshots::

    GUIDANCE_DEMO_README=1 python -m pytest tests/test_demo_browser.py -m browser
    cp artifacts/demo_text.png artifacts/demo_image.png docs/images/
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("GUIDANCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
README = os.environ.get("GUIDANCE_DEMO_README") == "1"
NEW_TOKENS = 48 if README else 6
IMAGE_SCALES = "1, 2, 3, 5" if README else "1, 3"
IMAGE_SAMPLES = 4 if README else 2
IMAGE_STEPS = 20 if README else 6
STARTUP_TIMEOUT_S = 240
TEXT_TIMEOUT_S = 600 if README else 300
IMAGE_TIMEOUT_S = 180

if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: run .ci/install_browser.sh (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed: run .ci/install_browser.sh"
)
pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_served(url: str, process: subprocess.Popen, log: Path) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < STARTUP_TIMEOUT_S:
        if process.poll() is not None:
            pytest.fail(f"the app exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def app_url():
    """``python -m demos.app`` on a free localhost port; yields its URL, stops it afterwards."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    log = ARTIFACTS / "demo_app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "w") as handle:
        # One torch thread: on 2 busy CI cores more threads only wait on each other (and on Chromium).
        process = subprocess.Popen(
            [sys.executable, "-m", "demos.app", "--port", str(port), "--threads", "1"],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, process, log)
        print(f"\napp served after {time.perf_counter() - started:.1f} s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium with a fresh profile."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page()
    page.goto(app_url)
    page.wait_for_selector("#text-generate", timeout=60_000)
    yield page
    page.close()


def _set_number(page, elem_id: str, value: float | int) -> None:
    """Type into the number box of a gradio Slider or Number."""
    box = page.locator(f"#{elem_id} input[type='number']").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _set_text(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type='text']").first.fill(value)


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").first.input_value()


def test_text_tab_streams_unguided_and_guided_side_by_side(page):
    _set_text(page, "text-prompt", "Write a short review of a pizza restaurant.")
    _set_text(page, "text-negative", "Write a short negative review.")
    _set_number(page, "text-scale", 3)
    _set_number(page, "text-tokens", NEW_TOKENS)
    # Record every state of both output boxes, to see the text arrive token by token.
    page.evaluate(
        """() => {
            window.__seen = {unguided: [], guided: []};
            window.__recorder = setInterval(() => {
                for (const name of ["unguided", "guided"]) {
                    const value = document.querySelector(`#text-${name} textarea`).value;
                    const seen = window.__seen[name];
                    if (seen[seen.length - 1] !== value) seen.push(value);
                }
            }, 20);
        }"""
    )
    start = time.perf_counter()
    page.locator("#text-generate").click()
    stats = page.locator("#text-guided-stats")
    sync_api.expect(stats).to_contain_text("(done)", timeout=TEXT_TIMEOUT_S * 1000)
    seconds = time.perf_counter() - start
    seen = page.evaluate("() => { clearInterval(window.__recorder); return window.__seen; }")

    unguided, guided = _value(page, "text-unguided"), _value(page, "text-guided")
    assert unguided.strip() and guided.strip()
    unguided_stats = page.locator("#text-unguided-stats").inner_text()
    guided_stats = stats.inner_text()
    assert "tokens/s" in unguided_stats and "(done)" in unguided_stats and "plain sampling" in unguided_stats
    assert "tokens/s" in guided_stats and "CFG w = 3" in guided_stats and "negative prompt" in guided_stats
    # Streamed: each box showed partial texts (prefixes of its final text) before the final one.
    for name, final in (("unguided", unguided), ("guided", guided)):
        partial = [text for text in seen[name] if text and text != final]
        assert partial, (name, seen[name])
        assert all(final.startswith(text.rstrip()) for text in partial), (name, seen[name])
    page.screenshot(path=str(ARTIFACTS / "demo_text.png"), full_page=True)
    states = {name: len(values) for name, values in seen.items()}
    print(f"\ntext tab: {NEW_TOKENS} + {NEW_TOKENS} tokens in {seconds:.1f} s; states seen: {states}")


def test_image_tab_shows_a_grid_and_network_evaluations(page):
    page.get_by_role("tab", name="Image").click()
    page.wait_for_selector("#image-generate", timeout=10_000)
    _set_text(page, "image-scales", IMAGE_SCALES)
    _set_number(page, "image-samples", IMAGE_SAMPLES)
    _set_number(page, "image-steps", IMAGE_STEPS)
    if README:  # show adaptive guidance's savings in the screenshot
        page.locator("#image-adaptive input[type='checkbox']").check()
    start = time.perf_counter()
    page.locator("#image-generate").click()
    image = page.locator("#image-grid img").first
    sync_api.expect(image).to_be_visible(timeout=IMAGE_TIMEOUT_S * 1000)
    page.wait_for_function(
        "() => { const img = document.querySelector('#image-grid img'); return img && img.complete && img.naturalWidth > 0; }",
        timeout=30_000,
    )
    seconds = time.perf_counter() - start
    scales = [float(s) for s in IMAGE_SCALES.split(",")]
    table = page.locator("#image-table")
    sync_api.expect(table).to_contain_text(f"w = {scales[-1]:g}", timeout=30_000)
    text = table.inner_text()
    # Scale 1 runs the conditional rows only: steps x samples network evaluations; the others twice that
    # (less with adaptive guidance).
    assert str(IMAGE_STEPS * IMAGE_SAMPLES) in text
    assert README or str(2 * IMAGE_STEPS * IMAGE_SAMPLES) in text
    width = page.evaluate("() => document.querySelector('#image-grid img').naturalWidth")
    assert width > 100
    page.screenshot(path=str(ARTIFACTS / "demo_image.png"), full_page=True)
    print(
        f"\nimage tab: {len(scales)} scales x {IMAGE_SAMPLES} samples x {IMAGE_STEPS} steps in {seconds:.1f} s"
    )


def test_stop_ends_the_generation_on_the_server(page):
    _set_number(page, "text-tokens", 128)
    page.locator("#text-generate").click()
    page.wait_for_function(
        "() => document.querySelector('#text-unguided textarea').value.length > 0",
        timeout=TEXT_TIMEOUT_S * 1000,
    )
    page.locator("#text-stop").click()
    log = ARTIFACTS / "demo_app.log"
    deadline = time.perf_counter() + 60
    while "Generation stopped after" not in log.read_text() and time.perf_counter() < deadline:
        time.sleep(0.2)
    assert "Generation stopped after" in log.read_text()
    # The queue is free again: a short request goes through.
    _set_number(page, "text-tokens", 2)
    page.locator("#text-generate").click()
    sync_api.expect(page.locator("#text-guided-stats")).to_contain_text(
        "2 tokens", timeout=TEXT_TIMEOUT_S * 1000
    )


def test_bad_input_shows_a_message_not_a_traceback(page):
    _set_text(page, "text-prompt", "   ")
    page.locator("#text-generate").click()
    sync_api.expect(page.get_by_text("Prompt is empty").first).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Image").click()
    _set_text(page, "image-scales", "1, two")
    page.locator("#image-generate").click()
    sync_api.expect(page.get_by_text("Scales: 'two' is not a number").first).to_be_visible(timeout=30_000)
    assert "Traceback" not in page.content()
