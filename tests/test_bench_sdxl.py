"""scripts/bench_sdxl.py's pieces at tiny size on the CPU: the model builder, the synthetic SDXL rows under
our trainer, the FLOP count, the settings and the report; and diffusers' SDXL example under bf16 (slow)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import SDXL_POOLED, SDXL_TEXT_WIDTHS, SDXL_TIME_EMBED

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_sdxl import build_sdxl, report, sdxl_rows, settings  # noqa: E402
from bench_throughput import make_ours, train_flop_per_image  # noqa: E402

# conftest's tiny SDXL architecture, as build_sdxl's config arguments; a VAE of four levels, as SDXL's
# (latents at R/8, the size the ControlNet's hint encoder makes of a hint)
TINY_UNET = dict(
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=sum(SDXL_TEXT_WIDTHS), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED, norm_num_groups=4,
)  # fmt: skip
TINY_TEXT = dict(
    hidden_size=SDXL_TEXT_WIDTHS[0], intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
)
TINY_TEXT_2 = dict(
    hidden_size=SDXL_TEXT_WIDTHS[1], intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    projection_dim=SDXL_POOLED,
)  # fmt: skip
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
EXAMPLE = ROOT / "third_party" / "diffusers_example" / "train_controlnet_sdxl.py"


@pytest.fixture(scope="module")
def tiny_random_sdxl(tmp_path_factory) -> Path:
    return build_sdxl(
        tmp_path_factory.mktemp("bench-sdxl") / "model",
        unet=TINY_UNET, text_encoder=TINY_TEXT, text_encoder_2=TINY_TEXT_2, vae=TINY_VAE,
    )  # fmt: skip


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # make_ours trains in bf16; other tests in fp32
    yield
    AcceleratorState._reset_state()


def unet_config(folder: Path) -> dict:
    from diffusers import UNet2DConditionModel

    return dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))


def test_built_folder_is_an_sdxl_pipeline_in_bf16_for_both_loaders(tiny_random_sdxl):
    from diffusers import DDPMScheduler
    from safetensors import safe_open

    from difftune_control.config import ModelConfig
    from difftune_control.training.runtime import load_base_model

    assert not tiny_random_sdxl.with_name("model.partial").exists()
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder_2/model"):
        with safe_open(str(tiny_random_sdxl / f"{part}.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, part  # noqa: SIM118 - not a dict
    base = load_base_model(
        ModelConfig(pretrained_model_name_or_path=str(tiny_random_sdxl)), torch.device("cpu"), torch.bfloat16
    )
    assert base.kind == "sdxl" and base.force_zeros_negative
    assert base.tokenizer.model_max_length == base.tokenizer_2.model_max_length == 77
    assert base.text_encoder_2.config.projection_dim == SDXL_POOLED
    ddpm = DDPMScheduler.from_pretrained(tiny_random_sdxl, subfolder="scheduler")  # as the example loads it
    assert (ddpm.config.beta_schedule, ddpm.config.beta_end, ddpm.config.prediction_type) == (
        "scaled_linear", 0.012, "epsilon",
    )  # fmt: skip
    assert build_sdxl(tiny_random_sdxl) == tiny_random_sdxl  # built once: the second call only finds it

    # the synthetic rows have the shapes and time ids of what the model's own encoders make of a prompt
    ehs, added = base.prompt_encoder(16)(["a red circle"])
    row = sdxl_rows(3, unet_config(tiny_random_sdxl), resolution=16, tokens=77)[1]
    assert row["encoder_hidden_states"].shape == ehs.shape[1:]
    assert row["text_embeds"].shape == added["text_embeds"].shape[1:]
    assert torch.equal(row["time_ids"], added["time_ids"][0].float())
    assert row["latents"].shape == (4, 2, 2) and row["conditioning_pixel_values"].dtype == torch.uint8


def test_our_trainer_steps_on_sdxl_rows_and_the_flop_count_matches_its_step(
    tiny_sdxl_pipeline_dir, fresh_accelerator_state
):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = unet_config(tiny_sdxl_pipeline_dir)
    rows = functools.partial(sdxl_rows, unet_config=config, resolution=16)
    trainer, opt, _ = make_ours(tiny_sdxl_pipeline_dir, 2, "difftuning", rows=rows, device="cpu")
    assert trainer.batch_keys[-2:] == ("text_embeds", "time_ids") and trainer.bank is not None
    unet = {k: v.clone() for k, v in trainer.base.unet.state_dict().items()}
    before = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}
    batch = torch.utils.data.default_collate([trainer.target[i] for i in range(2)])
    for _ in range(2):
        parts = trainer.training_step(batch)
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(parts["loss"])
    assert all(torch.equal(v, unet[k]) for k, v in trainer.base.unet.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.controlnet.state_dict().items())

    # The meta-device count is the FLOPs of a vanilla step per image, exactly: the same operators at the
    # same shapes (attention through the math kernel, which the counter sees as matmuls)
    trainer, _, _ = make_ours(tiny_sdxl_pipeline_dir, 2, "vanilla", rows=rows, device="cpu")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        trainer.training_step(batch)
    assert counter.get_total_flops() / 2 == train_flop_per_image(config, rows(1))


def test_settings_run_batch_1_with_checkpointing_and_every_optimizer():
    got = [
        (s["impl"][0], s["batch"], s["checkpointing"], s.get("speed"))
        for s in settings([4, 1], ["vanilla"], True)
    ]
    assert got == [
        ("d", 4, False, None), ("o", 4, False, "default"),
        ("d", 1, True, None), ("o", 1, True, "default"), ("o", 1, True, "adafactor"),
        ("o", 1, True, "adafactor+fused"),
    ]  # fmt: skip
    assert all(s["impl"] == "ours" for s in settings([8], ["vanilla", "difftuning"], False))
    picked = [(s["batch"], s["speed"]) for s in settings([8, 1], ["difftuning"], False, ["adafactor+fused"])]
    assert picked == [(8, "default"), (1, "adafactor+fused")]  # the batch-1 choice leaves batch 8 alone


def test_report_gives_ratios_targets_and_failures():
    example = {"impl": "diffusers example", "batch": 4, "gradient_checkpointing": False, "optimizer": "adamw",
               "images_per_s": 2.0, "peak_gib_nvsmi": 60.0, "mfu": 0.2}  # fmt: skip
    ours = {"impl": "ours", "method": "vanilla", "batch": 4, "gradient_checkpointing": False,
            "optimizer": "adamw", "images_per_s": 3.2, "peak_gib": 40.0, "mfu": 0.32}  # fmt: skip
    small = {**ours, "batch": 1, "gradient_checkpointing": True, "optimizer": "adafactor", "images_per_s": 1.0,
             "peak_gib": 15.0, "peak_reserved_gib": 16.5, "setup_gib": 11.0, "text_encoders_vae_gib": 1.6}  # fmt: skip
    failed = {"impl": "ours", "method": "difftuning", "batch": 8, "error": "OutOfMemoryError()"}
    md = report([example, ours, small, failed], 20e12)
    assert "| ours | vanilla | 4 | False | AdamW | 3.20 | 40.0 | 32% |" in md
    assert (
        "| diffusers example | vanilla | 4 | False | AdamW (no Adafactor option) | 2.00 | 60.0 (nvidia-smi) |"
        in md
    )
    assert "- batch 4, vanilla, AdamW: 1.60x" in md
    assert "1.60x the example's images/s (>= 1.5x: met)" in md
    assert (
        "16.50 GiB reserved (under 16 GiB reserved: not met)" in md
        and "text encoders and VAE left on the GPU 1.60" in md
    )
    assert "Failed: ours difftuning batch 8: OutOfMemoryError()" in md
    json.dumps([example, ours, small, failed])  # results.json takes the same rows


@pytest.mark.slow
@pytest.mark.skipif(not EXAMPLE.is_file(), reason="needs third_party/diffusers_example (git-ignored)")
def test_diffusers_sdxl_example_needs_the_cast_under_bf16(tiny_random_sdxl, tmp_path, monkeypatch):
    """The example as it is fails at its first bf16 step (float32 prompt embeddings into the bf16 UNet);
    through example_unet_cast.py it trains, and the benchmark reads its rate."""
    from bench_throughput import bench_example, make_parquet

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the example's datasets cache
    data = make_parquet(tmp_path / "data", n=8, resolution=16)
    run = functools.partial(bench_example, EXAMPLE, tiny_random_sdxl, data, 2, 3, resolution=16, timeout=300)
    as_is = run(tmp_path / "as-is.log")
    assert "error" in as_is
    assert re.search(
        r"expected m(at)?1 and m(at)?2 to have the same dtype", (tmp_path / "as-is.log").read_text()
    )
    cast = run(tmp_path / "cast.log", wrapper=ROOT / "scripts" / "example_unet_cast.py")
    assert "error" not in cast, cast.get("error")
    assert cast["images_per_s"] > 0 and cast["wrapper"] == "example_unet_cast.py"
    shutil.rmtree("/tmp/diffusers-example-out", ignore_errors=True)


def test_batch_1_difftuning_with_the_fused_pass_steps_as_the_benchmark_runs_it(
    tiny_sdxl_pipeline_dir, fresh_accelerator_state
):
    """The next GPU call's setting on tiny SDXL: batch 1, checkpointing, Adafactor in backward, Diff-Tuning."""
    config = unet_config(tiny_sdxl_pipeline_dir)
    rows = functools.partial(sdxl_rows, unet_config=config, resolution=16)
    trainer, opt, _ = make_ours(
        tiny_sdxl_pipeline_dir, 1, "difftuning", True, "adafactor+fused", rows=rows, device="cpu"
    )
    assert trainer.optimizer_in_backward is opt and trainer.cfg.train.optimizer == "adafactor"
    before = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}
    batch = torch.utils.data.default_collate([trainer.target[0]])
    sources = set()
    for _ in range(12):
        parts = trainer.training_step(batch)
        sources.add(parts["bank_share"])
        opt.step()  # a no-op: the update happened in backward
    assert sources == {0.0, 1.0}  # target rows and bank rows, one at a time
    assert all(p.grad is None for p in trainer.controlnet.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.controlnet.state_dict().items())


def test_memory_profile_finds_what_is_alive_at_the_peak():
    from profile_sdxl_memory import live_at_peak

    def frame(name):
        return [{"filename": "/x/difftune_control/methods/base.py", "line": 1, "name": name}]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frame("weights")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frame("activations")},
        {"action": "alloc", "addr": 3, "size": 30, "frames": frame("activations")},
        {"action": "free_requested", "addr": 2, "size": 50},  # not yet free
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 4, "size": 10, "frames": frame("later")},  # 140 < 180: not a new peak
    ]
    peak, groups = live_at_peak({"device_traces": [trace]})
    assert peak == 180
    assert groups == {"base.py:1 weights": 100, "base.py:1 activations": 80}


def test_the_examples_rate_is_read_at_evenly_spaced_steps_and_chunks_give_a_range():
    from bench_throughput import example_rate, example_rates, rate_text

    bar = "".join(
        f"\rSteps:  {100 * n // 15}%|###| {n}/15 [00:{n:02d}<00:10, {rate}{unit}, lr=1e-05, loss=0.1]"
        for n, rate, unit in [(1, "9.00", "s/it"), (4, "2.00", "it/s"), (5, "2.10", "it/s"), (11, "2.30", "it/s"),
                              (15, "2.50", "it/s"), (15, "1.90", "it/s")]  # the last refresh: after the save
    )  # fmt: skip
    assert example_rates(bar, 3) == [2.10, 2.30, 2.50]  # steps 5, 11 (the first shown at or past 10) and 15
    assert example_rate(bar) == 2.50
    assert example_rates(bar.replace("15/15", "14/15"), 3) == []  # never reached its last step
    assert rate_text({"images_per_s": 2.3, "images_per_s_chunks": [2.1, 2.3, 2.5]}, 2) == "2.30 [2.10, 2.50]"
    assert rate_text({"images_per_s": 2.3}) == "2.3"
