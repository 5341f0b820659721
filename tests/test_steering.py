"""Classifier-weighted logits in ``generate``: CAIF/FUDGE and GeDi processors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from guidance.classifier import gedi_class_log_probs
from guidance.lm.generation_state import GenerationTracker
from guidance.lm.steering import (
    CandidateTexts,
    ClassifierWeightedLogitsProcessor,
    GeDiLogitsProcessor,
    SentenceEncoderClassifier,
    TransformersTextClassifier,
    mean_pool,
)

INF = math.inf
WORDS = ["<pad>", "<bos>", "<eos>", "good", "bad", "the", "movie", "was"] + [f"w{i}" for i in range(88)]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A 96-word whitespace tokenizer matching the conftest ``tiny_lm`` vocabulary."""
    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


@pytest.fixture(scope="module")
def byte_bpe_tokenizer():
    """A small byte-level BPE (GPT-2 style) trained in memory, with multi-byte characters."""
    from tokenizers import ByteLevelBPETokenizer

    backend = ByteLevelBPETokenizer()
    corpus = [
        "The café served crème brûlée and 寿司 🍣 to happy guests.",
        "It's the movie's best scene, isn't it?",
    ] * 20
    backend.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="<eos>")


class LastWordClassifier:
    """p(attribute | text) from the text's last word; records every call."""

    def __init__(self, table: dict[str, float], default: float = 0.5) -> None:
        self.table = table
        self.default = default
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([self.table.get(t.split()[-1] if t.split() else "", self.default) for t in texts])


def _generate(model, input_ids, processors=(), **kwargs):
    kwargs.setdefault("max_new_tokens", 5)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("suppress_tokens", [0, 1, 2])  # specials decode to "" and would tie with the prefix
    return model.generate(
        input_ids,
        attention_mask=(input_ids != 0).long(),
        logits_processor=LogitsProcessorList(list(processors)),
        pad_token_id=0,
        **kwargs,
    )


# --- CAIF / FUDGE ---------------------------------------------------------------------------


def test_alpha_zero_is_bit_identical_to_plain_generate(tiny_lm, word_tokenizer):
    classifier = LastWordClassifier({})
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=0.0, top_k=5)
    prompt = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    for sample in (False, True):
        torch.manual_seed(1)
        plain = _generate(
            tiny_lm,
            prompt,
            do_sample=sample,
            max_new_tokens=6,
            output_scores=True,
            return_dict_in_generate=True,
        )
        torch.manual_seed(1)
        steered = _generate(
            tiny_lm,
            prompt,
            [steer],
            do_sample=sample,
            max_new_tokens=6,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(plain.sequences, steered.sequences)
        assert all(torch.equal(a, b) for a, b in zip(plain.scores, steered.scores, strict=True))
    assert classifier.calls == []


def test_exact_reweighting_of_the_top_k(word_tokenizer):
    table = {"good": 0.9, "bad": 0.05, "the": 0.5, "movie": 0.25}
    classifier = LastWordClassifier(table, default=0.1)
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=2.0, top_k=4)
    scores = torch.full((2, len(WORDS)), -5.0)
    scores[0, [3, 4, 5, 6]] = torch.tensor([1.0, 2.0, 0.5, 0.0])
    scores[1, [3, 9, 10, 11]] = torch.tensor([0.0, 3.0, 2.0, 1.0])
    input_ids = torch.tensor([[5, 6, 7], [6, 7, 7]])
    out = steer(input_ids, scores.clone())
    expected = torch.full_like(scores, -INF)
    for token, p in zip([3, 4, 5, 6], [0.9, 0.05, 0.5, 0.25], strict=True):
        expected[0, token] = scores[0, token] + 2.0 * math.log(p)
    expected[1, 3] = 0.0 + 2.0 * math.log(0.9)
    for token in (9, 10, 11):
        expected[1, token] = scores[1, token] + 2.0 * math.log(0.1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert len(classifier.calls) == 1  # one call per step for all rows and candidates
    assert sorted(classifier.calls[0]) == sorted(
        ["the movie was good", "the movie was bad", "the movie was the", "the movie was movie"]
        + ["movie was was good", "movie was was w1", "movie was was w2", "movie was was w3"]
    )


def test_prefix_mode_keeps_the_tail_scored_as_the_prefix(word_tokenizer):
    classifier = LastWordClassifier({"good": 0.8, "was": 0.2}, default=0.5)
    steer = ClassifierWeightedLogitsProcessor(
        word_tokenizer, classifier, alpha=-1.5, top_k=1, outside_top_k="prefix"
    )
    scores = torch.zeros(1, len(WORDS))
    scores[0, 3] = 1.0
    out = steer(torch.tensor([[6, 7]]), scores.clone())
    expected = scores - 1.5 * math.log(0.2)
    expected[0, 3] = 1.0 - 1.5 * math.log(0.8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert len(classifier.calls) == 1 and set(classifier.calls[0]) == {"movie was good", "movie was"}


def test_steering_picks_the_attribute_and_scores_in_one_call_per_step(tiny_lm, word_tokenizer):
    classifier = LastWordClassifier({"good": 0.99}, default=0.01)
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=20.0, top_k=len(WORDS))
    prompt = torch.tensor([[0, 5, 6], [4, 4, 4]])
    out = _generate(tiny_lm, prompt, [steer], max_new_tokens=4)
    assert (out[:, 3:] == 3).all()
    assert len(classifier.calls) == 4 and steer.stats["classifier_calls"] == 4
    # Duplicate texts are scored once: identical rows share one set of candidates.
    classifier.calls.clear()
    out = _generate(
        tiny_lm, prompt[:1], [steer], max_new_tokens=2, num_beams=1, do_sample=True, num_return_sequences=3
    )
    assert len(classifier.calls[0]) == len(set(classifier.calls[0])) <= len(WORDS)


def test_combines_with_typical_sampling(tiny_lm, word_tokenizer):
    classifier = LastWordClassifier({"good": 0.9, "bad": 0.1})
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=2.0, top_k=4)
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(torch.isfinite(scores).sum(-1))
            return scores

    torch.manual_seed(0)
    out = _generate(tiny_lm, torch.tensor([[5, 6, 7]] * 3), [steer, Record()], do_sample=True, typical_p=0.5)
    assert out.shape == (3, 8) and len(classifier.calls) == 5
    assert all((count <= 4).all() for count in seen)  # at most the k candidates survive


def test_entropy_threshold_skips_confident_rows(word_tokenizer):
    classifier = LastWordClassifier({}, default=0.5)
    steer = ClassifierWeightedLogitsProcessor(
        word_tokenizer, classifier, alpha=1.0, top_k=3, entropy_threshold=1.0
    )
    scores = torch.zeros(2, len(WORDS))
    scores[0, 5] = 50.0  # entropy ~ 0: skipped, returned as is
    out = steer(torch.tensor([[6], [7]]), scores.clone())
    assert torch.equal(out[0], scores[0])
    assert (out[1] == -INF).sum() == len(WORDS) - 3
    assert len(classifier.calls[0]) == 3 and all(t.startswith("was") for t in classifier.calls[0])
    assert steer.stats["rows_skipped"] == 1 and steer.stats["rows_scored"] == 1
    scores[1, 5] = 50.0
    classifier.calls.clear()
    assert torch.equal(steer(torch.tensor([[6, 7], [7, 7]]), scores.clone()), scores)
    assert classifier.calls == []


def test_masked_candidates_are_not_scored(word_tokenizer):
    classifier = LastWordClassifier({"good": 0.5})
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=3.0, top_k=5)
    scores = torch.full((1, len(WORDS)), -INF)
    scores[0, [3, 4]] = torch.tensor([0.0, 1.0])
    out = steer(torch.tensor([[5]]), scores)
    assert sorted(classifier.calls[0]) == ["the bad", "the good"]
    assert torch.isfinite(out).sum() == 2 and not torch.isnan(out).any()


def test_include_prompt_false_and_context_tokens(tiny_lm, word_tokenizer):
    classifier = LastWordClassifier({})
    steer = ClassifierWeightedLogitsProcessor(
        word_tokenizer, classifier, alpha=1.0, top_k=2, include_prompt=False
    )
    _generate(tiny_lm, torch.tensor([[5, 6, 7]]), [steer], max_new_tokens=3)
    assert all(len(t.split()) == 1 for t in classifier.calls[0])
    assert all(len(t.split()) == 3 for t in classifier.calls[2])
    # A new generate call starts over (the prompt length is found again).
    classifier.calls.clear()
    _generate(tiny_lm, torch.tensor([[5, 6, 7, 7, 7]]), [steer], max_new_tokens=1)
    assert all(len(t.split()) == 1 for t in classifier.calls[0])
    classifier.calls.clear()
    windowed = ClassifierWeightedLogitsProcessor(
        word_tokenizer, classifier, alpha=1.0, top_k=2, context_tokens=2
    )
    _generate(tiny_lm, torch.tensor([[5, 6, 7, 7]]), [windowed], max_new_tokens=2)
    assert all(len(t.split()) == 3 for call in classifier.calls for t in call)


@pytest.mark.parametrize("tokenizer_name", ["word_tokenizer", "byte_bpe_tokenizer"])
def test_candidate_texts_equal_full_decodes(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    texts = CandidateTexts(tokenizer)
    rng = random.Random(0)
    vocab = len(tokenizer)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 9))] for _ in range(6)]
    for _ in range(12):  # follow chosen candidates step by step, as in generation
        candidates = [rng.sample(range(vocab), 8) for _ in prefixes]
        prefix_texts, candidate_texts = texts(prefixes, candidates)
        for prefix, prefix_text, row, row_texts in zip(
            prefixes, prefix_texts, candidates, candidate_texts, strict=True
        ):
            assert prefix_text == tokenizer.decode(prefix, skip_special_tokens=True)
            for token, text in zip(row, row_texts, strict=True):
                assert text == tokenizer.decode([*prefix, token], skip_special_tokens=True)
        prefixes = [prefix + [rng.choice(row)] for prefix, row in zip(prefixes, candidates, strict=True)]
    if tokenizer_name == "word_tokenizer":  # random byte-level ids often split characters: decoded in full
        assert texts.full_decodes == 6  # the first prefixes only; then cache hits and short windows


def test_transformers_classifier_with_its_own_tokenizer(word_tokenizer, byte_bpe_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(byte_bpe_tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        label2id={"neg": 0, "neu": 1, "pos": 2},
        id2label={0: "neg", 1: "neu", 2: "pos"},
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config).eval()
    byte_bpe_tokenizer.pad_token = "<eos>"
    steer = ClassifierWeightedLogitsProcessor(
        word_tokenizer, model, alpha=1.5, top_k=3, label="pos", classifier_tokenizer=byte_bpe_tokenizer
    )
    scores = torch.randn(1, len(WORDS))
    out = steer(torch.tensor([[5, 6]]), scores.clone())
    top = scores.topk(3).indices[0]
    texts = [word_tokenizer.decode([5, 6, int(t)]) for t in top]
    probs = TransformersTextClassifier(model, byte_bpe_tokenizer)(texts)[:, 2]
    torch.testing.assert_close(out[0, top], scores[0, top] + 1.5 * probs.log(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="classifier_tokenizer"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, model, alpha=1.0)
    with pytest.raises(ValueError, match="not one of the classifier's labels"):
        ClassifierWeightedLogitsProcessor(
            word_tokenizer, model, alpha=1.0, label="happy", classifier_tokenizer=byte_bpe_tokenizer
        )


def test_sentence_encoder_classifier_mean_pools(word_tokenizer):
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=len(WORDS),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            pad_token_id=0,
        )
    ).eval()
    head = torch.nn.Linear(8, 2)
    classify = SentenceEncoderClassifier(encoder, word_tokenizer, head, labels=["no", "yes"])
    texts = ["good movie", "the movie was bad bad"]
    batch = word_tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"])
        single = encoder(**word_tokenizer(texts[:1], return_tensors="pt")).last_hidden_state.mean(1)
        expected = torch.softmax(head(torch.nn.functional.normalize(pooled, dim=-1)), -1)
    torch.testing.assert_close(pooled[0], single[0], rtol=0, atol=1e-5)  # padding does not leak into the mean
    torch.testing.assert_close(classify(texts), expected)
    assert classify.label2id == {"no": 0, "yes": 1}
    with pytest.raises(ValueError, match="SentenceEncoderClassifier"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, head, alpha=1.0)


@pytest.mark.parametrize(
    ("classifier", "match"),
    [
        (
            lambda texts: torch.full((len(texts) + 1,), 0.5),
            r"`classifier` must return probabilities of shape",
        ),
        (lambda texts: torch.full((len(texts),), math.nan), "NaN"),
        (lambda texts: torch.full((len(texts), 2), 0.5), "pass `label`"),
        (lambda texts: torch.full((len(texts),), 2.0), r"in \[0, 1\]"),
    ],
)
def test_bad_classifier_output_is_a_clear_error(word_tokenizer, classifier, match):
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, top_k=3)
    with pytest.raises(ValueError, match=match):
        steer(torch.tensor([[5]]), torch.randn(1, len(WORDS)))


def test_bad_arguments_are_rejected_before_any_work(word_tokenizer):
    classifier = LastWordClassifier({})
    for alpha in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="`alpha` must be a finite real number"):
            ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=alpha)
    with pytest.raises(ValueError, match=r"`top_k` must be at most the vocabulary size 96, got 97"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, top_k=97)
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, top_k=50)
    with pytest.raises(ValueError, match=r"`top_k` must be at most the vocabulary size 40, got 50"):
        steer(torch.tensor([[5]]), torch.randn(1, 40))
    assert classifier.calls == []
    for kwargs, match in [
        ({"entropy_threshold": -1.0}, "entropy_threshold"),
        ({"entropy_threshold": math.nan}, "entropy_threshold"),
        ({"context_tokens": 0}, "context_tokens"),
        ({"outside_top_k": "keep"}, "outside_top_k"),
        ({"label": 1.5}, "label"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, **kwargs)
    with pytest.raises(TypeError, match="callable"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, "not a classifier", alpha=1.0)
    with pytest.raises(TypeError, match="`include_prompt` must be a bool"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, include_prompt=0)
    with pytest.raises(ValueError, match=r"`filter_value` must be a number in \[-inf, inf\)"):
        ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, filter_value=math.inf)


def test_nan_scores_or_nan_classifier_output_are_clear_errors(word_tokenizer):
    classifier = LastWordClassifier({})
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=1.0, top_k=3)
    scores = torch.randn(1, len(WORDS))
    scores[0, 7] = math.nan
    with pytest.raises(ValueError, match="`scores` contain NaN"):
        steer(torch.tensor([[5]]), scores)
    assert classifier.calls == []
    # NaN anywhere in a (N, C) answer, even outside the attribute's column, is a broken classifier.
    nan_column = ClassifierWeightedLogitsProcessor(
        word_tokenizer, lambda texts: [[math.nan, 0.5]] * len(texts), alpha=1.0, top_k=3, label=1
    )
    with pytest.raises(ValueError, match="NaN"):
        nan_column(torch.tensor([[5]]), torch.randn(1, len(WORDS)))
    one_nan = ClassifierWeightedLogitsProcessor(
        word_tokenizer, lambda texts: [0.5] * (len(texts) - 1) + [math.nan], alpha=-2.0, top_k=3
    )
    with pytest.raises(ValueError, match="`classifier` returned NaN"):
        one_nan(torch.tensor([[5]]), torch.randn(1, len(WORDS)))


def test_a_new_prompt_resets_the_candidate_texts(tiny_lm, word_tokenizer):
    classifier = LastWordClassifier({"good": 0.9})
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=5.0, top_k=4, include_prompt=False)
    first = _generate(tiny_lm, torch.tensor([[5, 6, 7]]), [steer], max_new_tokens=3)
    again = _generate(tiny_lm, torch.tensor([[5, 6, 7]]), [steer], max_new_tokens=3)
    assert torch.equal(first, again)
    assert steer._tracker.prompt_length == 3
    shorter = _generate(tiny_lm, torch.tensor([[9]]), [steer], max_new_tokens=2)
    assert steer._tracker.prompt_length == 1 and shorter.shape == (1, 3)
    # include_prompt=False: the texts scored hold only generated words, never the prompt's.
    assert all("movie" not in text and "was" not in text for call in classifier.calls for text in call)


def test_works_inside_cfg_generate(tiny_lm, word_tokenizer):
    from guidance.lm import cfg_generate

    prompt = torch.tensor([[5, 6, 7]])
    negative = torch.tensor([[4, 4]])
    common = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        guidance_scale=1.5,
        negative_prompt_ids=negative,
        negative_prompt_attention_mask=torch.ones_like(negative),
        custom_generate=cfg_generate,
    )
    plain = tiny_lm.generate(prompt, **common)
    off = ClassifierWeightedLogitsProcessor(word_tokenizer, LastWordClassifier({}), alpha=0.0)
    assert torch.equal(plain, tiny_lm.generate(prompt, logits_processor=LogitsProcessorList([off]), **common))
    classifier = LastWordClassifier({"bad": 0.99}, default=0.01)
    steer = ClassifierWeightedLogitsProcessor(word_tokenizer, classifier, alpha=20.0, top_k=len(WORDS))
    out = tiny_lm.generate(
        prompt, logits_processor=LogitsProcessorList([steer]), suppress_tokens=[0, 1, 2], **common
    )
    assert (out[0, 3:] == 4).all() and len(classifier.calls) == 4


# --- GeDi -----------------------------------------------------------------------------------


class BruteForceGeDi(LogitsProcessor):
    """GeDi recomputed from scratch for every row and class, one unpadded sequence at a time."""

    def __init__(self, lm, class_prompts, omega, desired_class=0, pad_token_id=0):
        self.lm, self.class_prompts, self.omega = lm, class_prompts, omega
        self.desired_class, self.pad_token_id = desired_class, pad_token_id

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        next_lp, prefix_ll, counts = [], [], []
        for prompt in self.class_prompts:
            lps, lls = [], []
            for row in input_ids.tolist():
                while len(row) > 1 and row[0] == self.pad_token_id:
                    row = row[1:]
                ids = torch.tensor([prompt + row])
                log_probs = torch.log_softmax(self.lm(ids).logits[0].double(), dim=-1)
                lls.append(sum(log_probs[len(prompt) + j - 1, token] for j, token in enumerate(row)))
                lps.append(log_probs[-1])
                if len(counts) < input_ids.shape[0]:
                    counts.append(len(row))
            next_lp.append(torch.stack(lps))
            prefix_ll.append(torch.stack(lls))
        posterior = gedi_class_log_probs(
            torch.stack(next_lp), torch.stack(prefix_ll), torch.tensor(counts, dtype=torch.float64)
        )
        return scores + self.omega * posterior[self.desired_class].float()


CLASS_PROMPTS = [[3, 5], [4, 5, 6]]


@pytest.mark.parametrize("budget", [None, 96 * 4])
def test_gedi_matches_brute_force_with_padding_and_cache(tiny_lm, budget, monkeypatch):
    if budget is not None:  # long prompts: the prompt is scored in chunks of rows
        monkeypatch.setattr("guidance.lm.steering.gedi.PROMPT_LOGITS_BUDGET", budget)
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=2.0, pad_token_id=0)
    brute = BruteForceGeDi(tiny_lm, CLASS_PROMPTS, omega=2.0)
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 7, 8, 9], [10, 11, 12, 13, 14], [0, 15, 16, 17, 18]])
    for _step in range(4):
        scores = torch.randn(3, 96)
        torch.testing.assert_close(gedi(ids, scores.clone()), brute(ids, scores.clone()), rtol=0, atol=2e-4)
        ids = torch.cat([ids, torch.randint(3, 96, (3, 1))], dim=1)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_gedi_generate_matches_brute_force(tiny_lm, num_beams):
    prompt = torch.tensor([[0, 0, 7, 8], [9, 10, 11, 12]])
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=30.0, desired_class=1, pad_token_id=0)
    brute = BruteForceGeDi(tiny_lm, CLASS_PROMPTS, omega=30.0, desired_class=1)
    fast = _generate(tiny_lm, prompt, [gedi], num_beams=num_beams, max_new_tokens=5)
    slow = _generate(tiny_lm, prompt, [brute], num_beams=num_beams, max_new_tokens=5)
    assert torch.equal(fast, slow)
    assert gedi.stats["prefills"] == 1 and gedi.stats["steps"] == 5  # the cache followed every step
    if num_beams > 1:
        assert gedi.stats["reorders"] > 0
    assert not torch.equal(fast, _generate(tiny_lm, prompt, num_beams=num_beams, max_new_tokens=5))


def test_gedi_passes_the_cache_under_the_versions_keyword_without_future_warnings(tiny_lm):
    import warnings

    from guidance.lm import compat

    seen = []

    def record(module, args, kwargs):
        seen.append(sorted(k for k in ("cache", "past_key_values") if kwargs.get(k) is not None))

    handle = tiny_lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=2.0, pad_token_id=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # transformers warns on the old keyword
            for length in (3, 4, 5):
                gedi(torch.arange(7, 7 + length)[None], torch.zeros(1, 96))
    finally:
        handle.remove()
    assert gedi.stats["prefills"] == 1  # then the cache carried the two later calls
    assert seen == [[compat.cache_argument(tiny_lm)]] * 3  # the prefill and both steps


def test_gedi_score_prompt_false_counts_generated_tokens_only(tiny_lm):
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=1.0, score_prompt=False, pad_token_id=0)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        log_probs = [
            torch.log_softmax(tiny_lm(torch.tensor([p + [7, 8, 9, 10]])).logits[0], -1) for p in CLASS_PROMPTS
        ]
    first = gedi(ids, torch.zeros(1, 96))
    expected = gedi_class_log_probs(torch.stack([lp[-2] for lp in log_probs])[:, None], torch.zeros(2, 1), 0)
    torch.testing.assert_close(first, expected[0], rtol=0, atol=1e-5)
    second = gedi(torch.tensor([[7, 8, 9, 10]]), torch.zeros(1, 96))
    prefix_ll = torch.stack([lp[-2, 10] for lp in log_probs])[:, None]
    expected = gedi_class_log_probs(torch.stack([lp[-1] for lp in log_probs])[:, None], prefix_ll, 1)
    torch.testing.assert_close(second, expected[0], rtol=0, atol=1e-5)


def test_gedi_omega_zero_is_bit_identical(tiny_lm):
    prompt = torch.tensor([[0, 7, 8], [9, 10, 11]])
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=0.0, pad_token_id=0)
    torch.manual_seed(3)
    plain = _generate(tiny_lm, prompt, do_sample=True, max_new_tokens=6)
    torch.manual_seed(3)
    assert torch.equal(plain, _generate(tiny_lm, prompt, [gedi], do_sample=True, max_new_tokens=6))
    assert gedi._state is None  # no class-LM forward at all


def test_gedi_bad_arguments(tiny_lm, word_tokenizer):
    with pytest.raises(ValueError, match="at least 2 prompts"):
        GeDiLogitsProcessor(tiny_lm, [[3]], omega=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        GeDiLogitsProcessor(tiny_lm, [[3], []], omega=1.0)
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        GeDiLogitsProcessor(tiny_lm, ["good", "bad"], omega=1.0)
    with pytest.raises(ValueError, match="desired_class"):
        GeDiLogitsProcessor(tiny_lm, [[3], [4]], omega=1.0, desired_class=2)
    with pytest.raises(ValueError, match="`omega` must be a finite real number"):
        GeDiLogitsProcessor(tiny_lm, [[3], [4]], omega=math.nan)
    with pytest.raises(ValueError, match="class_bias"):
        GeDiLogitsProcessor(tiny_lm, [[3], [4]], omega=1.0, class_bias=[0.0, math.inf])
    gedi = GeDiLogitsProcessor(tiny_lm, ["good", "bad"], omega=1.0, tokenizer=word_tokenizer)
    assert gedi.class_prompt_ids == [[3], [4]]
    with pytest.raises(ValueError, match="vocabulary"):
        gedi(torch.tensor([[5, 6]]), torch.zeros(1, 200))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logit_scale": -0.5}, ValueError, r"`logit_scale` must be a number in \[0.0, inf\), got -0.5"),
        ({"logit_scale": math.inf}, ValueError, r"`logit_scale` must be a number in \[0.0, inf\)"),
        ({"logit_scale": "1"}, TypeError, "`logit_scale` must be a real number"),
        ({"length_normalize": 1}, TypeError, "`length_normalize` must be a bool"),
        ({"score_prompt": "no"}, TypeError, "`score_prompt` must be a bool"),
        ({"pad_token_id": -1}, ValueError, r"`pad_token_id` must be an integer in \[0, inf\]"),
    ],
)
def test_gedi_options_are_checked_in_the_constructor_before_any_work(tiny_lm, kwargs, error, match):
    # string prompts without a tokenizer would fail later: the option's error comes first, from the
    # constructor, not from the first generation step (where gedi_class_log_probs also refuses it)
    with pytest.raises(error, match=match):
        GeDiLogitsProcessor(tiny_lm, ["good", "bad"], omega=1.0, **kwargs)
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=1.0, logit_scale=0.0, pad_token_id=0)
    assert gedi.logit_scale == 0.0 and isinstance(gedi.logit_scale, float)


@pytest.mark.parametrize("prompts", [[[3], [96]], [[3], [-1]], [[3, 5], [4, 10**9]]])
def test_gedi_class_prompt_past_the_vocabulary_is_a_clear_error(tiny_lm, prompts):
    with pytest.raises(ValueError, match=r"outside the class LM's vocabulary \[0, 96\)"):
        GeDiLogitsProcessor(tiny_lm, prompts, omega=1.0)


def test_gedi_input_ids_past_the_vocabulary_is_a_clear_error_before_any_forward(tiny_lm):
    gedi = GeDiLogitsProcessor(tiny_lm, CLASS_PROMPTS, omega=1.0, pad_token_id=0)
    with pytest.raises(ValueError, match=r"token id 96, outside the class LM's vocabulary"):
        gedi(torch.tensor([[5, 96]]), torch.zeros(1, 96))
    assert gedi._state is None and gedi.stats["prefills"] == 0


# --- the "new generation" rule ---------------------------------------------------------------


def test_generation_tracker_rule():
    tracker = GenerationTracker()
    assert tracker.update(torch.tensor([[1, 2], [1, 2]]))
    assert not tracker.update(torch.tensor([[1, 2, 9], [1, 2, 8]]))
    assert not tracker.update(torch.tensor([[1, 2, 8, 1], [1, 2, 9, 1]])) and tracker.step == 2  # beams reordered
    assert tracker.update(torch.tensor([[3, 4, 8, 1, 1], [1, 2, 9, 1, 1]]))  # a row's prompt changed
    assert tracker.update(torch.tensor([[1, 2, 9, 1, 5]])) and tracker.prompt_length == 5  # fewer rows
    assert tracker.update(torch.tensor([[1, 2, 9, 1, 5, 6, 7]]))  # two tokens at once: start over
    assert tracker.update(torch.tensor([[0, 2, 9, 1, 5, 6, 7, 8]]))  # another prompt, one longer
    assert not tracker.update(torch.tensor([[0, 2, 9, 1, 5, 6, 7, 8, 9]]))
    tracker.reset()
    assert tracker.update(torch.tensor([[0, 2, 9, 1, 5, 6, 7, 8, 9, 10]]))


# --- the real thing -------------------------------------------------------------------------


def test_shipped_sentiment_head_separates_its_sentences():
    from safetensors import safe_open

    from guidance.models.sentiment import SENTIMENT_HEAD_WEIGHTS, load_sentences, load_sentiment_classifier

    classifier = load_sentiment_classifier()
    sentences = load_sentences()[::7]
    probs = classifier([text for text, _ in sentences])
    accuracy = (probs.argmax(-1) == torch.tensor([label for _, label in sentences])).float().mean()
    assert accuracy >= 0.9
    held_out_pairs = [  # not in the training data
        (
            "The staff were wonderful and the room was spotless.",
            "The staff were rude and the room was filthy.",
        ),
        ("Honestly the best pizza I've ever had.", "The meal made me sick."),
        ("The kids loved the new playground.", "The app keeps crashing and losing my files."),
    ]
    p_positive = classifier([text for pair in held_out_pairs for text in pair])[:, 1].view(-1, 2)
    assert (p_positive[:, 0] > p_positive[:, 1] + 0.3).all(), p_positive
    with safe_open(str(SENTIMENT_HEAD_WEIGHTS), framework="pt") as handle:
        assert float(handle.metadata()["cv_accuracy"]) >= 0.9


def test_profanity_classifier_steers_away_from_profanity(word_tokenizer):
    from guidance.models.profanity import ProfanityClassifier

    judge = ProfanityClassifier()
    probs = judge(["Have a lovely afternoon.", "shut up you fucking idiot", ""])
    assert probs.shape == (3,) and probs.dtype == torch.float32
    assert probs[0] < 0.5 < probs[1] and probs[2] < 0.5
    assert judge([]).shape == (0,)
    vocab = {word: index for index, word in enumerate(["<pad>", "you", "are", "lovely", "fucking", "stupid"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    steer = ClassifierWeightedLogitsProcessor(tokenizer, judge, alpha=-5.0, top_k=3)
    scores = torch.full((1, 6), -INF)
    scores[0, [3, 4, 5]] = torch.tensor([0.0, 2.0, 1.0])  # the LM prefers the profane word
    out = steer(torch.tensor([[1, 2]]), scores)
    assert out.argmax().item() == 3  # "you are lovely"


@pytest.mark.slow
def test_sentiment_steering_moves_the_attribute_on_the_real_lm(smollm2):
    from guidance.models.sentiment import load_sentiment_classifier

    model, tokenizer = smollm2
    classifier = load_sentiment_classifier()
    prompts = ["The movie was", "My day at work was"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    positive_rate = {}
    for alpha in (-10.0, 10.0):
        steer = ClassifierWeightedLogitsProcessor(
            tokenizer, classifier, alpha=alpha, top_k=6, label="positive"
        )
        torch.manual_seed(0)
        out = model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=True,
            top_k=6,
            num_return_sequences=2,
            logits_processor=LogitsProcessorList([steer]),
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        full = [p + t for p, t in zip([p for p in prompts for _ in range(2)], texts, strict=True)]
        positive_rate[alpha] = classifier(full)[:, 1].mean().item()
        assert steer.stats["classifier_calls"] == 8
    # Seeds 0-2 give p(positive) 0.73-0.83 for +10 and 0.06-0.13 for -10.
    assert positive_rate[10.0] > 0.6 and positive_rate[-10.0] < 0.3, positive_rate
    assert positive_rate[10.0] - positive_rate[-10.0] > 0.4, positive_rate
