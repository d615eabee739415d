"""The ``torch.compile`` settings every compiled part of the project shares: the backend (internal switch
``$DIFFTUNE_COMPILE_BACKEND``, default ``inductor``) and the persistent cache of compiled artefacts under the
project's cache root. Below the trainer and the toy world, beside :mod:`difftune_control.utils`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from difftune_control.utils import cache_root

BACKEND_ENV = "DIFFTUNE_COMPILE_BACKEND"
"""Environment variable naming the ``torch.compile`` backend of ``--torch_compile`` (default ``inductor``)."""
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
CACHE_SWITCHES = {  # (config module, attribute) -> the environment variable that forces it
    ("torch._inductor.config", "fx_graph_cache"): "TORCHINDUCTOR_FX_GRAPH_CACHE",
    ("torch._functorch.config", "enable_autograd_cache"): "TORCHINDUCTOR_AUTOGRAD_CACHE",
}


def compile_backend() -> str:
    """The backend named by ``$DIFFTUNE_COMPILE_BACKEND`` (default ``inductor``), checked against dynamo's."""
    backend = os.environ.get(BACKEND_ENV) or "inductor"
    known = torch._dynamo.list_backends(exclude_tags=())
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

    # inductor writes its /tmp default into the environment when anything asks for its cache folder (listing
    # the backends does): that value is not the user's choice
    user_dir = os.environ.get(CACHE_DIR_ENV) not in (None, "", _inductor_default())
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


def _inductor_default() -> str | None:
    """The folder inductor uses when ``$TORCHINDUCTOR_CACHE_DIR`` is unset (None where this torch lacks it)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def run_eagerly() -> contextlib.AbstractContextManager:
    """Blocks compiled by ``torch.compile`` run their eager code inside this context (``torch.compiler.set_stance
    ("force_eager")``): for passes whose shapes or grad mode differ from the compiled step's (sampling, the bank's
    gradient measurement), which would otherwise compile again or record more CUDA graphs."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's errors (a backend's failure arrives wrapped in one) and
    inductor's (e.g. no C compiler for the CPU)."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InductorError

    return TorchDynamoException, InductorError, CppCompileError


def compile_error_text(error: BaseException) -> str:
    """``Type: first line`` of the compiler's own error (dynamo wraps a backend's), for a one-line warning."""
    inner = getattr(error, "inner_exception", None) or error
    return f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"


def uncompile(module: torch.nn.Module) -> bool:
    """Undo ``module.compile()``: the module runs its eager code again. Returns whether it was compiled."""
    compiled = module._compiled_call_impl is not None
    module._compiled_call_impl = None
    return compiled
