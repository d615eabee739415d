"""``--bf16_weights``: the ControlNet's forward and backward on a bf16 copy of its weights, the fp32 weights kept as
the master copy that the optimizer updates and that checkpoints and exports save.

Under autocast (the default) every step casts each fp32 weight to bf16 in the forward and each bf16 weight gradient
back to fp32 in the backward, about 380 + 380 small kernels at SD1.5, and autocast runs the ControlNet's GroupNorms
and LayerNorms in fp32. Here the casts happen once per update instead, in bulk: the bf16 copy lives in one flat
buffer, the fp32 weights in another, and refreshing one from the other is one copy; the gradients of the bf16
copy are gathered and added into the fp32 weights' gradients (views of one flat buffer) after each backward, so
gradient accumulation, clipping and the optimizer see fp32 gradients as before. The ControlNet then runs outside
autocast in bf16, as the frozen UNet does.

The weight gradients are the same bf16 values autocast gives (its matmuls and convolutions compute them in bf16
and cast them up); the norms' arithmetic in bf16 is the difference, as for the UNet.

Under ``--torch_compile`` the compiled blocks take the copy's tensors as their weights (inputs of the captured
graphs, at fixed addresses, so CUDA graphs read them in place and a refresh needs no recompile).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

DTYPE = torch.bfloat16


def _flatten(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Put ``params``' values into one flat buffer of their dtype, each parameter becoming a view of it."""
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.empty(0)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.data = flat[offset : offset + n].view_as(p)
            offset += n
    return flat


class _ClassForward(torch.nn.Module):
    """``module`` run by its class's own ``forward``: not the autocast wrapper accelerate sets on a prepared model's
    instance (which would run the norms in fp32 again and hand the outputs back in fp32)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, *args, **kwargs):
        return type(self.inner).forward(self.inner, *args, **kwargs)


class HalfWeights:
    """A bf16 forward copy of ``module``'s parameters (the trained ones get gradients), refreshed after each update.

    Call it like the module (``.dtype`` is bf16, so :func:`~difftune_control.validation.controlled_forward` casts
    the inputs); :meth:`fold` after each backward adds the copy's gradients into the fp32 parameters' ones.
    """

    def __init__(self, module: torch.nn.Module, optimizer=None):
        named = list(module.named_parameters())  # frozen ones too: the forward runs in one dtype
        self.names = [f"inner.{n}" for n, _ in named]
        self.call = _ClassForward(module)
        self.masters = [p for _, p in named]
        self.flat32 = _flatten(self.masters)
        self.flat = self.flat32.to(DTYPE)
        self.copies, offset = [], 0
        for p in self.masters:  # leaves of their own, views of the flat bf16 buffer
            self.copies.append(
                self.flat[offset : offset + p.numel()].view_as(p).requires_grad_(p.requires_grad)
            )
            offset += p.numel()
        for c in self.copies:  # fixed addresses, refreshed in place: CUDA graphs read them where they are
            torch._dynamo.mark_static_address(c, guard=False)
        self.trained = [i for i, p in enumerate(self.masters) if p.requires_grad]
        self.grad32: torch.Tensor | None = None  # the fp32 gradients' flat buffer, made at the first fold
        self._zeros: dict[int, torch.Tensor] = {}  # stand-ins for parameters a pass did not use
        self.dtype, self.device = DTYPE, self.flat32.device
        if optimizer is not None:  # the optimizer's own (accelerate wraps it): after each update
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.register_step_post_hook(lambda *args: self.refresh())
        module.register_load_state_dict_post_hook(lambda *args: self.refresh())  # a resumed run's weights
        # saved weights must not share one buffer (safetensors refuses that): each is saved as its own copy
        shared = self.flat32.untyped_storage().data_ptr()

        def own_copies(mod, state, prefix, local_metadata):
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == shared:
                    state[k] = v.clone()

        module._register_state_dict_hook(own_copies)

    @torch.no_grad()
    def refresh(self) -> None:
        """The bf16 copy from the fp32 weights (one copy of the flat buffer)."""
        self.flat.copy_(self.flat32)

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device.type, enabled=False):
            return functional_call(self.call, dict(zip(self.names, self.copies)), args, kwargs, strict=False)

    def fold(self) -> None:
        """Add the bf16 copy's gradients into the fp32 parameters' (which become views of one fp32 buffer) and
        clear them. A gradient the last passes did not produce counts as zero."""
        grads = []
        for i in self.trained:
            c = self.copies[i]
            g = c.grad
            if g is None:
                g = self._zeros.get(i)
                if g is None:
                    g = self._zeros[i] = torch.zeros_like(c)
            grads.append(g)
            c.grad = None
        flat = torch._utils._flatten_dense_tensors(grads)  # one cat, its views made in C++
        masters = [self.masters[i] for i in self.trained]
        if self.grad32 is None:  # the fp32 gradients: views of one buffer, made once
            self.grad32 = torch.empty_like(flat, dtype=self.flat32.dtype)
            self._grad_views = torch._utils._unflatten_dense_tensors(self.grad32, masters)
        with torch.no_grad():
            if any(p.grad is None for p in masters):  # after zero_grad(set_to_none=True): start over
                self.grad32.copy_(flat)
                for p, v in zip(masters, self._grad_views, strict=True):
                    p.grad = v
            else:
                self.grad32.add_(flat)
