"""The config sections: one typed dataclass per concern, and their field types.

Every field is also a command-line flag of the same name (``--train_batch_size``), with the
field's ``help`` metadata as its help text; flag names follow diffusers'
``examples/controlnet/train_controlnet.py`` where the meaning is the same. Fields left at
``None`` are *model-dependent defaults*, filled by :func:`~difftune_control.config.presets.resolve_defaults`.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from difftune_control.config.values import bool_or_auto, float_or_auto


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Which base model and ControlNet to start from."""

    pretrained_model_name_or_path: str | None = _f(
        None, "Base Stable Diffusion (diffusers folder or hub id). Default: the shipped toy world."
    )
    pretrained_vae_model_name_or_path: str | None = _f(
        None,
        "A VAE folder or hub id replacing the base model's (SDXL: an fp16-safe VAE such as "
        "madebyollin/sdxl-vae-fp16-fix; without one the SDXL VAE runs in fp32 under fp16).",
        metavar="PATH",
    )
    revision: str | None = _f(None, "Revision of the base model on the hub.")
    variant: str | None = _f(None, "Weights variant of the base model, e.g. fp16.")
    controlnet_model_name_or_path: str | None = _f(
        None,
        "Start from this ControlNet (diffusers folder, hub id, or a WebUI/LDM single file) "
        "instead of copying the UNet's encoder.",
    )
    conditioning_embedding_out_channels: list[int] | None = _f(
        None,
        "Channels of the hint embedding (len-1 downsamplings). Default: toy world 16 32 64, SD 16 32 96 256.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = _f(
        None, "Training target. Default: the base model scheduler's prediction_type."
    )


@dataclass
class DataConfig:
    """Target dataset and its hints."""

    condition: str = _f(
        "depth", "Condition recipe: a name (canny, depth, normal, segmentation, sketch) or a .toml path."
    )
    extractor_backend: str | None = _f(
        None, "Extractor backend for hints and re-extraction. Default: the recipe's."
    )
    train_data_dir: str | None = _f(
        None, "Folder with metadata.jsonl (or prompt.json). Default: the toy world's rendered target set."
    )
    toy_domain: str = _f(
        "default",
        "Toy-world domain of the target and held-out sets: default (the base's own world) or a shifted "
        "one (crowded, dusk, swapped; see docs/toyworld/MODEL_CARD.md).",
        metavar="NAME",
    )
    dataset_name: str | None = _f(None, "A HF datasets name or local saved/parquet dataset folder.")
    dataset_config_name: str | None = _f(None, "Config name of the HF dataset.")
    image_column: str = _f("image", "Column with the target images.")
    conditioning_image_column: str | None = _f(
        None,
        "Column with the hint images. Default: conditioning_image (toy world: the recipe's ground-truth column). "
        "Missing column -> hints are extracted.",
    )
    caption_column: str = _f("text", "Column with the captions.")
    resolution: int | None = _f(None, "Training resolution (square). Default: toy world 64, SD 512.")
    center_crop: bool = _f(True, "Center crop after resizing (else random crop, image and hint alike).")
    random_flip: bool = _f(
        False, "Flip image and hint together (off: normals and similar hints change meaning)."
    )
    hint_interpolation: Literal["bilinear", "nearest"] = _f(
        "bilinear", "Resampling of given hints (nearest keeps segmentation colours exact)."
    )
    crops_coords_top_left_h: int = _f(0, "SDXL time ids: crop top (px) of training rows.", metavar="PX")
    crops_coords_top_left_w: int = _f(0, "SDXL time ids: crop left (px) of training rows.", metavar="PX")
    dataset_split: str = _f("train", "Split of a HF / saved / parquet dataset.")
    max_train_samples: int | None = _f(None, "Use only the first N samples.")
    skip_bad_rows: bool = _f(False, "Skip unreadable/missing rows (counted in the log) instead of failing.")
    allow_external_paths: bool = _f(
        False, "Accept image/hint paths outside the dataset folder (absolute, ../, symlinks out)."
    )
    proportion_empty_prompts: float = _f(
        0.5, "Caption dropout for target samples (original ControlNet: 0.5)."
    )
    cache_latents: bool = _f(True, "Precompute VAE latents and text embeddings once (cached on disk).")
    cache_dir: str | None = _f(
        None, "Where caches live. Default: $DIFFTUNE_CACHE or ~/.cache/difftune_control."
    )
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.")
    validation_data_dir: str | None = _f(
        None,
        "Held-out set (same format) for validation and the convergence detector. Default: toy validation split, "
        "or the last samples of the training set.",
    )


@dataclass
class MethodConfig:
    """Training objective: vanilla ControlNet or Diff-Tuning (chain of forgetting)."""

    method: str = _f(
        "difftuning",
        "A registered training method (difftune_control.methods.register_method): vanilla = the ControlNet "
        "baseline (uniform t, target only); difftuning = Diff-Tuning (the memory bank, t skewed by psi/xi).",
    )
    split: Literal["fixed", "mixture", "psi-only"] = _f(
        "fixed",
        "Diff-Tuning batch split: fixed (released code), mixture (paper), psi-only (ablation: no bank).",
    )
    psi_power: float = _f(
        1.0, "Power s of psi(t) = ((t+1)/T)^s; 0 = uniform t (the bank without the t-skew)."
    )
    bank_share: float = _f(0.2, "fixed split: share r of each batch from the bank (a batch of one: w.p. r).")
    bank_weight: float | Literal["auto"] = _f(
        "auto",
        "fixed split: weight lambda of the bank loss (the published value: 0.1); auto = set lambda so the "
        "weighted bank rows pull "
        "--bank_pull times as hard as the target rows (measured on the ControlNet's gradient, every "
        "--bank_pull_every steps, logged as bank_weight records).",
        parse=float_or_auto,
    )
    bank_pull: float = _f(
        0.1, "--bank_weight auto: the bank rows' pull as a fraction of the target rows' (BENCHMARKS.md 0f)."
    )
    bank_pull_every: int = _f(
        200, "--bank_weight auto: re-measure every N steps (x the plans pooled; 0 = at step 0 only)."
    )
    bank_pull_rows: int = _f(12, "--bank_weight auto: pool batch plans until they hold this many bank rows.")
    bank_latents: Literal["mean", "sample"] = _f(
        "sample",
        "Bank rows' latents: the VAE posterior mean of each generated image, or a fresh draw from its "
        "posterior at every use (as target rows and the authors' code get; see BENCHMARKS.md section 0).",
    )
    bank_prompt: Literal["keep", "drop"] = _f(
        "keep",
        "Bank rows' text condition: keep their prompts, or drop them (empty prompt, as the authors' null "
        "class drops the condition being fine-tuned).",
    )
    loss_weighting: Literal["none", "inverse_snr", "min_snr"] | None = _f(
        None,
        "Per-sample weight of the target rows' loss over t: none; inverse_snr (x0-supervision: "
        "sigma_t^2/alpha_t^2 for epsilon); min_snr (Min-SNR-gamma). Default: inverse_snr for difftuning, "
        "none for vanilla (the plain ControlNet baseline).",
    )
    snr_gamma: float = _f(5.0, "min_snr loss weighting: gamma.")
    loss_weight_max: float | None = _f(
        None, "Clamp of the loss weighting's per-sample weight (inverse_snr reaches ~200 at SD's last step)."
    )
    retention: Literal["renoise", "trajectory", "snr"] = _f(
        "renoise",
        "Retention source of bank slots: renoise (Diff-Tuning: re-noised bank images, true noise as target), "
        "trajectory (NIGD: a recorded reverse-trajectory state, the teacher's prediction as target), "
        "snr (SGGD: trajectory where SNR(t) < --snr_threshold, renoise elsewhere).",
    )
    snr_threshold: float = _f(
        1.0,
        "snr retention: SNR(t) = alpha_bar/(1-alpha_bar) below which a bank slot uses a trajectory state "
        "(1 = signal and noise balance, t ~ 350 for SD's schedule; see docs/internals.md).",
    )
    distill_weight: float | None = _f(
        None,
        "Weight of the bank (retention) loss when it distils (trajectory/snr or a teacher), in place of "
        "lambda (fixed split) or of the bank slots' share (mixture). Default: --bank_weight / unchanged.",
    )
    bank_check: bool = _f(
        True,
        "Before the first step, measure how hard the bank rows pull a fresh ControlNet against the target "
        "rows (one extra forward/backward) and warn when the bank outweighs the data.",
    )
    teacher_controlnet: str | None = _f(
        None,
        "Continual adaptation: distil this previously trained ControlNet (run folder, diffusers folder or "
        "WebUI file) in the bank slots while training on the new data.",
    )
    teacher_condition: str | None = _f(
        None, "Condition of the teacher's hints (recipe name or path). Default: the teacher run's."
    )
    teacher_train_data_dir: str | None = _f(
        None,
        "Dataset whose captions and hints drive the teacher's bank. Default: the teacher run's, else the "
        "toy world's.",
    )


@dataclass
class BankConfig:
    """The memory bank generated by the frozen base model."""

    bank_size: int | None = _f(
        None,
        "Number of bank images. Default: toy world 2000, SD 2000 with the SD defaults: sized to the run, one "
        "image per 4 bank rows it draws (steps x batch x accumulation x processes x --bank_share / 4), 500 to 5000.",
    )
    bank_prompts: str | None = _f(None, "Text file with one prompt per line. Default: the target captions.")
    bank_num_inference_steps: int = _f(25, "Sampler steps for bank generation.")
    bank_guidance_scale: float = _f(7.5, "Classifier-free guidance for bank generation.")
    bank_sampler: Literal["ddim", "unipc"] = _f("ddim", "Sampler for bank generation.")
    bank_seed: int = _f(0, "Seed of bank generation.")
    bank_batch_size: int | None = _f(
        None, "Images per generation batch. Default: toy world 256 on a GPU, 64 on the CPU; SD 16."
    )
    bank_dir: str | None = _f(
        None, "Where the bank lives. Default: a folder in the cache keyed by the manifest."
    )
    bank_torch_compile: bool = _f(
        False, "Compile the base model for bank generation only (SD1.5: +27% images/s; BENCHMARKS.md 4)."
    )
    bank_hint: Literal["extracted", "zero"] | None = _f(
        None,
        "Bank hints: zero (the null condition, as the authors' null class: the bank teaches what to do "
        "without a hint) or extracted from the images (as published). Default: zero; extracted with "
        "--teacher_controlnet.",
    )
    bank_on_mismatch: Literal["rebuild", "error"] = _f(
        "rebuild", "When bank_dir holds a bank with another manifest."
    )
    trajectory_states: int = _f(
        4,
        "Reverse-trajectory states recorded per bank image for --retention trajectory|snr (unused, and "
        "not part of the bank manifest, with renoise).",
    )


@dataclass
class DetectorConfig:
    """The sudden-convergence detector."""

    detect_convergence: bool = _f(True, "Track controllability and detect sudden convergence.")
    convergence_every: int | None = _f(
        None, "Evaluate every N optimizer steps. Default: toy world 50, SD 500."
    )
    convergence_samples: int | None = _f(None, "Validation samples K. Default: toy world 16, SD 8.")
    convergence_num_inference_steps: int | None = _f(
        None, "Sampler steps for the detector's samples. Default: toy world 8, SD 10."
    )
    convergence_guidance_scale: float = _f(1.0, "CFG for the detector's samples (1 = no CFG, half the cost).")
    convergence_threshold: float | None = _f(
        None, "Progress p that counts as converged. Default: the recipe's (0.3)."
    )
    convergence_patience: int | None = _f(None, "Evaluations p must hold. Default: the recipe's (2).")
    stop_after_convergence: int | None = _f(
        None,
        "Stop N optimizer steps after the step where sudden convergence was declared (first of the held run).",
    )


@dataclass
class TrainConfig:
    """Optimisation, checkpoints, logging."""

    output_dir: str = _f("runs", "Parent folder of run folders.")
    run_name: str | None = _f(None, "Run folder name. Default: <condition>-<method>-<timestamp>.")
    seed: int = _f(0, "Seed for initialisation, data order and noise.")
    train_batch_size: int | None = _f(None, "Batch per process. Default: toy world 64, SD 4.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_train_steps: int | None = _f(None, "Optimizer steps. Default: toy world 1000, SD 10000.")
    learning_rate: float | None = _f(None, "Learning rate. Default: toy world 1e-4, SD 1e-5.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "constant", "LR schedule."
    )
    lr_warmup_steps: int = _f(0, "Warm-up optimizer steps.")
    optimizer: Literal["adamw", "adafactor"] = _f(
        "adamw",
        "adamw (fused on CUDA) or adafactor (factored second moments, no first moment: the optimizer "
        "state of a SD1.5 ControlNet is 0.75 GB instead of 2.9 GB; --learning_rate is used as given).",
    )
    fused_backward_pass: bool = _f(False, "Update each parameter in backward; frees its gradient.")
    bf16_weights: bool = _f(False, "The ControlNet run on a bf16 copy of its fp32 weights (BENCHMARKS.md 4).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: none; per parameter when fused).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None, "Frozen parts in this dtype. Default: accelerate's."
    )
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing: the ControlNet, the UNet's backward.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+.")
    torch_compile: bool | Literal["auto"] = _f(
        "auto",
        "torch.compile the ControlNet's and UNet's transformer and ResNet blocks (regional; a failed compile "
        "falls back to eager). auto: on CUDA, time the eager step and the GPU's busy time in it, compile when "
        "the run's steps earn the compile time back (BENCHMARKS.md 4; the log says why); elsewhere eager.",
        parse=bool_or_auto,
        nargs="?",
        const=True,
        metavar="true|false|auto",
    )
    torch_compile_mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = _f(
        None,
        "--torch_compile's mode: default, reduce-overhead (CUDA graphs: fewer launches, where the host's "
        "dispatch bounds the step), max-autotune or max-autotune-no-cudagraphs. Unset: default; under "
        "--torch_compile auto, CUDA graphs where the GPU idles enough of the eager step for them to pay.",
    )
    torch_compile_scope: Literal["blocks", "stages"] = _f(
        "blocks",
        "What --torch_compile compiles: each transformer/ResNet block, or each down/mid/up stage (fewer graphs).",
    )
    channels_last: bool = _f(False, "channels_last memory format: the ControlNet, the UNet and their inputs.")
    cudnn_benchmark: bool = _f(False, "Let cuDNN time its convolution algorithms on the first steps (CUDA).")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint-N path.")
    validation_steps: int | None = _f(
        None, "Save a validation grid every N optimizer steps. Default: toy world 250, SD 1000."
    )
    num_validation_images: int = _f(4, "Validation grid size.")
    logging_steps: int = _f(10, "Write training metrics every N optimizer steps.")
    report_to: Literal["tensorboard", "none"] = _f("tensorboard", "Where metrics go besides metrics.jsonl.")
    device: str | None = _f(None, "Force a device (cpu/cuda). Default: accelerate's choice.")
    # Several processes (accelerate launch): DistributedDataParallel through accelerate's
    # DistributedDataParallelKwargs. One process ignores them.
    ddp_bucket_cap_mb: float = _f(
        25.0,
        "Several processes: gradient all-reduce bucket size in MB (DDP's bucket_cap_mb; 25 is its default).",
        metavar="MB",
    )
    ddp_gradient_as_bucket_view: bool = _f(
        True,
        "Several processes: gradients are views into DDP's all-reduce buckets, which saves one copy of the "
        "gradients (1.4 GB for a SD1.5 ControlNet) and a memory copy per step (DDP's default: off).",
    )
    ddp_static_graph: bool = _f(
        False,
        "Several processes: tell DDP the graph is the same every step (DDP's static_graph; lets it skip "
        "per-step bookkeeping and supports reentrant gradient checkpointing).",
    )
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = _f(
        "none",
        "Several processes: all-reduce gradients compressed to fp16 or bf16 (half the traffic, averaged in "
        "that precision); none: fp32, exact.",
    )


@dataclass
class ExportConfig:
    """Export of a trained ControlNet."""

    format: Literal["webui", "diffusers"] = _f(
        "webui",
        "webui = one LDM-keyed .safetensors that A1111, Forge and ComfyUI load; diffusers = a "
        "save_pretrained folder with a model card.",
    )
    dtype: Literal["fp16", "bf16", "fp32"] = _f("fp16", "Exported weights dtype.")
    name: str | None = _f(None, "Name part of the file name. Default: the run name.")
    out: str | None = _f(None, "Output folder. Default: <run>/export.")
    condition: str | None = _f(None, "Condition for the file name. Default: the run config's condition.")
    verify: bool = _f(
        True, "Reload the export and compare outputs with the trained model (--no-verify skips it)."
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "bank": BankConfig,
    "detector": DetectorConfig,
    "train": TrainConfig,
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (annotations are strings here)."""
    return typing.get_type_hints(cls)
