"""Is this call the next step of the same generation, or the start of a new one?

A ``LogitsProcessor`` only sees ``input_ids`` at each step, and one processor object is
often reused across ``generate`` calls. Processors that keep per-generation state (a KV
cache, decoded texts, the prompt length for a schedule) need to know when to start over.
This module is the project's single rule for that, used by every stateful processor:

    a call **continues** the previous one when it has the same number of rows, exactly one
    more column, and the same prompt (the columns of the first call of the generation).

Anything else starts a new generation: another prompt, another batch size, a shorter or
equal length, or several tokens at once (assisted decoding). Beam search reorders rows but
keeps each row's prompt, so it continues. The one case the rule cannot see is a new
``generate`` call whose prompt is the previous call's output with exactly one more token;
call :meth:`GenerationTracker.reset` between such calls.

Pure torch: no transformers import.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["GenerationTracker", "continues_generation"]


def continues_generation(prompt: Tensor | None, previous_length: int, input_ids: Tensor) -> bool:
    """True when ``input_ids`` extend a generation by one token.

    Args:
        prompt: ``(B, P)`` the first ``input_ids`` of the current generation, or ``None``
            when there is none yet (then the answer is False).
        previous_length: the sequence length seen at the previous call, ``>= P``.
        input_ids: ``(B', L)`` this call's sequences.

    Example:
        >>> import torch
        >>> from guidance.lm.generation_state import continues_generation
        >>> prompt = torch.tensor([[1, 2]])
        >>> continues_generation(prompt, 2, torch.tensor([[1, 2, 7]]))
        True
        >>> continues_generation(prompt, 2, torch.tensor([[3, 2, 7]]))  # another prompt
        False
    """
    if prompt is None or input_ids.ndim != 2:
        return False
    if input_ids.shape[0] != prompt.shape[0] or input_ids.shape[1] != previous_length + 1:
        return False
    return bool((input_ids[:, : prompt.shape[1]] == prompt.to(input_ids.device)).all())


class GenerationTracker:
    """Follows ``input_ids`` across calls and says when a new generation starts.

    Call :meth:`update` once per step with the step's ``input_ids`` (``(batch, length)``
    token ids); it returns True on the first step of a generation. :attr:`prompt_length`
    is the length at that first step and :attr:`step` counts the tokens generated since.

    Example:
        >>> import torch
        >>> from guidance.lm.generation_state import GenerationTracker
        >>> tracker = GenerationTracker()
        >>> tracker.update(torch.tensor([[5, 6]])), tracker.update(torch.tensor([[5, 6, 9]])), tracker.step
        (True, False, 1)
        >>> tracker.update(torch.tensor([[4]])), tracker.prompt_length  # a new prompt
        (True, 1)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next :meth:`update` starts a new one."""
        self.prompt_length = 0
        self.length = 0
        self._prompt: Tensor | None = None

    @property
    def step(self) -> int:
        """Tokens generated since the prompt, at the last :meth:`update`."""
        return self.length - self.prompt_length

    def update(self, input_ids: Tensor) -> bool:
        """Record this step's ``input_ids``; True if they begin a new generation."""
        continues = continues_generation(self._prompt, self.length, input_ids)
        self.length = int(input_ids.shape[-1])
        if not continues:
            self.prompt_length = self.length
            self._prompt = input_ids.detach().clone()
        return not continues
