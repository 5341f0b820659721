"""Sampling from a private ``torch.Generator`` inside ``generate``, leaving torch's global one alone.

transformers' ``generate`` draws the sampled token with ``torch.multinomial`` on torch's
global generator and takes no generator argument. :func:`guidance.cfg_generate` takes one
(``generator=``) and hands it to :func:`sample_with_generator`, which

* appends :class:`GeneratorSampling` to the processor list that transformers built (so it
  runs after every warper: temperature, top-k/p, min-p, typical, ...); it draws one token
  per row from ``softmax(scores)`` with the private generator, the same ``torch.multinomial``
  call, and leaves only that token finite;
* switches the decoding loop to argmax, which then emits exactly the drawn token and never
  touches the global generator.

The tokens are distributed exactly as with plain sampling; on one device, a generator seeded
with ``s`` gives the same tokens as ``torch.manual_seed(s)`` followed by plain sampling.
With a generator, ``output_scores`` hold the drawn token only (0 there, ``-inf`` elsewhere):
they are the scores after the sampling step. Ask for ``output_logits`` for the model's logits.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import LongTensor, Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

__all__ = ["GeneratorSampling", "sample_with_generator"]


class GeneratorSampling(LogitsProcessor):
    """Draws each row's next token from ``softmax(scores)`` with ``generator``; keeps only that token.

    The drawn token's score becomes 0 and every other ``-inf``, so a greedy decoding loop
    emits exactly the drawn token. Put it last in the processor list.

    Args:
        generator (`torch.Generator`): the private random generator, on the device of the scores.

    Example:
        >>> import math, torch
        >>> from guidance.lm.sampling import GeneratorSampling
        >>> sample = GeneratorSampling(torch.Generator().manual_seed(0))
        >>> sample(torch.tensor([[1]]), torch.tensor([[0.0, -math.inf, 0.0]])).isfinite().sum().item()
        1
    """

    def __init__(self, generator: torch.Generator) -> None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        self.generator = generator

    def __call__(self, input_ids: LongTensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, -math.inf).scatter_(-1, tokens, 0.0)


def sample_with_generator(
    generator: torch.Generator | None,
    logits_processor: LogitsProcessorList,
    generation_config: GenerationConfig,
) -> tuple[LogitsProcessorList, GenerationConfig]:
    """The processors and config that sample with ``generator`` in a greedy decoding loop.

    Args:
        generator (`torch.Generator`, *optional*): the private generator; ``None`` changes nothing.
        logits_processor (`LogitsProcessorList`): the list ``generate`` built (warpers included);
            not modified.
        generation_config (`GenerationConfig`): the resolved config; not modified.

    Returns ``(logits_processor, generation_config)``: unchanged without a generator or when
    the config does not sample; otherwise a new list ending in :class:`GeneratorSampling`
    and a copy of the config with ``do_sample=False``.

    Example:
        >>> import torch
        >>> from transformers import GenerationConfig, LogitsProcessorList
        >>> from guidance.lm.sampling import sample_with_generator
        >>> processors, config = sample_with_generator(
        ...     torch.Generator(), LogitsProcessorList(), GenerationConfig(do_sample=True))
        >>> [type(p).__name__ for p in processors], config.do_sample
        (['GeneratorSampling'], False)
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    if generator is None or not generation_config.do_sample:
        return logits_processor, generation_config
    greedy = copy.deepcopy(generation_config)
    greedy.do_sample = False
    return LogitsProcessorList([*logits_processor, GeneratorSampling(generator)]), greedy
