"""NAG on SD3 (joint text+image attention): the negative text stream carried through the blocks.

* The hook on a 2-block SD3 transformer equals a hand-written MMDiT forward with two text
  streams (positive, negative) and NAG on the image tokens' attention output (float32, 1e-5),
  for the whole batch and for some rows only; per-sample negatives and a negative without pooled
  embeddings (the prompt's own pooled embedding modulates the negative stream).
* The model is restored exactly (processors and hooks), also after an exception.
* Through ``attach`` on the tiny SD3 pipeline: off is bit-identical to the plain pipeline, NAG
  alone is one evaluation per step and equals the pipeline run on the reference forward, CFG + NAG
  batches with the pipeline's negative prompt and equals separate calls. Flux is refused.
"""

from __future__ import annotations

import functools

import pytest
import torch

from guidance.diffusion import attach, prompt_inputs
from guidance.diffusion.testing import tiny_flux_transformer, tiny_stable_diffusion_3
from guidance.guiders import NormalizedAttention
from guidance.perturbations import NormalizedCrossAttention

STEPS = 2
PROMPTS = ["a cat", "dog"]
SEQ = 4  # max_sequence_length: the T5 zeros appended to the CLIP tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ a hand-written MMDiT forward with NAG


def nag_formula(z_pos, z_neg, s, tau, alpha):
    """The paper's formula in float64, L1 norms over features."""
    zp, zn = z_pos.double(), z_neg.double()
    extrapolated = s * zp - (s - 1) * zn
    ratio = extrapolated.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    factor = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    return (alpha * extrapolated * factor + (1 - alpha) * zp).float()


def _joint_attention(attn, image, text):
    """Softmax attention of [image; text] queries over [image; text] keys; (image part, text part)."""
    assert attn.norm_q is None and attn.norm_added_q is None

    def heads(x):
        return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q = torch.cat([heads(attn.to_q(image)), heads(attn.add_q_proj(text))], dim=2)
    k = torch.cat([heads(attn.to_k(image)), heads(attn.add_k_proj(text))], dim=2)
    v = torch.cat([heads(attn.to_v(image)), heads(attn.add_v_proj(text))], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(image.shape[0], -1, q.shape[1] * q.shape[-1])
    return out[:, : image.shape[1]], out[:, image.shape[1] :]


def _text_update(block, text, temb, attended):
    """The context branch of an MMDiT block for one text stream (None after the last block)."""
    if block.context_pre_only:
        return None
    _, gate, shift, scale, gate_mlp = block.norm1_context(text, emb=temb)
    text = text + gate.unsqueeze(1) * block.attn.to_add_out(attended)
    normed = block.norm2_context(text) * (1 + scale[:, None]) + shift[:, None]
    return text + gate_mlp.unsqueeze(1) * block.ff_context(normed)


def _normed_text(block, text, temb):
    if block.context_pre_only:
        return block.norm1_context(text, temb)
    return block.norm1_context(text, emb=temb)[0]


def reference_forward(tr, x, context, pooled, timestep, negative, negative_pooled, s, tau, alpha, blocks=None):
    """SD3 forward, all rows guided: image tokens attend to both text streams, NAG on the image part.

    ``blocks``: the indices of the blocks that guide (``None``: all); the others use ``z+``.
    """
    height, width = x.shape[-2:]
    image = tr.pos_embed(x)
    temb, temb_neg = tr.time_text_embed(timestep, pooled), tr.time_text_embed(timestep, negative_pooled)
    text, text_neg = tr.context_embedder(context), tr.context_embedder(negative)
    for index, block in enumerate(tr.transformer_blocks):
        guided = blocks is None or index in blocks
        normed, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(image, emb=temb)
        z_pos, t_pos = _joint_attention(block.attn, normed, _normed_text(block, text, temb))
        z_neg, t_neg = _joint_attention(block.attn, normed, _normed_text(block, text_neg, temb_neg))
        image = image + gate.unsqueeze(1) * block.attn.to_out[0](nag_formula(z_pos, z_neg, s if guided else 1.0, tau, alpha))
        ff_in = block.norm2(image) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        image = image + gate_mlp.unsqueeze(1) * block.ff(ff_in)
        text, text_neg = _text_update(block, text, temb, t_pos), _text_update(block, text_neg, temb_neg, t_neg)
    out = tr.proj_out(tr.norm_out(image, temb))
    p, c = tr.config.patch_size, tr.config.out_channels
    out = out.reshape(x.shape[0], height // p, width // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], c, height, width)


@functools.cache
def _pipe():
    return tiny_stable_diffusion_3(num_layers=2)  # 2 blocks: the negative text stream is carried once


def _state(module):
    processors = {n: m.get_processor() for n, m in module.named_modules() if hasattr(m, "set_processor")}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    return processors, hooks


def _same_state(module, before):
    processors, hooks = _state(module)
    return hooks == before[1] and all(processors[k] is v for k, v in before[0].items())


def _inputs(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 6, 64, generator=gen),
            torch.randn(n, 64, generator=gen), torch.tensor([700.0] * n))


def _call(tr, x, context, pooled, t):
    return tr(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample


def test_hook_equals_the_hand_written_forward_and_acts_per_row():
    tr = _pipe().transformer
    x, context, pooled, t = _inputs()
    gen = torch.Generator().manual_seed(1)
    negative = {"encoder_hidden_states": torch.randn(1, 6, 64, generator=gen),
                "pooled_projections": torch.randn(1, 64, generator=gen)}
    hook = NormalizedCrossAttention(negative, scale=4.0, tau=2.0, alpha=0.5, pooled="negative")
    before = _state(tr)
    with torch.no_grad():
        plain = _call(tr, x, context, pooled, t)
        with hook.apply(tr, None):
            whole = _call(tr, x, context, pooled, t)
        with hook.apply(tr, slice(1, 3)):
            rows = _call(tr, x, context, pooled, t)
        expected = reference_forward(tr, x, context, pooled, t, negative["encoder_hidden_states"].expand(3, -1, -1),
                                     negative["pooled_projections"].expand(3, -1), 4.0, 2.0, 0.5)
    assert _same_state(tr, before)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, plain, atol=1e-3)
    torch.testing.assert_close(rows[:1], plain[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[1:], whole[1:], rtol=1e-5, atol=1e-6)


def test_per_sample_negatives_and_the_prompts_pooled_embedding_by_default():
    tr = _pipe().transformer
    x, context, pooled, t = _inputs(2, seed=2)
    negative = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    with_pooled = {"encoder_hidden_states": negative, "pooled_projections": torch.randn(2, 64)}
    with torch.no_grad():
        with NormalizedCrossAttention(with_pooled, scale=3.0).apply(tr, None):  # pooled="prompt": ignored
            default = _call(tr, x, context, pooled, t)
        with NormalizedCrossAttention(negative, scale=3.0, norm="l1").apply(tr, None):
            got = _call(tr, x, context, pooled, t)
        expected = reference_forward(tr, x, context, pooled, t, negative, pooled, 3.0, 2.5, 0.25)
        with NormalizedCrossAttention(negative[:1], scale=3.0).apply(tr, slice(1, 2)):
            one = _call(tr, x, context, pooled, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(default, got)
    torch.testing.assert_close(one[1:], reference_forward(tr, x[1:], context[1:], pooled[1:], t[1:], negative[:1],
                                                          pooled[1:], 3.0, 2.5, 0.25), rtol=1e-5, atol=1e-5)


def test_chosen_layers_guide_and_every_block_carries_the_negative_stream():
    tr = _pipe().transformer
    x, context, pooled, t = _inputs(2, seed=4)
    negative = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), NormalizedCrossAttention(negative, scale=6.0, layers="transformer_blocks.1").apply(tr, None):
        got = _call(tr, x, context, pooled, t)
    expected = reference_forward(tr, x, context, pooled, t, negative.expand(2, -1, -1), pooled, 6.0, 2.5, 0.25,
                                 blocks={1})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooled"):
        NormalizedAttention(1.0, 5.0, pooled="uncond")


def test_the_model_is_restored_after_an_exception_and_bad_negatives_are_named():
    tr = _pipe().transformer
    before = _state(tr)
    x, context, pooled, t = _inputs(2)
    for negative, pooled_from, match in [
        (torch.randn(1, 5, 64), "prompt", "same length"),
        (torch.randn(3, 6, 64), "prompt", "3 rows"),
        ({"encoder_hidden_states": torch.randn(1, 6, 64), "pooled_projections": torch.randn(1, 7)}, "negative",
         "features"),
        (torch.randn(1, 6, 64), "negative", "pooled_projections"),
    ]:
        with pytest.raises(ValueError, match=match), torch.no_grad():
            with NormalizedCrossAttention(negative, pooled=pooled_from).apply(tr, None):
                _call(tr, x, context, pooled, t)
        assert _same_state(tr, before)
    with torch.no_grad():
        torch.testing.assert_close(_call(tr, x, context, pooled, t), _call(tr, x, context, pooled, t))


# ------------------------------------------------------------------ through attach on the tiny SD3 pipeline


def _gens(n=2 * len(PROMPTS)):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _run(pipe, **kwargs):
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, height=16, width=16,
                max_sequence_length=SEQ, output_type="latent", generator=_gens(), **kwargs).images


def test_nag_off_is_bit_identical_to_the_plain_sd3_pipeline():
    pipe = _pipe()
    negative = prompt_inputs(pipe, "blurry", max_sequence_length=SEQ)
    plain_cfg, plain = _run(pipe, guidance_scale=3.0), _run(pipe, guidance_scale=1.0)
    with attach(pipe, NormalizedAttention(3.0, 1.0, negative=negative)):
        assert torch.equal(_run(pipe), plain_cfg)
    with attach(pipe, NormalizedAttention(3.0, 5.0, alpha=0.0, negative=negative)):
        assert torch.equal(_run(pipe), plain_cfg)
    with attach(pipe, NormalizedAttention(1.0, 1.0, negative=negative)):
        assert torch.equal(_run(pipe), plain)


def test_nag_alone_through_attach_equals_the_pipeline_on_the_reference_forward():
    pipe = _pipe()
    tr = pipe.transformer
    negative = prompt_inputs(pipe, "blurry", max_sequence_length=SEQ)
    before = _state(tr)
    with attach(pipe, NormalizedAttention(1.0, 5.0, negative=negative)) as handle:
        got = _run(pipe)
    assert handle.stats.forward_calls == STEPS and handle.stats.branch_rows == {"cond": 4 * STEPS}
    assert _same_state(tr, before)

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=True, **kwargs):
        n = hidden_states.shape[0]
        sample = reference_forward(
            tr, hidden_states, encoder_hidden_states, pooled_projections, timestep,
            negative["encoder_hidden_states"].expand(n, -1, -1), pooled_projections, 5.0, 2.5, 0.25)
        return (sample,)

    tr.forward = forward
    try:
        expected = _run(pipe, guidance_scale=1.0)  # the pipeline's own conditional-only run
    finally:
        del tr.forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _run(pipe, guidance_scale=1.0), atol=1e-4)


def test_cfg_plus_nag_batches_with_the_pipeline_negative_prompt():
    pipe = _pipe()
    guider = NormalizedAttention(3.0, 4.0, negative=prompt_inputs(pipe, "blurry", max_sequence_length=SEQ))
    with attach(pipe, guider) as handle:
        batched = _run(pipe, negative_prompt=["ugly", "ugly"])
    with attach(pipe, guider, evaluator="separate") as separate:
        expected = _run(pipe, negative_prompt=["ugly", "ugly"])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4)
    assert handle.stats.forward_calls == STEPS and separate.stats.forward_calls == 2 * STEPS
    assert not torch.allclose(batched, _run(pipe, guidance_scale=3.0, negative_prompt=["ugly", "ugly"]), atol=1e-4)


def test_flux_is_refused():
    with pytest.raises(ValueError, match="Flux"):
        NormalizedCrossAttention(torch.randn(1, 4, 32)).apply(tiny_flux_transformer(), None).__enter__()


# ------------------------------------------------------------------ modular guider component (SD3 modular pipeline)


@functools.cache
def _sd3_modular():
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    sd = _pipe()
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=sd.transformer, scheduler=sd.scheduler)
    gen = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, 6, 64, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
        "negative_prompt_embeds": torch.randn(1, 6, 64, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
    }
    return pipe, sd.transformer, embeds


def _modular_run(guider):
    pipe, tr, embeds = _sd3_modular()
    calls = []
    handle = tr.time_text_embed.register_forward_hook(lambda m, a, o: calls.append(1))
    pipe.update_components(guider=guider)
    try:
        latents = pipe(**embeds, height=64, width=64, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(0), output="latents")
    finally:
        handle.remove()
    return latents, len(calls)


def _modular_reference(negative_pooled):
    """The modular pipeline without guidance, its transformer replaced by the hand-written NAG forward."""
    from diffusers.guiders import ClassifierFreeGuidance

    _, tr, embeds = _sd3_modular()

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=True, **kwargs):
        n = hidden_states.shape[0]
        neg_pooled = pooled_projections if negative_pooled is None else negative_pooled.expand(n, -1)
        return (reference_forward(tr, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                  embeds["negative_prompt_embeds"].expand(n, -1, -1), neg_pooled, 4.0, 2.5, 0.25),)

    tr.forward = forward
    try:
        return _modular_run(ClassifierFreeGuidance(1.0))[0]
    finally:
        del tr.forward


def test_modular_nag_component_in_the_sd3_modular_pipeline():
    from diffusers.guiders import ClassifierFreeGuidance

    from guidance.diffusion.modular_perturbed import NAGGuidance

    _, tr, embeds = _sd3_modular()
    before = _state(tr)
    cfg, cfg_calls = _modular_run(ClassifierFreeGuidance(5.0))
    off, off_calls = _modular_run(NAGGuidance(5.0, 1.0))
    assert torch.equal(off, cfg) and off_calls == cfg_calls == 2 * STEPS
    only, calls = _modular_run(NAGGuidance(1.0, 4.0))  # negative: the pipeline's negative_prompt_embeds
    assert calls == STEPS and _same_state(tr, before)
    torch.testing.assert_close(only, _modular_reference(None), rtol=1e-5, atol=1e-5)
    pooled, _ = _modular_run(NAGGuidance(1.0, 4.0, nag_pooled="negative"))
    torch.testing.assert_close(pooled, _modular_reference(embeds["negative_pooled_prompt_embeds"]),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pooled, only, atol=1e-5) and _same_state(tr, before)


def test_sd35_style_blocks_with_qk_norm_and_dual_attention():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                               pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm",
                               dual_attention_layers=(0,)).eval()
    x, context, pooled, t = _inputs(3, seed=6)
    before = _state(tr)
    hook = NormalizedCrossAttention(torch.randn(1, 6, 64), scale=4.0)
    with torch.no_grad():
        plain = _call(tr, x, context, pooled, t)
        with hook.apply(tr, slice(2, 3)):
            rows = _call(tr, x, context, pooled, t)
        with hook.apply(tr, None):
            whole = _call(tr, x, context, pooled, t)
        with NormalizedCrossAttention(torch.randn(1, 6, 64), scale=1.0).apply(tr, None):
            off = _call(tr, x, context, pooled, t)
    assert _same_state(tr, before) and torch.isfinite(whole).all()
    torch.testing.assert_close(rows[:2], plain[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[2:], whole[2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-6)  # s = 1: the negative stream changes nothing
    assert not torch.allclose(whole, plain, atol=1e-3)
