"""Tiny random-weight diffusers pipelines built from configs, for tests and benchmarks.

They follow diffusers' own pipeline tests (``get_dummy_components``) but need no hub
access: the CLIP tokenizer is built from a 54-token character vocabulary written to a
temporary folder. Every builder seeds torch before creating each model, so two calls
give identical weights, and restores torch's global random state afterwards (building a
pipeline does not change what ``torch.randn`` returns next).

Example:
    >>> from guidance.diffusion.testing import tiny_stable_diffusion
    >>> pipe = tiny_stable_diffusion()
    >>> out = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="latent")
    >>> tuple(out.images.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache, wraps
from typing import Any, TypeVar

import torch

__all__ = [
    "tiny_clip_tokenizer",
    "tiny_stable_diffusion",
    "tiny_stable_diffusion_xl",
    "tiny_stable_diffusion_3",
    "tiny_dit",
    "tiny_flux_transformer",
]

_Builder = TypeVar("_Builder", bound=Callable[..., Any])


def _keeps_global_rng(build: _Builder) -> _Builder:
    """``build`` seeds torch's CPU generator to make its weights; the caller's random state is restored."""

    @wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[str, str]:
    folder = tempfile.mkdtemp(prefix="guidance-tiny-clip-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in _LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    return vocab_file, merges_file


def tiny_clip_tokenizer(model_max_length: int = 16) -> Any:
    """A character-level ``CLIPTokenizer`` (no merges): every word becomes its letters."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _tokenizer_files()
    return CLIPTokenizer(
        vocab_file, merges_file, model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def _clip_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    config = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=16,
        hidden_act="gelu",
        projection_dim=32,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def _tiny_vae(**overrides: Any) -> Any:
    from diffusers import AutoencoderKL

    config = dict(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return AutoencoderKL(**config).eval()


@_keeps_global_rng
def tiny_stable_diffusion(scheduler: Any = None, seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` with a 2-level UNet (4/8 channels) and a 2-layer CLIP text encoder.

    ``scheduler`` defaults to SD's ``DDIMScheduler`` configuration. Latents are 4 x H/2 x W/2.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    vae = _tiny_vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config())
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_global_rng
def tiny_stable_diffusion_xl(scheduler: Any = None, seed: int = 0) -> Any:
    """A ``StableDiffusionXLPipeline`` with text-time conditioning and two tiny CLIP text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
        )
    vae = _tiny_vae(norm_num_groups=1, block_out_channels=[4, 8])
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_global_rng
def tiny_stable_diffusion_3(scheduler: Any = None, seed: int = 0, num_layers: int = 1) -> Any:
    """A ``StableDiffusion3Pipeline`` (flow matching) with a ``num_layers``-layer ``SD3Transformer2DModel`` (default 1).

    The T5 encoder is left out (the pipeline then uses zeros for it, as SD3 allows);
    pass ``max_sequence_length=4`` to keep those zeros short.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = _tiny_vae(
        block_out_channels=[4],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_global_rng
def tiny_dit(scheduler: Any = None, seed: int = 0) -> Any:
    """A ``DiTPipeline`` (class-conditional, learned variance, ``[cond, uncond]`` batch order)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    vae = _tiny_vae()
    pipe = DiTPipeline(
        transformer=transformer.eval(),
        vae=vae,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_global_rng
def tiny_flux_transformer(seed: int = 0) -> Any:
    """A 1+1-layer ``FluxTransformer2DModel`` with ``guidance_embeds=True`` (a guidance-distilled model)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
