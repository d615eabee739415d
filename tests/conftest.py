"""Shared fixtures: a tiny real Stable Diffusion pipeline folder and a tiny target dataset on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difftune_control.config import RunConfig

# The test models are tiny: one intra-op thread is faster than two and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep every cache (latents, banks, toy datasets) of the test session in a temporary folder."""
    old = os.environ.get("DIFFTUNE_CACHE")
    os.environ["DIFFTUNE_CACHE"] = str(tmp_path_factory.mktemp("difftune-cache"))
    yield
    if old is None:
        os.environ.pop("DIFFTUNE_CACHE", None)
    else:
        os.environ["DIFFTUNE_CACHE"] = old


TINY_WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "grey", "background", "small", "big"]


def tiny_text_encoder(vocab_size: int, max_positions: int = 8, layers: int = 1):
    """A CLIPTextModel of width 16 (pad = eos = 1, bos = 0, as SD1.5's tokenizer numbers them)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()


def tiny_unet(sample_size: int = 8, **overrides):
    """A two-level UNet2DConditionModel (8, 16 channels) with cross-attention width 16 (``overrides``: other
    config values, e.g. wider channels)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def tiny_vae(sample_size: int = 16):
    """A two-level AutoencoderKL (8, 16 channels): images at side R -> latents [4, R/2, R/2]."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=sample_size,
    ).eval()


def tiny_tokenizer(tok_dir: Path):
    """A word-level CLIPTokenizer over TINY_WORDS (letters for anything else), saved in ``tok_dir``."""
    from transformers import CLIPTokenizer

    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in TINY_WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":  # unknown words fall back to letters
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=8)
    tokenizer.save_pretrained(tok_dir)
    return tokenizer


def build_tiny_pipeline(folder: Path) -> Path:
    """Save a tiny SD-architecture pipeline (real diffusers/transformers classes) to ``folder``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(len(tokenizer), max_positions=8)
    unet = tiny_unet()
    vae = tiny_vae()
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


SDXL_TEXT_WIDTHS = (16, 24)  # hidden sizes of the two text encoders: the context is 40 wide
SDXL_POOLED = 12  # projection_dim of the second encoder: text_embeds [N,12]
SDXL_TIME_EMBED = 8  # addition_time_embed_dim: 6 time ids x 8


def build_tiny_sdxl_pipeline(folder: Path) -> Path:
    """Save a tiny SDXL-architecture pipeline (real diffusers/transformers classes) to ``folder``.

    As SDXL: a CLIPTextModel and a CLIPTextModelWithProjection (penultimate states concatenated as the
    context, the second one's projected pooled output as ``text_embeds``), a UNet with
    ``addition_embed_type="text_time"`` whose ``projection_class_embeddings_input_dim`` is
    6 x ``addition_time_embed_dim`` + the pooled width, no attention in the first level, linear
    projections, deeper transformers further down, and an Euler scheduler.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    tokenizer_2 = tiny_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(len(tokenizer), max_positions=8, layers=2)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=SDXL_TEXT_WIDTHS[1],
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            projection_dim=SDXL_POOLED,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
        norm_num_groups=4,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    ).save_pretrained(folder)
    return folder


def build_tiny_dataset(folder: Path, n: int = 24, size: int = 20, seed: int = 0) -> Path:
    """A metadata.jsonl imagefolder: coloured shapes, their edge maps as hints, captions."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "hints").mkdir(exist_ok=True)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    lines = []
    for i in range(n):
        name = list(colors)[i % 3]
        shape = "circle" if rng.random() < 0.5 else "square"
        img = Image.new("RGB", (size, size), (128, 128, 128))
        hint = Image.new("RGB", (size, size), (0, 0, 0))
        x0, y0 = rng.integers(1, size // 2, 2)
        box = [int(x0), int(y0), int(x0) + size // 2, int(y0) + size // 2]
        for im, fill, outline in ((img, colors[name], None), (hint, None, (255, 255, 255))):
            d = ImageDraw.Draw(im)
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=fill, outline=outline)
        img.save(folder / "images" / f"{i:03d}.png")
        hint.save(folder / "hints" / f"{i:03d}.png")
        lines.append(
            {
                "image": f"images/{i:03d}.png",
                "conditioning_image": f"hints/{i:03d}.png",
                "text": f"a {name} {shape} on grey background",
            }
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


# -- a tiny run, configured and set up in-process -------------------------------------------------
PUBLISHED = {"method__bank_weight": 0.1, "method__loss_weighting": "none", "bank__bank_hint": "extracted"}
"""tiny_config overrides for Diff-Tuning as published (fixed lambda, no loss weighting, extracted hints)."""


def tiny_config(pipeline: Path, data: Path, out: Path, **overrides) -> RunConfig:
    cfg = RunConfig()
    cfg.model.pretrained_model_name_or_path = str(pipeline)
    cfg.model.conditioning_embedding_out_channels = [8, 16]
    cfg.data.condition = "canny"
    cfg.data.train_data_dir = str(data)
    cfg.data.resolution = 16
    cfg.train.output_dir = str(out)
    cfg.train.run_name = "run"
    cfg.train.train_batch_size = 4
    cfg.train.max_train_steps = 4
    cfg.train.learning_rate = 1e-3
    cfg.train.checkpointing_steps = 2
    cfg.train.validation_steps = 100
    cfg.train.logging_steps = 1
    cfg.train.report_to = "none"
    cfg.train.device = "cpu"
    cfg.bank.bank_size = 8
    cfg.bank.bank_batch_size = 8
    cfg.bank.bank_num_inference_steps = 2
    cfg.detector.convergence_every = 2
    cfg.detector.convergence_samples = 2
    cfg.detector.convergence_num_inference_steps = 2
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def build_trainer(cfg: RunConfig, mixed_precision: str = "no"):
    """Set up a run in-process with :func:`~difftune_control.training.setup.setup`; its trainer and optimizer."""
    from accelerate.state import AcceleratorState

    from difftune_control.training.setup import setup

    # process-wide singletons: the tests use more than one precision, and --device (cfg.train.device) each
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg.train.mixed_precision = mixed_precision
    run = setup(cfg)
    return run.trainer, run.optimizer


def target_batch(trainer, n: int = 4) -> dict:
    return torch.utils.data.default_collate([trainer.target[i] for i in range(n)])


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture
def clean_env(monkeypatch):
    """No user setting of the compiler's caches or backend; both caches off, as an older torch has them (restored
    after)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from difftune_control.compiler import BACKEND_ENV, CACHE_DIR_ENV, CACHE_SWITCHES

    for name in (CACHE_DIR_ENV, BACKEND_ENV, *CACHE_SWITCHES.values()):
        monkeypatch.delenv(name, raising=False)
    # the config modules' own patch(): monkeypatch's undo deletes a config entry instead of restoring it
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield monkeypatch
