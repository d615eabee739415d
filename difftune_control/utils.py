"""Small shared helpers: atomic writes, cache locations, JSON-lines logs, host-to-device copies, derived seeds,
weights fingerprints."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder for caches: ``cache_dir``, else ``$DIFFTUNE_CACHE``, else ``~/.cache/difftune_control``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DIFFTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "difftune_control"


def unwritable_dir(path: str | os.PathLike) -> str | None:
    """Why a folder cannot be created or written (None when it can), checked without creating anything.

    An existing path must be a writable folder; a new one needs its nearest existing parent to be a
    writable folder.
    """
    target = Path(path).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            return "exists and is not a folder"
        return None if os.access(target, os.W_OK | os.X_OK) else "is not writable (permission denied)"
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable (permission denied)"
    return None


def _explain_os_error(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(
            errno.ENOSPC, f"no space left on device while writing {path}; free space or choose another folder"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(err.errno, f"cannot write {path}: {err.strerror}; choose a writable folder")
    return err


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    A crash, a full disk or an exception leaves any previous ``path`` untouched. The file gets the
    permissions any new file gets (0644 under the usual umask 022), so a WebUI or ComfyUI running as
    another user can read exports, reports and configs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and some writers recreate the file): follow the umask like open() does
        os.chmod(tmp_path, 0o666 & ~current_umask())
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
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: follow the umask like mkdir does
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


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, epoch, sample index), never on history.

    Hashing keeps nearby tuples apart (``(0, 1, 0)`` and ``(0, 0, 1)`` give unrelated seeds), so every
    random draw can have its own generator: a resumed run, a process that loaded a model with random
    initialisation first, or a DataLoader worker all draw the same numbers for the same ``parts``.
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def derived_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def to_device(
    x: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x.to(device, dtype)`` that does not wait for the GPU: a CPU tensor bound for CUDA is staged in
    pinned memory and copied asynchronously, so the training step never drains the GPU's queue."""
    device = torch.device(device) if device is not None else x.device
    if device.type == "cuda" and x.device.type == "cpu":
        x = x if x.is_pinned() else x.pin_memory()
        return x.to(device, dtype, non_blocking=True)
    return x.to(device, dtype)


def weights_fingerprint(model_id: str | Path) -> str | None:
    """Content fingerprint of a local model's weights files, or None for a hub id.

    Hashes each ``*.safetensors`` / ``*.bin`` / ``*.ckpt`` / ``*.pt`` file's relative path, size, and
    first and last MiB: constant time even for multi-GB checkpoints, and any retraining changes it.
    """
    path = Path(model_id)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()), path
    else:
        return None
    digest = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        digest.update(f"{p.relative_to(root).as_posix()}:{size}".encode())
        with open(p, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]
