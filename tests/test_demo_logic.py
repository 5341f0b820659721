"""The demo app's callbacks without a browser: tiny random-weight models, real guidance code."""

from __future__ import annotations

import inspect
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `demos` is not an installed package
    sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from demos import app, common, image_tab, text_tab  # noqa: E402
from guidance.lm import generate_text  # noqa: E402
from guidance.models.digits import DigitsPipeline, build_digits_unet, load_digits_scheduler  # noqa: E402
from guidance.schedules import Constant, Cosine, Linear  # noqa: E402

WORDS = ["<pad>", "<bos>", "<eos>", "good", "bad", "the", "movie", "was"] + [f"w{i}" for i in range(88)]
TEXT_DEFAULTS = {
    "prompt": "the movie was",
    "negative_prompt": "bad",
    "scale": 2.0,
    "schedule": "constant",
    "ramp_start": 1.0,
    "adaptive": False,
    "adaptive_threshold": 4.0,
    "do_sample": False,
    "typical_p": 0.9,
    "steering": False,
    "steering_target": "positive",
    "steering_strength": 8.0,
    "max_new_tokens": 6,
    "seed": 0,
}
IMAGE_DEFAULTS = {
    "digit": 3,
    "method": "CFG",
    "scales": "1, 3",
    "schedule": "constant",
    "ramp_start": 1.0,
    "adaptive": False,
    "threshold": 0.99,
    "min_steps": 0,
    "samples": 3,
    "steps": 4,
    "seed": 0,
}


def text_inputs(**overrides):
    values = {**TEXT_DEFAULTS, **overrides}
    return [values[name] for name in TEXT_DEFAULTS]


def image_inputs(**overrides):
    values = {**IMAGE_DEFAULTS, **overrides}
    return [values[name] for name in IMAGE_DEFAULTS]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is fastest, and spares a busy CI machine thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def word_tokenizer():
    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


@pytest.fixture(scope="module")
def word_lm():
    """A tiny random Llama over the 96 words, with no end-of-sequence token (every run makes all its tokens)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # spread the logits: greedy choices far from ties
        model.lm_head.weight[:3] = 0.0  # special tokens (decoded as "") rarely win
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class PositiveIfGood:
    """A sentiment classifier stand-in: positive when the text contains "good"; records its calls."""

    label2id = {"negative": 0, "positive": 1}

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        positive = torch.tensor([0.95 if "good" in text.split() else 0.05 for text in texts])
        return torch.stack([1 - positive, positive], dim=-1)


class AlwaysRight:
    """A judge stand-in that classifies every image as ``digit``."""

    def __init__(self, digit):
        self.digit = digit

    def predict(self, images):
        return torch.full((images.shape[0],), self.digit)


def random_digits_pipeline():
    pipe = DigitsPipeline(unet=build_digits_unet(seed=0).eval(), scheduler=load_digits_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def no_load():
    raise AssertionError("this model must not be loaded here")


def missing_judge():
    raise FileNotFoundError("no judge here")


ModelStore = app.ModelStore  # the real class, also while a test replaces `app.ModelStore`


def unloadable_store(**loaders):
    kinds = {
        "lm_loader": no_load,
        "sentiment_loader": no_load,
        "digits_loader": no_load,
        "judge_loader": no_load,
    }
    return ModelStore(**{**kinds, **loaders})


@pytest.fixture(scope="module")
def store(word_lm, word_tokenizer):
    return app.ModelStore(
        lm_loader=lambda: (word_lm, word_tokenizer),
        sentiment_loader=PositiveIfGood,
        digits_loader=random_digits_pipeline,
        judge_loader=lambda: AlwaysRight(IMAGE_DEFAULTS["digit"]),
    )


def run_text(store, **overrides):
    outputs = list(app.stream_text(store, *text_inputs(**overrides)))
    return outputs, outputs[-1]


# ----------------------------------------------------------------------------- text tab
def test_unguided_and_guided_columns_match_the_library(store, word_lm, word_tokenizer):
    outputs, (unguided, guided, unguided_stats, guided_stats) = run_text(store)
    inputs = word_tokenizer(["the movie was"], return_tensors="pt")
    plain = word_lm.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert unguided == word_tokenizer.decode(plain[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    expected = generate_text(
        word_lm, word_tokenizer, "the movie was", negative_prompts="bad", guidance_scale=2.0, max_new_tokens=6
    )
    assert guided == expected.texts[0]
    assert "6 tokens" in unguided_stats and "tokens/s" in unguided_stats and "(done)" in unguided_stats
    assert "6 tokens" in guided_stats and "CFG w = 2" in guided_stats and "negative prompt" in guided_stats


def test_text_streams_token_by_token(store):
    outputs, final = run_text(store, max_new_tokens=6)
    unguided_states = [out[0] for out in outputs]
    guided_states = [out[1] for out in outputs]
    # Every new word is shown on its own: the text grows one word at a time in each column.
    assert len(set(unguided_states)) == 7 and len(set(guided_states)) == 7
    growing = [len(text.split()) for text in dict.fromkeys(unguided_states)]
    assert growing == list(range(7))
    # The guided column waits until the unguided one is done (each measured alone).
    first_guided = next(i for i, out in enumerate(outputs) if out[1])
    assert all(out[0] == final[0] for out in outputs[first_guided:])


def test_guidance_off_warns_and_both_columns_agree(store):
    with pytest.warns(UserWarning, match="Guidance is off"):
        _, (unguided, guided, _, guided_stats) = run_text(
            store, scale=1.0, do_sample=True, typical_p=0.8, seed=7
        )
    assert unguided == guided
    assert "guidance off" in guided_stats


def test_schedules_reach_generate(store, word_lm, word_tokenizer):
    _, (_, guided, _, stats) = run_text(store, schedule="linear", ramp_start=0.5, scale=4.0)
    expected = generate_text(
        word_lm,
        word_tokenizer,
        "the movie was",
        negative_prompts="bad",
        guidance_schedule=Linear(0.5, 4.0),
        max_new_tokens=6,
    )
    assert guided == expected.texts[0]
    assert "linear w 0.5 → 4" in stats


def test_adaptive_control_reaches_generate_and_reports_positions(store, word_lm, word_tokenizer):
    _, (_, guided, _, stats) = run_text(store, adaptive=True, adaptive_threshold=6.0)
    expected = generate_text(
        word_lm, word_tokenizer, "the movie was", negative_prompts="bad", guidance_scale=2.0, max_new_tokens=6,
        guidance_adaptive=6.0,
    )
    counts = expected.adaptive_stats
    assert guided == expected.texts[0]
    assert "adaptive, threshold 6 nats" in stats
    computed, needed = int(counts.unconditional_positions[0]), int(counts.live_cfg_positions[0])
    assert f"unconditional positions computed: {computed} of {needed}" in stats
    assert f"tokens guided: {int(counts.guided_steps[0])} of 6" in stats
    # Threshold 0 skips every token: the guided column is the conditional model alone, nothing unconditional runs.
    _, (unguided, guided, _, stats) = run_text(store, adaptive=True, adaptive_threshold=0.0)
    assert guided == unguided and "unconditional positions computed: 0 of" in stats
    # Off: the note says nothing about adaptive guidance.
    assert "adaptive" not in run_text(store)[1][3]


def test_sampling_is_seeded(store):
    first = run_text(store, do_sample=True, typical_p=0.5, seed=11)[1]
    again = run_text(store, do_sample=True, typical_p=0.5, seed=11)[1]
    assert first[:2] == again[:2]


def test_steering_calls_the_classifier_on_the_guided_column_only(store):
    classifier = store.sentiment()
    before = classifier.calls
    _, (_, _, unguided_stats, guided_stats) = run_text(store, steering=True, steering_strength=5.0)
    assert classifier.calls - before == 6  # one batched call per guided token
    assert "steering → positive (α = 5)" in guided_stats and "steering" not in unguided_stats


def test_loading_a_model_meanwhile_does_not_change_the_sampled_text(word_tokenizer):
    torch.manual_seed(1)
    flat_lm = LlamaForCausalLM(  # untrained logits: close to uniform, so every random draw matters
        LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=None,
        )
    ).eval()
    flat_lm.generation_config.eos_token_id = None
    started = threading.Event()

    def busy_loader():  # what initialising a model's weights does to torch's global generator
        started.set()
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            torch.rand(1)
            time.sleep(0.0005)
        return object()

    store = unloadable_store(lm_loader=lambda: (flat_lm, word_tokenizer), digits_loader=busy_loader)
    sample = {"do_sample": True, "typical_p": 1.0, "max_new_tokens": 20}
    reference = run_text(store, seed=5, **sample)[1][:2]
    assert run_text(store, seed=6, **sample)[1][:2] != reference  # the seed matters
    loading = threading.Thread(target=store.digits)
    loading.start()
    started.wait(5)
    during = run_text(store, seed=5, **sample)[1][:2]
    loading.join(10)
    assert during == reference


def test_stop_event_ends_generation_after_one_token(word_lm, word_tokenizer):
    stop = threading.Event()
    stop.set()
    progress = list(
        text_tab._stream_generation(word_lm, word_tokenizer, "the movie", stop, max_new_tokens=20, do_sample=False)
    )
    assert progress[-1].done and progress[-1].tokens == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt": "   "}, "Prompt is empty"),
        ({"prompt": "w1 " * 700}, "Prompt is too long: 2099 characters, at most 2000"),
        ({"negative_prompt": "w1 " * 700}, "Negative prompt is too long"),
        ({"scale": 10.5}, r"Guidance scale must be a number in \[0, 10\]"),
        ({"scale": float("nan")}, "Guidance scale must be a number"),
        ({"scale": None}, "Guidance scale must be a number"),
        ({"schedule": "exponential"}, "Schedule must be one of constant, linear, cosine"),
        ({"ramp_start": -1}, r"Ramp start must be a number in \[0, 10\]"),
        ({"adaptive_threshold": -0.5}, r"Adaptive threshold must be a number in \[0, 20\]"),
        ({"adaptive_threshold": None}, "Adaptive threshold must be a number"),
        ({"typical_p": 0.0}, r"typical_p must be a number in \[0.01, 1\]"),
        ({"steering_target": "angry"}, "Steering target must be one of positive, negative"),
        ({"steering_strength": 25}, r"Steering strength must be a number in \[0, 20\]"),
        ({"max_new_tokens": 0}, r"New tokens must be a number in \[1, 128\]"),
        ({"max_new_tokens": 129}, r"New tokens must be a number in \[1, 128\]"),
        ({"max_new_tokens": 2.5}, "New tokens must be a whole number"),
        ({"seed": -1}, "Seed must be a number"),
    ],
)
def test_text_inputs_are_bounded_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        next(app.stream_text(unloadable_store(), *text_inputs(**overrides)))


def test_prompt_token_limit(store):
    with pytest.raises(ValueError, match="Prompt is too long: 600 tokens, at most 512"):
        next(app.stream_text(store, *text_inputs(prompt="w1 " * 600)))


def test_make_schedule():
    assert app.make_schedule("constant", 3.0, 1.0) == Constant(3.0)
    linear, cosine = app.make_schedule("linear", 3.0, 1.0), app.make_schedule("cosine", 3.0, 1.0)
    assert isinstance(linear, Linear) and isinstance(cosine, Cosine)
    assert linear(0, 5) == cosine(0, 5) == 1.0 and linear(4, 5) == cosine(4, 5) == 3.0
    assert linear(2, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="Schedule must be one of"):
        app.make_schedule("step", 3.0, 1.0)


# ----------------------------------------------------------------------------- image tab
def columns(store, **overrides):
    return app.sample_columns(store, app.DigitsRequest.from_inputs(*image_inputs(**overrides)))


def test_scale_one_column_is_the_plain_pipeline_and_costs_half(store):
    unguided, guided = columns(store, scales="1, 3")
    pipe = store.digits()
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    plain = pipe([3, 3, 3], guidance_scale=1.0, num_inference_steps=4, latents=noise, output_type="pt").images
    assert torch.equal(unguided.images, plain)
    assert unguided.evaluations == 4 * 3 and guided.evaluations == 2 * 4 * 3
    assert not torch.equal(guided.images, unguided.images)
    assert unguided.correct == guided.correct == 3


def test_adaptive_guidance_retires_samples_and_saves_evaluations(store):
    (column,) = columns(store, scales="3", adaptive=True, threshold=-1.0)  # every sample passes at once
    assert column.retired == 3
    assert column.evaluations == 4 * 3 + 3  # the unconditional rows ran at the first step only
    (column,) = columns(store, scales="3", adaptive=True, threshold=-1.0, min_steps=2)
    assert column.retired == 3
    assert column.evaluations == 4 * 3 + 2 * 3  # ... and at the first two steps


@pytest.mark.parametrize("method", app.IMAGE_METHODS)
def test_every_method_samples(store, method):
    scales = "0, 0.5" if method == "CFG++" else "1.5, 4"
    result = columns(store, method=method, scales=scales, schedule="cosine", ramp_start=0.0)
    assert len(result) == 2
    for column in result:
        assert column.images.shape == (3, 1, 8, 8)
        assert (
            bool(torch.isfinite(column.images).all()) and 0 <= column.images.min() <= column.images.max() <= 1
        )
        branches = 3 if method.startswith("CFG + ") else 2  # PAG/SEG add a perturbed evaluation
        assert 4 * 3 <= column.evaluations <= branches * 4 * 3


def test_sample_digits_returns_a_grid_and_a_table(store):
    image, rows = app.sample_digits(store, *image_inputs(scales="1 2 3", adaptive=True, threshold=0.999))
    wide, _ = app.sample_digits(store, *image_inputs(scales="1 2 3 4 5 6"))
    assert image.mode == "RGB" and wide.width > image.width > 100 and image.height > 100
    assert [row[0] for row in rows] == ["w = 1", "w = 2", "w = 3"]
    assert rows[0][1] == 12 and rows[0][2] == 4.0 and rows[0][4] == "3/3"
    assert len(rows[0]) == len(image_tab.TABLE_HEADERS)


def test_table_says_n_a_without_a_judge():
    store = unloadable_store(digits_loader=random_digits_pipeline, judge_loader=missing_judge)
    _, rows = app.sample_digits(store, *image_inputs(scales="2"))
    assert rows[0][4] == "n/a" and rows[0][3] == "-"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scales": ""}, "Scales is empty"),
        ({"scales": "1, two"}, "Scales: 'two' is not a number"),
        ({"scales": "1 2 3 4 5 6 7"}, "at most 6 scales"),
        ({"scales": "25"}, r"Scales must be a number in \[0, 20\]"),
        ({"method": "CFG++", "scales": "0.5 1.5"}, r"CFG\+\+ scales \(lambda\) must be a number in \[0, 1\]"),
        ({"method": "CFG++", "scales": "0.5", "ramp_start": 2.0}, r"Ramp start \(CFG\+\+ lambda\)"),
        ({"method": "PAG"}, "Method must be one of"),
        ({"digit": 10}, r"Digit must be a number in \[0, 9\]"),
        ({"samples": 9}, r"Samples per scale must be a number in \[1, 8\]"),
        ({"steps": 51}, r"Steps must be a number in \[1, 50\]"),
        ({"threshold": 1.5}, r"Adaptive threshold must be a number in \[-1, 1\]"),
        ({"min_steps": -1}, r"Guided steps before adaptive must be a number in \[0, 50\]"),
    ],
)
def test_image_inputs_are_bounded_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        app.sample_digits(unloadable_store(), *image_inputs(**overrides))


def test_method_switch_offers_matching_scales():
    assert image_tab.scales_for_method("CFG++", "1, 2, 3, 5") == image_tab.DEFAULT_LAMBDAS
    assert image_tab.scales_for_method("CFG++", "0.1 0.9") == "0.1 0.9"
    assert image_tab.scales_for_method("APG", image_tab.DEFAULT_LAMBDAS) == image_tab.DEFAULT_SCALES
    assert image_tab.scales_for_method("APG", "0.5 2") == "0.5 2"


# ----------------------------------------------------------------------------- app plumbing
def test_errors_become_page_messages():
    def bad_value():
        raise ValueError("`x` must be in [0, 1], got 2.")

    def crash():
        raise KeyError("boom")

    def bad_stream():
        yield 1
        raise ValueError("late problem")

    with pytest.raises(gr.Error, match=r"`x` must be in \[0, 1\], got 2."):
        common.page_errors(bad_value)()
    with pytest.raises(gr.Error, match="Something went wrong \\(KeyError"):
        common.page_errors(crash)()
    stream = common.page_errors_stream(bad_stream)()
    assert next(stream) == 1
    with pytest.raises(gr.Error, match="late problem"):
        next(stream)


def test_missing_weights_are_a_page_message():
    def missing():
        raise FileNotFoundError("digits_unet.safetensors is missing; train it with ...")

    store = unloadable_store(digits_loader=missing)
    with pytest.raises(gr.Error, match="FileNotFoundError: digits_unet.safetensors is missing"):
        common.page_errors(app.sample_digits)(store, *image_inputs())


def test_model_store_loads_once_across_threads_and_retries_failures():
    calls = []
    gate = threading.Event()

    def slow_loader():
        calls.append(1)
        gate.wait(5)
        return object()

    store = app.ModelStore(lm_loader=slow_loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.lm())) for _ in range(3)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and len(results) == 3 and all(r is results[0] for r in results)

    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise FileNotFoundError("not yet")
        return "pipe"

    store = app.ModelStore(digits_loader=flaky)
    with pytest.raises(FileNotFoundError):
        store.digits()
    assert store.digits() == "pipe" and len(attempts) == 2  # weights that appear later are picked up


def test_app_builds_without_loading_models_and_queues_requests():
    demo = app.build_app(unloadable_store())
    assert demo._queue.max_size == app.LIMITS.queue_size and demo.api_open is False
    heavy = {fn.concurrency_id: fn for fn in demo.fns.values() if fn.concurrency_id in ("text", "image")}
    assert set(heavy) == {"text", "image"}
    assert all(fn.concurrency_limit == 1 for fn in heavy.values())
    assert inspect.isgeneratorfunction(heavy["text"].fn)  # streamed
    demo.close()


def test_main_serves_localhost_without_share(monkeypatch):
    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(app, "ModelStore", unloadable_store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app.main(["--lazy", "--port", "7999"])
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["share"] is False
