"""``--torch_compile``: regional compilation of the ControlNet and UNet blocks, a persistent cache of what
the compiler builds, so a second run (or a resumed one) starts training sooner, and ``--torch_compile auto``:
compile when the run's steps earn the compile time back.

Internal switch: ``DIFFTUNE_COMPILE_BACKEND`` names the ``torch.compile`` backend (default ``inductor``);
the tests compile with ``aot_eager`` (the same graph capture and autograd, no C compiler needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from difftune_control.compiler import (
    CACHE_DIR_ENV,
    compile_backend,
    compile_cache,
    compile_error_text,
    compile_errors,
    uncompile,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
COMPILED_STAGES = (
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"
)  # fmt: skip
SCOPES = {"blocks": COMPILED_BLOCKS, "stages": COMPILED_STAGES}
"""``--torch_compile_scope``: the module classes compiled in place, by scope."""
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""``--torch_compile_mode`` values under which the compiled blocks are replayed as CUDA graphs."""


def compile_mode(train) -> str:
    """The ``torch.compile`` mode of a run's training settings (``cfg.train``): ``--torch_compile_mode``, else
    ``default`` (under ``--torch_compile auto`` an unset mode is the measurement's choice, :func:`auto_compile`)."""
    return train.torch_compile_mode or "default"


def cuda_graphs(train) -> bool:
    """Whether a run's training settings (``cfg.train``) replay compiled blocks as CUDA graphs."""
    return train.torch_compile is True and compile_mode(train) in CUDA_GRAPH_MODES


def compile_blocks(model: torch.nn.Module, names: tuple[str, ...] = COMPILED_BLOCKS, **compile_kwargs) -> int:
    """Regional ``torch.compile``: each transformer and ResNet block of ``model`` compiled in place.

    Blocks of one shape share their compiled code, so this compiles a handful of small graphs instead
    of the whole UNet (which took minutes before its first step) and keeps the fusions that matter
    (GroupNorm + SiLU, attention projections, GEGLU). Static shapes; dynamo's recompile limit is raised
    to the number of blocks, since every block shape is one more graph. ``names``: the classes compiled
    (:data:`SCOPES`). Returns the number of modules compiled.
    """
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
    for m in blocks:
        m.compile(**{"dynamic": False, **compile_kwargs})
    return len(blocks)


def compiled_marker(cache_dir: str | os.PathLike, signature: str) -> Path:
    """The file in the compile cache folder that says a setting (:func:`compile_signature`) was compiled."""
    return Path(cache_dir) / "difftune-compiled" / signature


def compile_for_training(
    controlnet: torch.nn.Module,
    unet: torch.nn.Module,
    cache_dir: str | os.PathLike | None = None,
    mode: str = "default",
    signature: str | None = None,
    scope: str = "blocks",
) -> dict[str, Any]:
    """``--torch_compile``: the blocks of ``controlnet`` and ``unet`` compiled with the run's backend and
    ``--torch_compile_mode``, the compiled-artefact cache set up first, and one INFO line saying what, how and
    where the cache lives. ``signature`` (:func:`compile_signature`) is noted in the cache folder, so a later
    ``--torch_compile auto`` of the same setting counts on a warm cache."""
    backend = compile_backend()
    cache = compile_cache(cache_dir)
    if signature is not None:
        marker = compiled_marker(cache["dir"], signature)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    kw = {"backend": backend} if mode == "default" else {"backend": backend, "mode": mode}
    names = SCOPES[scope]
    blocks = {
        "ControlNet": compile_blocks(controlnet, names, **kw),
        "UNet": compile_blocks(unet, names, **kw),
    }
    on = {"fx_graph_cache": "FX-graph cache", "enable_autograd_cache": "AOT-autograd cache"}
    logger.info(
        "torch.compile on: the %s blocks of the %s, mode %s (static shapes), backend %s; compiled "
        "artefacts cached in %s "
        "(%s%s)",
        "/".join(names),
        " and the ".join(f"{name} ({n})" for name, n in blocks.items()),
        mode,
        backend,
        cache["dir"],
        f"${CACHE_DIR_ENV}; " if cache["user_dir"] else "",
        ", ".join(
            f"{label} {'on' if cache[k] else 'off'}" for k, label in on.items() if cache[k] is not None
        ),
    )
    return {"backend": backend, "mode": mode, "blocks": blocks, **cache}


COMPILE_SECONDS = {"empty": 177.0, "warm": 21.0}
"""Seconds of compiling before the first compiled step: SD1.5 at batch 4 with CUDA graphs on one H200, on an
empty compile cache and on the cache the first run left (BENCHMARKS.md 4b, commit 68b273d)."""

MEASURED_GAINS = (
    # (model, CUDA graphs, smallest batch, largest batch, share of an eager step saved, where it was measured)
    ("sd1", True, 1, 4, 0.05, "SD1.5, batch 4, CUDA graphs: 99.5 -> 94.4 ms per step"),
    ("sd1", False, 32, None, 0.09, "SD1.5, batch 32: 9-13% more images/s"),
)
"""Where compiling was measured to pay (BENCHMARKS.md 4): the low end of the range measured at batch 32, the
medians at batch 4 with CUDA graphs (whose chunks barely part from eager's); the model kind (``sd1`` / ``sd2`` /
``sdxl``, ``toy`` for the toy world), CUDA graphs or not, the batch per process. Elsewhere
(batch 8 with CUDA graphs: 68.9 compiled against 69.9 images/s eager on 2026-12-03; batch 4 without CUDA graphs:
within the chunks' spread of eager; SDXL and the toy world: not measured) the table counts on no gain. With CUDA
graphs the table only stands in where the GPU's busy time could not be measured: see :data:`GRAPHED_BUSY_FACTOR`."""

GRAPHED_BUSY_FACTOR = 1.5
"""With CUDA graphs, ``--torch_compile auto`` counts on a step of 1.5x the GPU-busy time of the eager step it
replaces: what the host's dispatch leaves the GPU idle is what graphs save, and the graphed step is not all
kernels (inputs copied into the graphs' buffers, the optimizer and the parts outside the compiled blocks).
SD1.5 on one H200 (BENCHMARKS.md 4, "Later on 2026-12-03"): eager 167 ms at batch 4 with the GPU busy 62.5 ms, graphed
96.7 ms (1.55x busy); batch 8: 181 ms eager, 98.4 busy, graphed 98.9 (1.01x). The same factor puts the other
machine of that day (eager 99.5 ms, graphed 94.4 at batch 4; 114 and 116 ms at batch 8) where it was measured."""


AUTO_DEVICES = ("cuda",)
"""Devices where ``--torch_compile auto`` weighs compiling (elsewhere nothing was measured: it stays eager)."""


def measured_gain(model: str, graphs: bool, batch: int) -> tuple[float, str] | None:
    """The share of an eager step's time compiling saves for ``model`` at ``batch`` per process, and where that
    was measured; None where no gain was measured."""
    for kind, g, lo, hi, share, where in MEASURED_GAINS:
        if kind == model and g == graphs and batch >= lo and (hi is None or batch <= hi):
            return share, where
    return None


def compile_pays(
    steps: int,
    step_seconds: float,
    batch: int,
    graphs: bool,
    warm: bool,
    model: str = "sd1",
    scope: str = "blocks",
    busy_seconds: float | None = None,
) -> tuple[bool, str]:
    """Whether compiling earns its time back over ``steps`` eager steps of ``step_seconds``, and why (the
    reckoning, for the log line). With CUDA graphs and the GPU's busy time in an eager step (``busy_seconds``),
    the saving is the step's time beyond :data:`GRAPHED_BUSY_FACTOR` x busy, on any model; otherwise it is
    :data:`MEASURED_GAINS`'."""
    mode = "with CUDA graphs" if graphs else "without CUDA graphs"
    if graphs and scope == "blocks" and busy_seconds is not None:
        share = 1.0 - GRAPHED_BUSY_FACTOR * busy_seconds / step_seconds
        busy = f"the GPU busy {busy_seconds * 1000:.0f} ms of the eager step's {step_seconds * 1000:.0f}"
        if share <= 0:
            return False, f"{busy}: too little host time for CUDA graphs to save (BENCHMARKS.md 4)"
        gain = share, f"{busy}, a step {mode} counted at {GRAPHED_BUSY_FACTOR:g}x busy"
    else:
        gain = measured_gain(model, graphs, batch) if scope == "blocks" else None
    mode += "" if scope == "blocks" else f", --torch_compile_scope {scope}"
    if gain is None:
        return False, f"no gain was measured for {model} models at batch {batch} {mode} (BENCHMARKS.md 4)"
    share, where = gain
    cost = COMPILE_SECONDS["warm" if warm else "empty"]
    saved = steps * step_seconds * share
    cache = "this setting's warm compile cache" if warm else "an empty compile cache"
    return saved > cost, (
        f"{steps:,} steps at {step_seconds * 1000:.0f} ms eager, {share:.0%} of each saved ({where}): about "
        f"{saved:.0f} s saved against about {cost:.0f} s of compiling on {cache}"
    )


def compile_signature(
    cfg, controlnet: torch.nn.Module, unet: torch.nn.Module, mode: str | None = None
) -> str:
    """What the compiled code depends on: the models' configs and dtypes, batch, resolution and speed settings
    (``mode``: the compile mode, default the run's), the backend and torch's version (a hex digest)."""
    t = cfg.train
    key = {
        "unet": dict(unet.config),
        "controlnet": dict(getattr(controlnet, "config", {})),
        "dtypes": [str(unet.dtype), str(next(controlnet.parameters()).dtype)],
        "batch": t.train_batch_size,
        "resolution": cfg.data.resolution,
        "settings": [mode or compile_mode(t), t.gradient_checkpointing, t.channels_last, compile_backend()]
        + ([] if t.torch_compile_scope == "blocks" else [t.torch_compile_scope]),  # earlier signatures kept
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _eager_step_seconds(
    trainer, batch: dict, worth_profiling=lambda seconds: True, passes: int = 3
) -> tuple[float, float | None]:
    """Seconds of an eager forward + backward of one training batch (the fastest pass after the first), and the
    seconds the GPU was busy in one more pass (None off CUDA, or where ``worth_profiling(seconds)`` says the
    answer cannot matter); no update, the trainer's random generator left where it was."""
    from difftune_control.training.diagnostics import gradient_pull
    from difftune_control.training.profiling import gpu_busy_seconds

    n = len(batch["caption"])
    state = trainer.generator.get_state()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def one_pass():
        return gradient_pull(trainer, batch, trainer.plan(n), torch.ones(n))

    seconds = []
    for _ in range(passes):
        sync()
        start = time.perf_counter()
        one_pass()
        sync()
        seconds.append(time.perf_counter() - start)
    fastest = min(seconds[1:] or seconds)
    profile = trainer.device.type == "cuda" and worth_profiling(fastest)
    busy = gpu_busy_seconds(one_pass) if profile else None
    trainer.generator.set_state(state)
    return fastest, busy


def auto_compile(cfg, accelerator, base, trainer, steps: int) -> bool:
    """``--torch_compile auto``: on CUDA, time the eager step and the GPU's busy time in it, decide by
    :func:`compile_pays` over the ``steps`` this start will train (the main process decides for all), compile
    if it pays and log the reckoning either way. With ``--torch_compile_mode`` unset, CUDA graphs
    (``reduce-overhead``) are weighed first, then the default mode. Returns whether it compiled."""
    t = cfg.train
    net = accelerator.unwrap_model(trainer.controlnet)
    if accelerator.device.type not in AUTO_DEVICES:
        logger.info("--torch_compile auto: not compiling on %s (compiled steps were measured on CUDA only)",
                    accelerator.device.type)  # fmt: skip
        return False
    if t.bf16_weights:
        logger.info("--torch_compile auto: not compiling: --bf16_weights compiled was not measured on a GPU "
                    "(--torch_compile compiles it)")  # fmt: skip
        return False
    modes = [t.torch_compile_mode] if t.torch_compile_mode else ["reduce-overhead", "default"]
    unmeasured = [  # settings CUDA graphs were not measured with: auto weighs them only when asked to
        name
        for name, on in (
            ("--gradient_checkpointing", t.gradient_checkpointing),
            ("--fused_backward_pass", t.fused_backward_pass),
            ("several processes", accelerator.num_processes > 1),
        )
        if on
    ]
    if not t.torch_compile_mode and unmeasured:
        modes = ["default"]
    cache_dir = compile_cache(cfg.data.cache_dir)["dir"]
    signatures = {mode: compile_signature(cfg, net, base.unet, mode) for mode in modes}
    warm = {mode: compiled_marker(cache_dir, sign).exists() for mode, sign in signatures.items()}
    cheapest = min(COMPILE_SECONDS["warm" if w else "empty"] for w in warm.values())
    accumulate = t.gradient_accumulation_steps
    target = trainer.target
    rows = [target[i % len(target)] for i in range(t.train_batch_size)]
    seconds, busy = _eager_step_seconds(  # the GPU's busy time only where compiling could pay at all
        trainer, torch.utils.data.default_collate(rows), lambda s: steps * s * accumulate > cheapest
    )
    seconds, busy = (x * accumulate if x is not None else None for x in (seconds, busy))
    model = "toy" if base.is_toy else base.kind
    reckonings = []
    if steps * seconds <= cheapest:  # compiled steps of no time at all would not earn it back
        why = (f"{steps:,} steps at {seconds * 1000:.0f} ms eager take about {steps * seconds:.0f} s, no more than "
               f"the {cheapest:.0f} s of compiling")  # fmt: skip
        reckonings.append((False, why, modes[0], signatures[modes[0]]))
    else:
        for mode in modes:
            pays, why = compile_pays(
                steps, seconds, t.train_batch_size, mode in CUDA_GRAPH_MODES, warm[mode], model,
                t.torch_compile_scope, busy,
            )  # fmt: skip
            reckonings.append(
                (pays, f"mode {mode}: {why}" if len(modes) > 1 else why, mode, signatures[mode])
            )
            if pays:
                break
    # the one that pays, else the first weighed (with one mode, the only one)
    decision = next((r for r in reckonings if r[0]), reckonings[0])
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list([decision])[0]
    pays, why, mode, signature = decision
    others = [r[1] for r in reckonings if r[1] != why]
    if not t.torch_compile_mode and unmeasured:
        others.append(f"CUDA graphs not weighed: not measured with {' and '.join(unmeasured)}")
    others = "; ".join(others)
    logger.info("--torch_compile auto: %s: %s%s", "compiling" if pays else "not compiling", why,
                f" ({others})" if others else "")  # fmt: skip
    if pays:
        compile_for_training(net, base.unet, cfg.data.cache_dir, mode, signature, t.torch_compile_scope)
        trainer.graphed = mode in CUDA_GRAPH_MODES
        trainer.untried_compile = True
    return pays


def eager_if_compiling_fails(trainer, step: Callable[[], T]) -> T:
    """The first step of a run with compiled blocks: ``step()``; where compiling fails (no C compiler, a
    backend's bug), one warning naming the compiler's error, every compiled module of the ControlNet and the
    UNet back to eager, the ControlNet's gradients cleared, the trainer's random generator put back, and
    ``step()`` again, eagerly: the run goes on as it would have without ``--torch_compile``. Other errors pass."""
    state = trainer.generator.get_state()
    try:
        return step()
    except compile_errors() as e:
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        n = sum(uncompile(m) for model in (net, trainer.base.unet) for m in model.modules())
        net.zero_grad(set_to_none=True)
        trainer.generator.set_state(state)
        trainer.graphed = False
        trainer._pending.clear()  # the failed pass's loss, if it got that far
        logger.warning("torch.compile failed at the first step (%s); %d modules back to eager, training on "
                       "eagerly", compile_error_text(e), n)  # fmt: skip
        return step()
