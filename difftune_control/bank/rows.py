"""The rows of a memory bank as the trainer draws them: ``BankRows``, stacked batches on the training device.

Drawing bank rows runs on the host at every step, between the GPU's kernels, so it does as little
host work as it can: a bank whose hints are all zero (``bank_hint="zero"``) never reads them (the
zero hints are made on the device); on a CUDA device the row tensors that fit
:data:`RESIDENT_SHARE` of its memory are moved there once and gathered there; the others are gathered
on the CPU straight into pinned memory and copied asynchronously (no pageable copy, no second copy
into pinned memory). The values are those of the straightforward CPU gather, bit for bit.
"""

from __future__ import annotations

import logging

import torch

from difftune_control.utils import hint_to_float, to_device

logger = logging.getLogger(__name__)

RESIDENT_SHARE = 0.02
"""Share of a CUDA device's total memory that a bank's row tensors may take there (about 2.8 GB of an
H200, 1.6 GB of an 80 GB card, 0.5 GB of a 24 GB one): the default SD1.5 bank's latents, posterior
spreads and text embeddings (~0.22 MB a row at 512 px: a 5,000-row bank's ~1.1 GB) stay resident on an H200. See :func:`resident_rows`."""


def resident_rows(nbytes: dict[str, int], budget: int) -> list[str]:
    """Names of the row tensors to keep on the device: in the order given, each one that still fits.

    Args:
        nbytes (`dict[str, int]`): bytes of each row tensor, in order of priority (the ones every batch
            reads first; the large hints last).
        budget (`int`): bytes the resident tensors may take together.

    Returns:
        `list[str]`: the names chosen; a tensor too large for what is left is skipped, a smaller one after
        it may still fit.
    """
    chosen, used = [], 0
    for name, size in nbytes.items():
        if used + size <= budget:
            chosen.append(name)
            used += size
    return chosen


class BankRows:
    """The per-row tensors of a memory bank, and the stacked batches the trainer draws from them.

    Args:
        latents (`Tensor`): float32 [N,C,h,w], the posterior means.
        latent_std (`Tensor`): float16 [N,C,h,w], the posterior spreads.
        encoder_hidden_states (`Tensor`): float16 or float32 [N,L,D].
        hints (`Tensor`): uint8 [N,3,R,R].
        added (`dict[str, Tensor]`, *optional*): added conditioning, float32 [N,...] (SDXL: ``text_embeds``,
            ``time_ids``).
        zero_hints (`bool`): the hints are all zero (the bank's ``bank_hint`` is ``"zero"``): batches make
            their zero hints on the device and never read ``hints``.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        latent_std: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        hints: torch.Tensor,
        added: dict[str, torch.Tensor] | None = None,
        zero_hints: bool = False,
    ):
        self.latents, self.latent_std = latents, latent_std
        self.encoder_hidden_states, self.hints = encoder_hidden_states, hints
        self.added = dict(added or {})
        self.zero_hints = zero_hints
        self.hint_shape = tuple(hints.shape[1:])  # [3,R,R]: all a zero-hint batch needs of the hints
        self._stores: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def sources(self) -> dict[str, torch.Tensor]:
        """The tensors batches gather from, by name, in :func:`resident_rows`' order of priority."""
        out = {
            "latents": self.latents,
            "latent_std": self.latent_std,
            "encoder_hidden_states": self.encoder_hidden_states,
            **self.added,
        }
        if not self.zero_hints:
            out["hints"] = self.hints
        return out

    def store(self, device: torch.device) -> dict[str, torch.Tensor]:
        """What batches for ``device`` gather from: on a CUDA device, the tensors within
        :data:`RESIDENT_SHARE` of its memory moved there (once, at first use); the rest on the CPU."""
        if device.type != "cuda":
            return self.sources()
        if device not in self._stores:
            sources = self.sources()
            budget = int(RESIDENT_SHARE * torch.cuda.get_device_properties(device).total_memory)
            keep = resident_rows({k: v.nbytes for k, v in sources.items()}, budget)
            self._stores[device] = {k: v.to(device) if k in keep else v for k, v in sources.items()}
            logger.info(
                "memory bank rows on %s: %s resident (%.0f MB of a %.0f MB budget); %s gathered through "
                "pinned memory%s",
                device,
                ", ".join(keep) or "none",
                sum(sources[k].nbytes for k in keep) / 1e6,
                budget / 1e6,
                ", ".join(k for k in sources if k not in keep) or "none",
                "; zero hints made on the device" if self.zero_hints else "",
            )
        return self._stores[device]

    def batch(
        self,
        indices: torch.Tensor,
        device: torch.device | str | None = None,
        posterior_generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows ``indices`` (int64 [n], CPU) stacked, on ``device`` (default: the CPU).

        Returns ``latents`` float32 [n,C,h,w], ``encoder_hidden_states`` float32 [n,L,D], the added
        conditioning, and ``conditioning_pixel_values`` float32 [n,3,R,R] in [0,1]. With
        ``posterior_generator`` the latents are a draw from each row's VAE posterior (mean + std * noise, the
        noise drawn from that CPU generator as a [n,C,h,w] tensor, the only draw), else the posterior mean.
        """
        device = _resolve(device)
        store = self.store(device)
        on_device = to_device(indices, device) if device.type == "cuda" else indices

        def rows(name: str) -> torch.Tensor:
            return _gather(store[name], indices, on_device, device)

        n = int(indices.shape[0])
        latents = rows("latents").float()
        if posterior_generator is not None:
            shape = (n, *self.latents.shape[1:])
            noise = torch.randn(shape, generator=posterior_generator, pin_memory=device.type == "cuda")
            latents = latents + rows("latent_std").float() * to_device(noise, device)
        if self.zero_hints:
            hints = torch.zeros((n, *self.hint_shape), dtype=torch.float32, device=device)
        else:
            hints = hint_to_float(rows("hints"))  # uint8 until here: a quarter of the bytes moved
        return {
            "latents": latents,
            "encoder_hidden_states": rows("encoder_hidden_states").float(),
            **{k: rows(k) for k in self.added},
            "conditioning_pixel_values": hints,
        }


def _resolve(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` with its index (``cuda`` -> ``cuda:<current>``): the key of a store."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _gather(
    src: torch.Tensor, indices: torch.Tensor, on_device: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Rows ``indices`` of ``src`` on ``device``: indexed where ``src`` lives on it; a CPU tensor bound for
    CUDA is gathered straight into pinned memory (the host allocator keeps the block until the copy is
    done) and copied asynchronously."""
    if src.device == device:
        return src.index_select(0, on_device)
    if device.type != "cuda":
        return to_device(src.index_select(0, indices), device)
    out = torch.empty((indices.shape[0], *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    torch.index_select(src, 0, indices, out=out)
    return out.to(device, non_blocking=True)
