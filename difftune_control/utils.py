"""Small shared helpers: atomic writes, cache locations, JSON-lines logs, host-to-device copies."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's early checks run without it
    import torch


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder for caches: ``cache_dir``, else ``$DIFFTUNE_CACHE``, else ``~/.cache/difftune_control``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DIFFTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "difftune_control"


def _explain_os_error(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(
            errno.ENOSPC, f"no space left on device while writing {path}; free space or choose another folder"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(err.errno, f"cannot write {path}: {err.strerror}; choose a writable folder")
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    A crash, a full disk or an exception leaves any previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _explain_os_error(path, err) from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_safetensors(
    tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary file and ``os.replace``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it becomes ``path`` (an old one is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain_os_error(path, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JsonlLogger:
    """Appends one JSON object per line and flushes, so a crash loses at most the line in flight."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a truncated last line (a run killed mid-write) is ignored."""
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
    return records


def to_device(
    x: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x.to(device, dtype)`` that does not wait for the GPU: a CPU tensor bound for CUDA is staged in
    pinned memory and copied asynchronously, so the training step never drains the GPU's queue."""
    import torch

    device = torch.device(device) if device is not None else x.device
    if device.type == "cuda" and x.device.type == "cpu":
        x = x if x.is_pinned() else x.pin_memory()
        return x.to(device, dtype, non_blocking=True)
    return x.to(device, dtype)
