"""GeDi as a transformers ``LogitsProcessor``: a class-conditional LM weights every token.

The Bayes rule over classes is :func:`guidance.classifier.gedi_class_log_probs`; this module
runs the class-conditional LM (one batched forward per step for all classes and rows, with a
KV cache that follows beam-search reorderings) and keeps its running log-likelihoods.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel

from guidance.classifier import gedi_class_log_probs, gedi_logits
from guidance.lm import compat
from guidance.lm.generation_state import GenerationTracker
from guidance.lm.padding import left_pad, position_ids
from guidance.lm.steering.classifiers import model_device
from guidance.validation import check_bool, check_finite, check_int, check_optional_int, check_range

__all__ = ["GeDiLogitsProcessor"]

# Float32 logits of the prompt that GeDi's prefill may hold at once (512 MiB); longer prompts
# are scored in chunks of rows.
PROMPT_LOGITS_BUDGET = 2**27


def _vocab_sizes(model: Any) -> tuple[int | None, int | None]:
    """``(input vocabulary, output vocabulary)`` of a causal LM, from its embeddings (else its config)."""
    config_size = getattr(getattr(model, "config", None), "vocab_size", None)
    sizes: list[int | None] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        sizes.append(int(weight.shape[0]) if weight is not None else config_size)
    return sizes[0], sizes[1]


def _encode_class_prompts(class_prompts: Any, tokenizer: Any, vocab: int | None) -> list[list[int]]:
    if isinstance(class_prompts, str) or not isinstance(class_prompts, Sequence) or len(class_prompts) < 2:
        raise ValueError(
            f"`class_prompts` must hold at least 2 prompts (one per class), got {class_prompts!r}."
        )
    prompt_ids = []
    for prompt in class_prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("`tokenizer` is required when `class_prompts` are strings.")
            ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
        else:
            ids = [int(token) for token in prompt]
        if not ids:
            raise ValueError(
                f"Every class prompt must be non-empty (it predicts the first token), got {prompt!r}."
            )
        if vocab is not None and not all(0 <= token < vocab for token in ids):
            raise ValueError(
                f"Class prompt {prompt!r} has token ids outside the class LM's vocabulary [0, {vocab}): {ids}."
            )
        prompt_ids.append(ids)
    return prompt_ids


def _check_class_options(desired_class: Any, class_bias: Any, num_classes: int) -> Tensor | None:
    check_int(desired_class, "desired_class", minimum=0, maximum=num_classes - 1)
    if class_bias is None:
        return None
    bias = torch.as_tensor(class_bias, dtype=torch.float32)
    if bias.shape != (num_classes,) or not bool(torch.isfinite(bias).all()):
        raise ValueError(f"`class_bias` must be {num_classes} finite numbers, got {class_bias!r}.")
    return bias


def _scored_log_likelihood(logits: Tensor, ids: Tensor, lengths: Tensor, longest: int) -> Tensor:
    """``sum_j log P(x_j | x_<j)`` over each row's last ``lengths[row]`` tokens, from the last logits."""
    logits = logits[:, -longest - 1 : -1].float()
    targets = ids[:, -longest:]
    token_log_probs = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    scored = torch.arange(longest, device=ids.device)[None, :] >= (longest - lengths.to(ids.device))[:, None]
    return torch.where(scored, token_log_probs, torch.zeros((), device=ids.device)).sum(-1)


@dataclass
class _ClassLMState:
    """The class LM's running state; rows are class-major: row ``c * batch + b``."""

    cache: Any
    mask: Tensor  # (C * B, length) attention mask
    position: Tensor  # (C * B,) position of the last token
    next_log_probs: Tensor  # (C, B, V) log P(v | prefix, class)
    prefix_ll: Tensor  # (C, B) sum of log P(x_j | x_<j, class) over the scored tokens
    counts: Tensor  # (B,) number of scored tokens
    input_ids: Tensor  # (B, length) the generating LM's sequences at the last step


class GeDiLogitsProcessor(LogitsProcessor):
    r"""GeDi: weight every token by ``p(desired class | prefix + token)`` from a class-conditional LM.

    The class-conditional LM ``class_lm`` is run once per class on
    ``class_prompts[c] + prompt + generated`` (all classes and rows in one batched forward
    per step, each with its KV cache), and Bayes' rule over the classes gives, for the whole
    vocabulary at once, ``log p(class | prefix + v)`` length-normalised as in GeDi (see
    :func:`guidance.classifier.gedi_class_log_probs`). The processor returns
    ``scores + omega * log p(desired_class | prefix + v)``; ``omega = 0`` is off (scores
    untouched, no forward). ``class_lm`` may be the generating model itself under attribute
    prompts (no extra model, one extra batched forward per step) or a separate small LM that
    shares the generating LM's vocabulary.

    Args:
        class_lm (`PreTrainedModel`): a transformers causal LM over the generating LM's vocabulary
            (or a larger one).
        class_prompts (`Sequence[str | Sequence[int]]`): one prompt per class, at least 2:
            strings (encoded with ``tokenizer``, no special tokens added) or token-id lists with
            ids in ``[0, class LM vocabulary)``; each must be non-empty.
        omega (`float`): the class weight (GeDi's ``disc_weight``), any finite number; 0 is
            off, negative steers away.
        tokenizer (*optional*): needed for string prompts; its ``pad_token_id`` marks left padding.
        desired_class (`int`): the index of the class to steer toward, in ``[0, num classes)``.
            Default 0.
        class_bias (`Sequence[float]`, *optional*): one finite bias per class, added after length
            normalisation (a log prior). Default: none.
        logit_scale (`float`): GeDi's ``logit_scale``, a finite number ``>= 0`` (1 for an LM that
            was not trained as GeDi; 0 gives the likelihoods no weight). Default 1.
        length_normalize (`bool`): divide the class log-likelihoods by the number of scored
            tokens. Default True.
        score_prompt (`bool`): include the prompt's tokens in the class log-likelihoods (GeDi
            does; default); otherwise only generated tokens count.
        pad_token_id (`int`, *optional*): the id of left padding in ``input_ids`` (default: the
            tokenizer's).

    ``stats`` counts steps, full prefills (a new generation, see
    :class:`guidance.lm.generation_state.GenerationTracker`) and beam reorderings of the cache.
    Token ids outside the class LM's vocabulary raise ``ValueError`` before any forward.

    GeDi's extra filtering heuristic (dropping low-``p(desired)`` tokens from the nucleus)
    is not applied; combine with ``top_p``/``typical_p`` for that role.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
        >>> from guidance.lm.steering import GeDiLogitsProcessor
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
        >>> gedi = GeDiLogitsProcessor(lm, class_prompts=[[5, 6], [7, 8]], omega=3.0, pad_token_id=0)
        >>> prompt = torch.tensor([[1, 2, 3]])
        >>> out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
        ...                   logits_processor=LogitsProcessorList([gedi]))
        >>> out.shape, gedi.stats
        (torch.Size([1, 7]), {'steps': 4, 'prefills': 1, 'reorders': 0})
    """

    def __init__(
        self,
        class_lm: PreTrainedModel,
        class_prompts: Sequence[str | Sequence[int]],
        omega: float,
        *,
        tokenizer: Any = None,
        desired_class: int = 0,
        class_bias: Sequence[float] | Tensor | None = None,
        logit_scale: float = 1.0,
        length_normalize: bool = True,
        score_prompt: bool = True,
        pad_token_id: int | None = None,
    ) -> None:
        check_finite(omega, "omega")
        # gedi_class_log_probs needs >= 0 (negative favours impossible classes): refuse it here, not at step 1
        logit_scale = check_range(logit_scale, "logit_scale", 0.0, math.inf, hi_open=True)
        length_normalize = check_bool(length_normalize, "length_normalize")
        score_prompt = check_bool(score_prompt, "score_prompt")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = check_optional_int(pad_token_id, "pad_token_id", minimum=0)
        self._input_vocab, self._output_vocab = _vocab_sizes(class_lm)
        self.class_prompt_ids = _encode_class_prompts(class_prompts, tokenizer, self._input_vocab)
        self.class_bias = _check_class_options(desired_class, class_bias, len(self.class_prompt_ids))
        self.class_lm = class_lm
        self.omega = float(omega)
        self.desired_class = desired_class
        self.logit_scale = float(logit_scale)
        self.length_normalize = length_normalize
        self.score_prompt = score_prompt
        self.stats = {"steps": 0, "prefills": 0, "reorders": 0}
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(class_lm.forward).parameters
        self._cache_argument = compat.cache_argument(class_lm)  # `cache` or `past_key_values`, by version
        self._state: _ClassLMState | None = None
        self._tracker = GenerationTracker()

    @property
    def num_classes(self) -> int:
        """The number of classes (class prompts)."""
        return len(self.class_prompt_ids)

    def _content(self, row: list[int]) -> list[int]:
        start = 0
        if self.pad_token_id is not None:
            while start < len(row) - 1 and row[start] == self.pad_token_id:
                start += 1
        return row[start:]

    def _forward(self, keep: int | None, **inputs: Any) -> Any:
        if keep is not None and self._accepts_logits_to_keep:
            inputs["logits_to_keep"] = keep
        return self.class_lm(**inputs)

    def _check_vocabulary(self, input_ids: LongTensor, scores: Tensor) -> None:
        if self._output_vocab is not None and self._output_vocab < scores.shape[-1]:
            raise ValueError(
                f"The class-conditional LM's vocabulary ({self._output_vocab}) is smaller than the generating LM's "
                f"({scores.shape[-1]}); it must share the generating LM's tokenizer."
            )
        if self._input_vocab is not None and input_ids.numel() and int(input_ids.max()) >= self._input_vocab:
            raise ValueError(
                f"`input_ids` hold token id {int(input_ids.max())}, outside the class LM's vocabulary "
                f"[0, {self._input_vocab}); it must share the generating LM's tokenizer."
            )

    def _rows_per_pass(self, longest: int) -> int:
        """Rows whose ``longest + 1`` float32 logits fit in :data:`PROMPT_LOGITS_BUDGET` (at least 1)."""
        return max(1, PROMPT_LOGITS_BUDGET // max(1, (longest + 1) * (self._output_vocab or 0)))

    def _prompt_log_likelihood(
        self, out: Any, inputs: tuple[Tensor, Tensor, Tensor], lengths: Tensor, one_pass: bool
    ) -> Tensor:
        """``(C * B,)`` class log-likelihoods of each row's content (zero if not ``score_prompt``)."""
        ids, mask, positions = inputs
        longest = int(lengths.max())
        if not self.score_prompt:
            return torch.zeros(ids.shape[0], device=ids.device)
        if one_pass:
            return _scored_log_likelihood(out.logits, ids, lengths, longest)
        # Long prompts: score them in row chunks so that the logits never exceed the budget.
        rows_per_pass = self._rows_per_pass(longest)
        chunks = []
        for first in range(0, ids.shape[0], rows_per_pass):
            rows = slice(first, first + rows_per_pass)
            chunk = self._forward(
                longest + 1,
                input_ids=ids[rows],
                attention_mask=mask[rows],
                position_ids=positions[rows],
                use_cache=False,
            )
            chunks.append(_scored_log_likelihood(chunk.logits, ids[rows], lengths[rows], longest))
        return torch.cat(chunks)

    def _prefill(self, input_ids: LongTensor) -> None:
        device = model_device(self.class_lm)
        contents = [self._content(row) for row in input_ids.tolist()]
        sequences = [prompt + content for prompt in self.class_prompt_ids for content in contents]
        ids, mask = left_pad(sequences, pad_token_id=0)
        ids, mask = ids.to(device), mask.to(device)
        positions = position_ids(mask)
        batch = input_ids.shape[0]
        lengths = torch.tensor([len(content) for content in contents]).repeat(self.num_classes)
        longest = int(lengths.max())
        one_pass = self.score_prompt and self._rows_per_pass(longest) >= len(sequences)
        cache = DynamicCache(config=self.class_lm.config)  # filled in place by every forward
        out = self._forward(
            longest + 1 if one_pass else 1,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_argument: cache},
        )
        prefix_ll = self._prompt_log_likelihood(out, (ids, mask, positions), lengths, one_pass)
        logits = out.logits[:, -1].float()
        counts = lengths[:batch].to(torch.float32) if self.score_prompt else torch.zeros(batch)
        self._state = _ClassLMState(
            cache=cache,
            mask=mask,
            position=positions[:, -1],
            next_log_probs=torch.log_softmax(logits, dim=-1).view(self.num_classes, batch, -1),
            prefix_ll=prefix_ll.view(self.num_classes, batch).to(logits.device),
            counts=counts.to(logits.device),
            input_ids=input_ids.detach().clone(),
        )

    def _advance(self, state: _ClassLMState, input_ids: LongTensor) -> None:
        """Score the token just appended to every row and run the class LM on it."""
        tokens = input_ids[:, -1].to(state.mask.device)
        expanded = tokens.view(1, -1, 1).expand(self.num_classes, -1, 1)
        state.prefix_ll = state.prefix_ll + state.next_log_probs.gather(-1, expanded)[..., 0]
        state.counts = state.counts + 1
        step_ids = tokens.repeat(self.num_classes)[:, None]
        state.mask = torch.cat([state.mask, state.mask.new_ones(step_ids.shape)], dim=-1)
        state.position = state.position + 1
        out = self.class_lm(
            input_ids=step_ids,
            attention_mask=state.mask,
            position_ids=state.position[:, None],
            use_cache=True,
            **{self._cache_argument: state.cache},
        )
        state.next_log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(
            self.num_classes, input_ids.shape[0], -1
        )
        state.input_ids = input_ids.detach().clone()

    def _reorder(self, state: _ClassLMState, input_ids: LongTensor) -> bool:
        """Follow a beam-search reordering of rows; False if some row has no parent row."""
        parents = {tuple(row): i for i, row in enumerate(state.input_ids.tolist())}
        order = [parents.get(tuple(row)) for row in input_ids[:, :-1].tolist()]
        if any(index is None for index in order) or not hasattr(state.cache, "reorder_cache"):
            return False
        batch = input_ids.shape[0]
        rows = torch.tensor(order, device=state.mask.device)
        class_rows = (
            torch.arange(self.num_classes, device=rows.device)[:, None] * batch + rows[None, :]
        ).flatten()
        state.cache.reorder_cache(class_rows)
        self.stats["reorders"] += 1
        state.mask = state.mask[class_rows]
        state.position = state.position[class_rows]
        state.next_log_probs = state.next_log_probs[:, rows]
        state.prefix_ll = state.prefix_ll[:, rows]
        state.counts = state.counts[rows]
        state.input_ids = state.input_ids[rows.cpu()]
        return True

    def _update(self, input_ids: LongTensor) -> _ClassLMState:
        """Bring the class LM's state to ``input_ids``: advance by one token, or prefill anew."""
        state = self._state
        if not self._tracker.update(input_ids) and state is not None:
            same_rows = torch.equal(state.input_ids.to(input_ids.device), input_ids[:, :-1])
            if same_rows or self._reorder(state, input_ids):
                self._advance(state, input_ids)
                return state
        self.stats["prefills"] += 1
        self._prefill(input_ids)
        assert self._state is not None
        return self._state

    @torch.no_grad()
    def __call__(self, input_ids: LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.omega == 0:
            return scores
        self._check_vocabulary(input_ids, scores)
        self.stats["steps"] += 1
        state = self._update(input_ids)
        if state.next_log_probs.shape[-1] < scores.shape[-1]:
            raise ValueError(
                f"The class-conditional LM's vocabulary ({state.next_log_probs.shape[-1]}) is smaller than the "
                f"generating LM's ({scores.shape[-1]}); it must share the generating LM's tokenizer."
            )
        posterior = gedi_class_log_probs(
            state.next_log_probs[..., : scores.shape[-1]],
            state.prefix_ll,
            state.counts,
            class_bias=self.class_bias,
            logit_scale=self.logit_scale,
            length_normalize=self.length_normalize,
        )
        return gedi_logits(scores, posterior[self.desired_class].to(scores.device), self.omega)
