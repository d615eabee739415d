"""``--torch_compile``: regional compilation of the ControlNet and UNet blocks, and a persistent cache of
what the compiler builds, so a second run (or a resumed one) starts training sooner.

Internal switch: ``DIFFTUNE_COMPILE_BACKEND`` names the ``torch.compile`` backend (default ``inductor``);
the tests compile with ``aot_eager`` (the same graph capture and autograd, no C compiler needed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from difftune_control.compiler import CACHE_DIR_ENV, compile_backend, compile_cache

logger = logging.getLogger(__name__)

COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""``--torch_compile_mode`` values under which the compiled blocks are replayed as CUDA graphs."""


def cuda_graphs(train) -> bool:
    """Whether a run's training settings (``cfg.train``) replay compiled blocks as CUDA graphs."""
    return bool(train.torch_compile) and train.torch_compile_mode in CUDA_GRAPH_MODES


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Regional ``torch.compile``: each transformer and ResNet block of ``model`` compiled in place.

    Blocks of one shape share their compiled code, so this compiles a handful of small graphs instead
    of the whole UNet (which took minutes before its first step) and keeps the fusions that matter
    (GroupNorm + SiLU, attention projections, GEGLU). Static shapes; dynamo's recompile limit is raised
    to the number of blocks, since every block shape is one more graph. Returns the number of blocks.
    """
    blocks = [m for m in model.modules() if type(m).__name__ in COMPILED_BLOCKS]
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
    for m in blocks:
        m.compile(**{"dynamic": False, **compile_kwargs})
    return len(blocks)


def compile_for_training(
    controlnet: torch.nn.Module,
    unet: torch.nn.Module,
    cache_dir: str | os.PathLike | None = None,
    mode: str = "default",
) -> dict[str, Any]:
    """``--torch_compile``: the blocks of ``controlnet`` and ``unet`` compiled with the run's backend and
    ``--torch_compile_mode``, the compiled-artefact cache set up first, and one INFO line saying what, how and
    where the cache lives."""
    backend = compile_backend()
    cache = compile_cache(cache_dir)
    kw = {"backend": backend} if mode == "default" else {"backend": backend, "mode": mode}
    blocks = {"ControlNet": compile_blocks(controlnet, **kw), "UNet": compile_blocks(unet, **kw)}
    on = {"fx_graph_cache": "FX-graph cache", "enable_autograd_cache": "AOT-autograd cache"}
    logger.info(
        "torch.compile on: the %s blocks of the %s, mode %s (static shapes), backend %s; compiled "
        "artefacts cached in %s "
        "(%s%s)",
        "/".join(COMPILED_BLOCKS),
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
