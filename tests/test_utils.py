"""Atomic writes leave no debris: temporaries of killed writers are removed by the next write to their
folder, and only those whose process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from difftune_control.utils import _HOST, atomic_dir, atomic_write_text, stale_temporaries

REPO = Path(__file__).resolve().parents[1]

# A writer killed in the middle of an atomic folder write (as a render killed with Ctrl-\ or by the OOM killer).
KILLED_WRITER = """
import sys, time
from pathlib import Path
from difftune_control.utils import atomic_dir
with atomic_dir(Path(sys.argv[1]) / "train-n10000") as tmp:
    (tmp / "images").mkdir()
    (tmp / "images" / "000000.png").write_bytes(b"x" * 1000)
    print(tmp.name, flush=True)
    time.sleep(60)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    name = writer.stdout.readline().strip()
    assert name.startswith(f".train-n10000.pid{writer.pid}@") and (tmp_path / name).is_dir()
    assert stale_temporaries(tmp_path) == []  # its writer is alive: not stale
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert stale_temporaries(tmp_path) == [tmp_path / name]

    with atomic_dir(tmp_path / "train-n2000") as tmp:  # the next run, another dataset in the same cache
        (tmp / "done").write_text("ok")
    assert not (tmp_path / name).exists() and (tmp_path / "train-n2000" / "done").is_file()


def test_only_temporaries_no_live_process_owns_are_stale(tmp_path):
    dead, now = _dead_pid(), time.time()
    entries = {
        f".a.pid{dead}@{_HOST}.k3j4h5g6.tmp": True,  # killed writer on this host
        f".b.pid{os.getpid()}@{_HOST}.k3j4h5g6.tmp": False,  # a live writer (this process)
        f".c.pid{dead}@some-other-host.k3j4h5g6.tmp": False,  # another host's: cannot tell, keep
        ".d.k3j4h5g6.tmp": True,  # unnamed owner, untouched for two days
        ".e.k3j4h5g6.tmp": False,  # unnamed owner, written an hour ago
        ".notes.tmp": False,  # not ours
        "results.k3j4h5g6.tmp": False,  # not hidden: not ours
    }
    for name in entries:
        (tmp_path / name).mkdir()
    (tmp_path / f".f.pid{dead}@{_HOST}.k3j4h5g6.tmp").write_text("a killed file write")
    entries[f".f.pid{dead}@{_HOST}.k3j4h5g6.tmp"] = True
    os.utime(tmp_path / ".d.k3j4h5g6.tmp", (now - 2 * 86400, now - 2 * 86400))
    os.utime(tmp_path / ".e.k3j4h5g6.tmp", (now - 3600, now - 3600))

    assert stale_temporaries(tmp_path, now=now) == sorted(
        tmp_path / n for n, stale in entries.items() if stale
    )
    atomic_write_text(tmp_path / "manifest.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, stale in entries.items() if not stale] + ["manifest.json"]
    )


def _write(path: Path, who: str, keep=None, pause: float = 0.0) -> None:
    with atomic_dir(path, keep=keep) as tmp:
        (tmp / "a").write_text(who)
        time.sleep(pause)
        (tmp / "b").write_text(who)


def test_a_folder_another_writer_completed_meanwhile_is_kept_or_replaced(tmp_path):
    """Runs started together build one cache folder: the one that lands first is kept (``keep``) or replaced."""
    done = tmp_path / "val-n64"
    with atomic_dir(done, keep=lambda p: (p / "b").is_file()) as tmp:
        (tmp / "b").write_text("mine")
        _write(done, "theirs")  # another writer finishes first
    assert (done / "b").read_text() == "theirs"
    with atomic_dir(done) as tmp:
        (tmp / "b").write_text("mine")
        _write(done, "theirs again")
    assert (done / "b").read_text() == "mine" and not (done / "a").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["val-n64"]  # no temporaries, no old copies


def test_concurrent_writers_of_one_folder_all_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "train-n10000"
    for keep in (None, lambda p: (p / "b").is_file()):
        with ThreadPoolExecutor(12) as pool:
            for fut in [pool.submit(_write, target, str(i), keep, 0.001 * (i % 3)) for i in range(24)]:
                fut.result()  # no writer fails
        a, b = (target / "a").read_text(), (target / "b").read_text()
        assert a == b  # one writer's folder, whole
        assert [p.name for p in tmp_path.iterdir()] == ["train-n10000"]


def test_hints_from_files_and_from_uint8_caches_are_the_same_floats():
    """One uint8-to-float conversion: a PIL hint, a cached uint8 hint (CPU) give bit-identical values."""
    import numpy as np
    import torch
    from PIL import Image

    from difftune_control.data.transforms import hint_to_tensor
    from difftune_control.utils import hint_to_float

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([levels, levels.T, 255 - levels], axis=-1)
    from_file = hint_to_tensor(Image.fromarray(rgb))
    cached = hint_to_float(torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(from_file, cached)
    assert cached.min() == 0.0 and cached.max() == 1.0
