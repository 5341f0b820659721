"""Beam search (and beam sampling) on classifier-free-guided scores.

The search is transformers' vectorised beam search, written here on public ground so that
both CFG branches can run in one batch: every step scores the ``num_beams`` running beams
of each prompt with ``log_softmax`` of the guided next-token scores (then the generation
config's processors), keeps the best ``max(2, 1 + #eos) * num_beams`` continuations, moves
the best finished ones (length-penalised) into a ``num_beams``-wide pool of hypotheses, and
continues the best unfinished ones. The KV cache rows of BOTH branches follow their beams
(:meth:`guidance.lm.two_branch.TwoBranchForward.reorder`).

The guided distribution is renormalised before it is added to the beam score, so beam
scores are log-probabilities of the guided distribution: exactly what transformers' beam
search gives for a model whose logits ARE the guided scores (the parity test in
``tests/test_lm_beams.py`` runs such a model through transformers' own beam search).
``length_penalty``, ``early_stopping`` (``True``, ``False``, ``"never"``) and
``num_return_sequences`` keep transformers' meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerateBeamDecoderOnlyOutput

from guidance.lm.two_branch import OutputRecord, TwoBranchForward

__all__ = ["cfg_beam_search"]

_NEG = -1.0e9  # "impossible" score, as transformers uses


@dataclass
class _Beams:
    """Per prompt ``b`` and beam ``k``: the running beams and the pool of finished hypotheses."""

    sequences: Tensor  # (B, K, max_length) running beams, padded with the fill value
    scores: Tensor  # (B, K) summed log-probs of the running beams
    origins: Tensor  # (B, K, max_new) flat row each generated token came from (-1: none)
    done_sequences: Tensor  # (B, K, max_length) best finished hypotheses
    done_scores: Tensor  # (B, K) their length-penalised scores (-1e9: empty slot)
    done_origins: Tensor  # (B, K, max_new)
    done: Tensor  # (B, K) whether a pool slot holds a finished hypothesis
    improvable: Tensor  # (B, 1) whether running beams can still beat the pool


def _eos_count(generation_config: GenerationConfig) -> int:
    eos = generation_config.eos_token_id
    if eos is None:
        return 0
    return 1 if isinstance(eos, int) else len(list(eos))


def _fill_value(generation_config: GenerationConfig) -> int:
    """Token that pads unfilled positions of the returned sequences (transformers' choice)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return -1
    first_eos = eos if isinstance(eos, int) else list(eos)[0]
    pad = generation_config.pad_token_id
    pad = first_eos if pad is None else pad
    return pad if pad else first_eos


def _initial_beams(input_ids: LongTensor, num_beams: int, max_length: int, fill: int) -> _Beams:
    rows, prompt_len = input_ids.shape
    batch, device = rows // num_beams, input_ids.device
    sequences = torch.full((batch, num_beams, max_length), fill, dtype=torch.int64, device=device)
    sequences[:, :, :prompt_len] = input_ids.view(batch, num_beams, prompt_len)
    scores = torch.zeros((batch, num_beams), dtype=torch.float32, device=device)
    scores[:, 1:] = _NEG  # all beams start equal: only the first may expand at the first step
    origins = torch.full((batch, num_beams, max_length - prompt_len), -1, dtype=torch.int32, device=device)
    return _Beams(
        sequences=sequences,
        scores=scores,
        origins=origins,
        done_sequences=sequences.clone(),
        done_scores=torch.full((batch, num_beams), _NEG, dtype=torch.float32, device=device),
        done_origins=origins.clone(),
        done=torch.zeros((batch, num_beams), dtype=torch.bool, device=device),
        improvable=torch.ones((batch, 1), dtype=torch.bool, device=device),
    )


def _take(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[b, index[b, j], ...]`` for a ``(B, N, ...)`` tensor and a ``(B, M)`` index."""
    while index.ndim < tensor.ndim:
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _candidates(
    beams: _Beams, log_probs: Tensor, cur_len: int, prompt_len: int, keep: int, do_sample: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``keep`` best (or sampled) continuations of each prompt: scores, sequences, origins."""
    batch, num_beams = beams.scores.shape
    total = (log_probs.view(batch, num_beams, -1) + beams.scores[:, :, None]).view(batch, -1)
    if do_sample:
        picked = torch.multinomial(torch.softmax(total, dim=-1), num_samples=keep)
        picked_scores, order = torch.gather(total, 1, picked).sort(dim=-1, descending=True)
        picked = picked.gather(1, order)
    else:
        picked_scores, picked = torch.topk(total, k=keep)
    vocab = total.shape[-1] // num_beams
    source, token = picked // vocab, picked % vocab
    sequences = _take(beams.sequences, source)
    sequences[:, :, cur_len] = token
    origins = _take(beams.origins, source)
    origins[:, :, cur_len - prompt_len] = source + torch.arange(batch, device=source.device)[:, None] * num_beams
    return picked_scores, sequences, origins


def _continue_running(beams: _Beams, scores: Tensor, sequences: Tensor, origins: Tensor, hits: Tensor) -> None:
    """The best ``num_beams`` candidates that did not just finish keep running."""
    alive_scores = scores + hits.to(torch.float32) * _NEG
    best = torch.topk(alive_scores, k=beams.scores.shape[1])[1]
    beams.sequences, beams.scores, beams.origins = _take(sequences, best), _take(alive_scores, best), _take(origins, best)


def _collect_finished(
    beams: _Beams, scores: Tensor, sequences: Tensor, origins: Tensor, hits: Tensor, new_len: int, config: Any
) -> None:
    """Candidates among the top ``num_beams`` that just finished enter the pool if they beat it."""
    num_beams = beams.scores.shape[1]
    in_top = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    in_top[:num_beams] = True
    finished_now = hits & in_top[None, :]
    penalised = scores / (new_len**config.length_penalty)
    pool_full = torch.all(beams.done, dim=-1, keepdim=True) & (config.early_stopping is True)
    penalised = penalised + pool_full.to(torch.float32) * _NEG
    penalised = penalised + (~beams.improvable).to(torch.float32) * _NEG
    penalised = penalised + (~finished_now) * _NEG
    merged_scores = torch.cat([beams.done_scores, penalised], dim=1)
    best = torch.topk(merged_scores, k=num_beams)[1]
    beams.done_scores = _take(merged_scores, best)
    beams.done_sequences = _take(torch.cat([beams.done_sequences, sequences], dim=1), best)
    beams.done_origins = _take(torch.cat([beams.done_origins, origins], dim=1), best)
    beams.done = _take(torch.cat([beams.done, finished_now], dim=1), best)


def _update_improvable(beams: _Beams, generated: int, max_new: int, config: Any) -> None:
    """Can the best running beam still beat the worst finished hypothesis (transformers' heuristic)?"""
    length = max_new if config.early_stopping == "never" and config.length_penalty > 0.0 else generated
    best_possible = beams.scores[:, :1] / (length**config.length_penalty)
    worst_done = torch.where(beams.done, torch.min(beams.done_scores, dim=1, keepdim=True)[0], _NEG)
    beams.improvable = beams.improvable & torch.any(best_possible > worst_done, dim=-1, keepdim=True)


def _search_continues(beams: _Beams, hits: Tensor, config: Any) -> bool:
    pool_closed = torch.all(beams.done) & (config.early_stopping is True)
    return bool(torch.any(beams.improvable) & ~pool_closed & ~torch.all(hits))


def cfg_beam_search(
    forward: TwoBranchForward,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    scales: list[float],
    combine: Callable[[Tensor, Tensor, float], Tensor],
) -> GenerateBeamDecoderOnlyOutput | LongTensor:
    """Beam search over guided scores; ``input_ids`` holds ``num_beams`` copies of each prompt."""
    config = generation_config
    num_beams, (rows, prompt_len) = config.num_beams, input_ids.shape
    max_length = int(config.max_length)
    keep = max(2, 1 + _eos_count(config)) * num_beams
    beams = _initial_beams(input_ids, num_beams, max_length, _fill_value(config))
    record = OutputRecord(forward, config)
    last_guided = max(i for i, scale in enumerate(scales) if scale != 1.0)
    running, cur_len = input_ids, prompt_len
    for step in range(max_length - prompt_len):
        outputs = forward()
        scores, cond_logits = forward.next_scores(outputs, scales[min(step, len(scales) - 1)], combine, step)
        log_probs = logits_processor(running, torch.log_softmax(scores, dim=-1))
        record.add(outputs, log_probs.clone(), cond_logits.clone())
        del outputs
        cand_scores, cand_seqs, cand_origins = _candidates(beams, log_probs, cur_len, prompt_len, keep, config.do_sample)
        hits = stopping_criteria(cand_seqs[:, :, : cur_len + 1].reshape(-1, cur_len + 1), record.scores)
        hits = hits.view(cand_scores.shape)
        _continue_running(beams, cand_scores, cand_seqs, cand_origins, hits)
        _collect_finished(beams, cand_scores, cand_seqs, cand_origins, hits, cur_len + 1 - prompt_len, config)
        forward.reorder(beams.origins[:, :, cur_len - prompt_len].reshape(-1).long())
        if step >= last_guided:
            forward.drop_unconditional()
        forward.append(beams.sequences[:, :, cur_len].reshape(-1))
        cur_len += 1
        _update_improvable(beams, cur_len - prompt_len, max_length - prompt_len, config)
        if not _search_continues(beams, hits, config):
            break
        running = beams.sequences[:, :, :cur_len].reshape(rows, cur_len)
    return _beam_output(beams, record, config, prompt_len)


def _beam_output(beams: _Beams, record: Any, config: GenerationConfig, prompt_len: int) -> Any:
    returned = config.num_return_sequences or 1
    sequences = beams.done_sequences[:, :returned].flatten(0, 1)
    scores = beams.done_scores[:, :returned].flatten(0, 1)
    origins = beams.done_origins[:, :returned].flatten(0, 1)
    generated = int((origins + 1).bool().sum(dim=1).max())
    sequences, origins = sequences[:, : prompt_len + generated], origins[:, :generated]
    if not record.want_dict:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=scores if config.output_scores else None,
        scores=record.scores,
        logits=record.logits,
        beam_indices=origins,
        attentions=record.attentions,
        hidden_states=record.hidden_states,
    )
