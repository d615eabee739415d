"""``--bank_torch_compile``: the base model's blocks compiled (channels-last) while the bank is generated, and
put back as they were before training uses the same modules."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from difftune_control.compiler import compile_error_text, compile_errors, uncompile

logger = logging.getLogger(__name__)


def prepare_for_generation(
    unet: torch.nn.Module, vae: torch.nn.Module, channels_last: bool, compiled: bool
) -> dict[str, Any]:
    """Set ``unet`` and ``vae`` up for sampling in place: their weights in channels-last memory format and/or
    their transformer and ResNet blocks compiled with the run's backend and the persistent compile cache (the
    settings ``scripts/bench_bank.py`` compares). Returns the blocks compiled, the backend and the cache."""
    models = (unet, vae)
    if channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    if not compiled:
        return {"blocks": 0}
    from difftune_control.compiler import compile_backend, compile_cache
    from difftune_control.training.compilation import compile_blocks

    cache, backend = compile_cache(), compile_backend()
    return {"blocks": sum(compile_blocks(m, backend=backend) for m in models), "backend": backend, **cache}


@contextlib.contextmanager
def compiled_for_generation(unet: torch.nn.Module, vae: torch.nn.Module, enabled: bool) -> Iterator[int]:
    """Within the block: :func:`prepare_for_generation` with channels-last weights and compiled blocks (the
    setting ``scripts/bench_bank.py`` measured fastest). Yields the number of blocks compiled (0 when not
    ``enabled``).

    On leaving, every block runs eagerly again and the weights are back in contiguous format, so the training
    step (``--torch_compile`` or not) and its memory layout are what they would have been without the bank.
    """
    if not enabled:
        yield 0
        return
    from difftune_control.training.compilation import COMPILED_BLOCKS

    models = (unet, vae)
    compiled_before = {
        id(m) for model in models for m in model.modules() if m._compiled_call_impl is not None
    }
    done = prepare_for_generation(unet, vae, channels_last=True, compiled=True)
    logger.info(
        "--bank_torch_compile: %d %s blocks of the UNet and VAE compiled for the bank (backend %s, "
        "channels-last; cache %s); the first batch compiles them",
        done["blocks"],
        "/".join(COMPILED_BLOCKS),
        done["backend"],
        done["dir"],
    )
    try:
        yield done["blocks"]
    finally:
        for model in models:
            for m in model.modules():
                if type(m).__name__ in COMPILED_BLOCKS and id(m) not in compiled_before:
                    uncompile(m)
            model.to(memory_format=torch.contiguous_format)


def generate_with(
    unet: torch.nn.Module, vae: torch.nn.Module, compiled: bool, run: Callable[..., None], *args: Any
) -> None:
    """Run the bank's generation ``run(*args)`` under :func:`compiled_for_generation` when ``compiled``; if
    compiling fails, say so in one warning and run it again eagerly. Finished shards are kept, so the eager
    run goes on where the compiled one stopped; errors of the generation itself (or any error without
    compiling) pass."""
    try:
        with compiled_for_generation(unet, vae, compiled):
            run(*args)
    except compile_errors() as e:
        if not compiled:
            raise
        logger.warning(
            "--bank_torch_compile: compiling failed (%s); generating the rest of the bank eagerly",
            compile_error_text(e),
        )
        run(*args)
