"""generate_text: no side effects on the caller's tokenizer or on torch's global generator."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerFast

from guidance.lm import encode_prompts, generate_text
from guidance.lm.sampling import GeneratorSampling, sample_with_generator

WORDS = ["<pad>", "<bos>", "<eos>", "good", "bad", "the", "movie", "was"] + [f"w{i}" for i in range(88)]
PROMPTS = ["the movie was", "good"]


def word_tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", **specials)


@pytest.fixture
def tokenizer():
    """A tokenizer without a pad token, padding on the right: both must stay so."""
    return word_tokenizer(pad=False)


def test_the_callers_tokenizer_is_not_modified(tiny_lm, tokenizer):
    before = (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side)
    encoded = encode_prompts(tokenizer, PROMPTS, chat=False)
    result = generate_text(tiny_lm, tokenizer, PROMPTS, negative_prompts="bad", max_new_tokens=4, chat=False)
    assert (
        (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side)
        == before
        == (None, None, "right")
    )
    # Left-padded with the EOS id (no pad token), masked out.
    assert encoded["input_ids"].tolist() == [[5, 6, 7], [2, 2, 3]]
    assert encoded["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert len(result.texts) == 2 and result.new_tokens >= 1


def test_encoding_matches_the_tokenizers_own_left_padding():
    tokenizer = word_tokenizer(pad=True)
    mine = encode_prompts(tokenizer, PROMPTS, chat=False)
    theirs = tokenizer(
        PROMPTS, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
    )
    assert torch.equal(mine["input_ids"], theirs["input_ids"])
    assert torch.equal(mine["attention_mask"], theirs["attention_mask"])


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_seed_leaves_the_global_generator_alone_and_repeats(tiny_lm, tokenizer, scale):
    sample = dict(guidance_scale=scale, do_sample=True, temperature=1.5, max_new_tokens=12, chat=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_text(tiny_lm, tokenizer, PROMPTS, seed=7, **sample).texts
    assert torch.equal(torch.get_rng_state(), state)  # neither reseeded nor advanced
    torch.rand(50)  # whatever the global generator does meanwhile...
    assert generate_text(tiny_lm, tokenizer, PROMPTS, seed=7, **sample).texts == first  # ...same text
    assert generate_text(tiny_lm, tokenizer, PROMPTS, seed=8, **sample).texts != first
    gen = torch.Generator().manual_seed(7)
    assert generate_text(tiny_lm, tokenizer, PROMPTS, generator=gen, **sample).texts == first


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_a_seed_samples_as_plain_sampling_after_manual_seed(tiny_lm, tokenizer, scale):
    """Same tokens as the old behaviour (torch.manual_seed(seed), then generate's own sampling)."""
    sample = dict(do_sample=True, typical_p=0.9, top_k=20, temperature=0.8, max_new_tokens=10)
    torch.manual_seed(5)
    expected = generate_text(tiny_lm, tokenizer, PROMPTS, guidance_scale=scale, chat=False, **sample).texts
    assert generate_text(
        tiny_lm, tokenizer, PROMPTS, guidance_scale=scale, chat=False, seed=5, **sample
    ).texts == (expected)


def test_seeded_text_is_the_same_while_another_thread_draws_random_numbers(tiny_lm, tokenizer):
    sample = dict(do_sample=True, max_new_tokens=16, chat=False)
    reference = generate_text(tiny_lm, tokenizer, PROMPTS, seed=3, **sample).texts
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(8)

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        during = [generate_text(tiny_lm, tokenizer, PROMPTS, seed=3, **sample).texts for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert during == [reference] * 3


def test_sample_with_generator_changes_nothing_it_is_given():
    processors, config = LogitsProcessorList(), GenerationConfig(do_sample=True, top_k=5)
    new_processors, new_config = sample_with_generator(torch.Generator(), processors, config)
    assert len(processors) == 0 and config.do_sample is True  # the caller's objects are untouched
    assert [type(p).__name__ for p in new_processors] == [
        "GeneratorSampling"
    ] and new_config.do_sample is False
    assert new_config.top_k == 5
    greedy = GenerationConfig(do_sample=False)
    assert sample_with_generator(torch.Generator(), processors, greedy) == (processors, greedy)
    assert sample_with_generator(None, processors, config) == (processors, config)
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_with_generator(3, processors, config)


def test_a_seed_follows_the_models_own_sampling_defaults(tiny_lm, tokenizer):
    """Sampling settings from the model's generation config (and transformers' defaults, e.g. top_k=50) apply."""
    model = copy.deepcopy(tiny_lm)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.5, pad_token_id=0, eos_token_id=2
    )
    for scale in (1.0, 2.0):
        torch.manual_seed(9)
        expected = generate_text(
            model, tokenizer, PROMPTS, guidance_scale=scale, max_new_tokens=10, chat=False
        )
        seeded = generate_text(
            model, tokenizer, PROMPTS, guidance_scale=scale, max_new_tokens=10, chat=False, seed=9
        )
        assert seeded.texts == expected.texts


def test_generator_sampling_draws_from_the_distribution():
    sample = GeneratorSampling(torch.Generator().manual_seed(0))
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(4000, -1)
    out = sample(torch.zeros(4000, 1, dtype=torch.long), scores)
    assert bool((out.isfinite().sum(-1) == 1).all())
    freq = torch.bincount(out.argmax(-1), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), rtol=0, atol=0.03)


def test_bad_seed_or_generator_is_rejected_before_any_work(tiny_lm, tokenizer):
    for seed, error in [(-1, ValueError), (2**63, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="`seed` must be an integer"):
            generate_text(tiny_lm, tokenizer, "good", seed=seed, do_sample=True, chat=False)
    with pytest.raises(ValueError, match="not both"):
        generate_text(tiny_lm, tokenizer, "good", seed=1, generator=torch.Generator(), chat=False)
    with pytest.raises(TypeError, match="torch.Generator"):
        generate_text(tiny_lm, tokenizer, "good", generator=7, chat=False)


def test_adaptive_guidance_returns_its_stats(tiny_lm, tokenizer):
    prompts = ["w5 w17 w33", "w7 w3"]
    common = dict(negative_prompts="w9", guidance_scale=2.0, max_new_tokens=5)
    full = generate_text(tiny_lm, tokenizer, prompts, **common)
    assert full.adaptive_stats is None
    never_skips = generate_text(tiny_lm, tokenizer, prompts, guidance_adaptive=math.inf, **common)
    assert never_skips.texts == full.texts  # the exact rules only: greedy output is full CFG's
    stats = generate_text(tiny_lm, tokenizer, prompts, guidance_adaptive=0.0, **common).adaptive_stats
    assert stats.unconditional_positions.tolist() == [0, 0] and stats.decisions.shape == (2, 5)
    off = generate_text(tiny_lm, tokenizer, prompts, guidance_adaptive=4.0, **{**common, "guidance_scale": 1.0})
    assert off.adaptive_stats is None  # guidance off: transformers' own decoding, nothing unconditional runs
