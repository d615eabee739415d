"""Small shared helpers: atomic writes (and the cleanup of those a killed run left), cache locations,
JSON-lines logs, host-to-device copies, derived seeds, weights fingerprints."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's early checks run without it
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder for caches: ``cache_dir``, else ``$DIFFTUNE_CACHE``, else ``~/.cache/difftune_control``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DIFFTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "difftune_control"


def process_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): its imports, configuration and
    device start-up count, which a timer started in the code would miss."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK")), 2)  # /proc counts in 10 ms
    except (OSError, ValueError, IndexError):
        return None


_PROGRAM = {"one_command": False}


def mark_one_command() -> None:
    """Called by the command-line entry points: this process exists for the one command it runs, so its age
    is the command's time (a notebook or a test process is older than any run it makes)."""
    _PROGRAM["one_command"] = True


def command_seconds() -> float | None:
    """Seconds since the process started, when it runs one command (:func:`mark_one_command`); else None."""
    return process_seconds() if _PROGRAM["one_command"] else None


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


_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40] or "host"
_OWNED_TEMP = re.compile(r"^\..+\.pid(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[^.]+\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # written before the owner was in the name
LEGACY_TEMP_AGE_S = 24 * 3600
"""A temporary entry without an owner in its name is stale once nothing in it changed for this long."""

logger = logging.getLogger(__name__)


def _temp_prefix(path: Path) -> str:
    """``.<name>.pid<PID>@<host>.``: the writing process is in the name of every temporary entry, so a later
    run can tell the leftovers of a killed process from the work of a live one."""
    return f".{path.name}.pid{os.getpid()}@{_HOST}."


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness check: never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _newest_mtime(path: Path) -> float:
    """Latest modification of ``path`` and its direct children (a render writes into sub-folders)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as entries:
            for entry in entries:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def stale_temporaries(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Temporary files and folders in ``folder`` left by killed writers of :func:`atomic_path` / :func:`atomic_dir`.

    An entry is stale when the process named in it (``.<name>.pid<PID>@<host>.<random>.tmp``) runs on this
    host and no longer exists; entries of other hosts are never touched. Entries from before owners were
    named (``.<name>.<random>.tmp``) are stale once nothing in them changed for :data:`LEGACY_TEMP_AGE_S`.
    """
    folder = Path(folder)
    now = time.time() if now is None else now
    stale = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        path = Path(entry.path)
        owned = _OWNED_TEMP.match(entry.name)
        try:
            if owned:
                if owned["host"] == _HOST and not _pid_alive(int(owned["pid"])):
                    stale.append(path)
            elif _LEGACY_TEMP.match(entry.name) and now - _newest_mtime(path) > LEGACY_TEMP_AGE_S:
                stale.append(path)
        except OSError:
            continue  # gone meanwhile
    return sorted(stale)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``folder`` (logging what was freed) and return them."""
    removed = []
    for path in stale_temporaries(folder):
        try:
            size = (
                sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                if path.is_dir()
                else path.stat().st_size
            )
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            continue
        removed.append(path)
        logger.info("removed %s, left by a killed run (%.1f MB)", path, size / 1e6)
    return removed


def explain_os_error(path: Path, err: OSError) -> OSError:
    """``err`` with ``path`` and what to do in its message, for a full disk or a folder that cannot be written."""
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
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and some writers recreate the file): follow the umask like open() does
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise explain_os_error(path, err) from err
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
def atomic_dir(path: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it becomes ``path`` (an old one is replaced).

    Writers of the same folder may race (runs started together building one cache): each installs its
    folder under its own names, and with ``keep`` a ``path`` that another writer completed meanwhile
    (``keep(path)`` true) is kept and this writer's copy dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: follow the umask like mkdir does
    try:
        yield tmp
        _install_dir(tmp, path, keep)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_os_error(path, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install_dir(tmp: Path, path: Path, keep: Callable[[Path], bool] | None, attempts: int = 50) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is kept (``keep``) or moved aside to a name of this
    writer's own and deleted, so that concurrent writers never use one name. Where a concurrent writer's
    folder lands between the two renames, it is as new as this one and stays."""
    for _ in range(attempts):
        try:
            os.rename(tmp, path)  # onto a missing or empty folder
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if keep is not None and keep(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = path.with_name(path.name + ".old")
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(aside), suffix=".tmp", dir=path.parent))
        try:
            os.replace(path, old)  # onto this writer's empty folder
        except FileNotFoundError:  # another writer moved it meanwhile
            os.rmdir(old)
            continue
        try:
            os.rename(tmp, path)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, f"{path}: other writers kept moving it; try again")


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
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))


def hint_to_float(hint: torch.Tensor) -> torch.Tensor:
    """A hint batch as float32 in [0,1]: uint8 hints (as caches and banks store them) are scaled by 1/255.

    A multiplication by the float32 reciprocal, as CUDA computes a division by a scalar: the same values
    on either device (a CPU division differs from it in the last bit for some of the 256 levels).
    """
    import torch

    return hint.float() * (1.0 / 255.0) if hint.dtype == torch.uint8 else hint.float()


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
