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

from difftune_control.utils import cache_root

logger = logging.getLogger(__name__)

COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
BACKEND_ENV = "DIFFTUNE_COMPILE_BACKEND"
"""Environment variable naming the ``torch.compile`` backend of ``--torch_compile`` (default ``inductor``)."""
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
CACHE_SWITCHES = {  # (config module, attribute) -> the environment variable that forces it
    ("torch._inductor.config", "fx_graph_cache"): "TORCHINDUCTOR_FX_GRAPH_CACHE",
    ("torch._functorch.config", "enable_autograd_cache"): "TORCHINDUCTOR_AUTOGRAD_CACHE",
}


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


def compile_backend() -> str:
    """The backend named by ``$DIFFTUNE_COMPILE_BACKEND`` (default ``inductor``), checked against dynamo's."""
    backend = os.environ.get(BACKEND_ENV) or "inductor"
    user_dir = os.environ.get(CACHE_DIR_ENV)
    known = torch._dynamo.list_backends(exclude_tags=())
    if user_dir is None:  # listing imports inductor, which sets its /tmp default: not the user's choice
        os.environ.pop(CACHE_DIR_ENV, None)
    if backend not in known:
        raise ValueError(f"${BACKEND_ENV}: got {backend!r}; choose one of {sorted(known)}")
    return backend


def compile_cache(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Keep the compiler's artefacts across runs: inductor's cache folder and its FX-graph and AOT-autograd caches.

    The folder is ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it, else ``<cache root>/inductor``
    (:func:`~difftune_control.utils.cache_root` of ``cache_dir``: ``--cache_dir``, ``$DIFFTUNE_CACHE`` or
    ``~/.cache/difftune_control``), set in the environment for this process and its children. Each
    cache is switched on unless its ``TORCHINDUCTOR_*`` variable is set (the user's choice stands); the
    AOT-autograd cache only where this torch has it.

    Returns:
        `dict`: ``dir`` (`str`), ``user_dir`` (`bool`: the folder came from the environment) and, per
        cache (``fx_graph_cache``, ``enable_autograd_cache``), whether it is on (None: this torch lacks it).
    """
    import importlib

    user_dir = bool(os.environ.get(CACHE_DIR_ENV))
    if not user_dir:
        os.environ[CACHE_DIR_ENV] = str((cache_root(cache_dir) / "inductor").absolute())
    out: dict[str, Any] = {"dir": os.environ[CACHE_DIR_ENV], "user_dir": user_dir}
    for (module, attr), env in CACHE_SWITCHES.items():
        config = importlib.import_module(module)
        if not hasattr(config, attr):
            out[attr] = None
            continue
        if env not in os.environ:
            setattr(config, attr, True)
        out[attr] = bool(getattr(config, attr))
    return out


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
