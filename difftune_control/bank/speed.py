"""``--bank_torch_compile``: the base model's blocks compiled (channels-last) while the bank is generated, and put
back as they were before training uses the same modules."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def compiled_for_generation(unet: torch.nn.Module, vae: torch.nn.Module, enabled: bool) -> Iterator[int]:
    """Within the block: the transformer and ResNet blocks of ``unet`` and ``vae`` compiled in place with the run's
    backend and the persistent compile cache, their weights in channels-last memory format (the setting
    ``scripts/bench_bank.py`` measured fastest). Yields the number of blocks compiled (0 when not ``enabled``).

    On leaving, every block runs eagerly again and the weights are back in contiguous format, so the training
    step (``--torch_compile`` or not) and its memory layout are what they would have been without the bank.
    """
    if not enabled:
        yield 0
        return
    from difftune_control.compiler import compile_backend, compile_cache
    from difftune_control.training.compilation import COMPILED_BLOCKS, compile_blocks

    cache = compile_cache()
    backend = compile_backend()
    models = (unet, vae)
    compiled_before = {
        id(m) for model in models for m in model.modules() if m._compiled_call_impl is not None
    }
    for model in models:
        model.to(memory_format=torch.channels_last)
    blocks = sum(compile_blocks(model, backend=backend) for model in models)
    logger.info(
        "--bank_torch_compile: %d %s blocks of the UNet and VAE compiled for the bank (backend %s, channels-last; "
        "cache %s); the first batch compiles them",
        blocks,
        "/".join(COMPILED_BLOCKS),
        backend,
        cache["dir"],
    )
    try:
        yield blocks
    finally:
        for model in models:
            for m in model.modules():
                if type(m).__name__ in COMPILED_BLOCKS and id(m) not in compiled_before:
                    m._compiled_call_impl = None
            model.to(memory_format=torch.contiguous_format)
