"""Files follow the process umask like any other file: exports, reports and configs are readable by a
WebUI / ComfyUI running as another user (0644 under the usual umask 022), not 0600 as mkstemp makes them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    from difftune_control.utils import atomic_dir, atomic_save_safetensors, atomic_write_text

    atomic_write_text(tmp_path / "config.json", "{}")
    atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a.txt").write_text("a")
    assert _mode(tmp_path / "config.json") == _mode(tmp_path / "w.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == 0o777 & ~umask

    from difftune_control.utils import current_umask

    assert current_umask() == umask  # read without changing it


def test_exports_are_0644_under_umask_022(tmp_path):
    from diffusers import ControlNetModel

    from difftune_control.export.cli import main

    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        ControlNetModel(
            block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
            conditioning_embedding_out_channels=(4, 8),
        ).save_pretrained(tmp_path / "cn")  # fmt: skip
        common = [str(tmp_path / "cn"), "--condition", "canny", "--name", "mine", "--no-verify"]
        assert main([*common, "--out", str(tmp_path / "o")]) == 0
        assert main([*common, "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    finally:
        os.umask(old)
    assert _mode(tmp_path / "o" / "control_mine_toy_canny_fp16.safetensors") == 0o644
    (folder,) = [p for p in (tmp_path / "d").iterdir() if p.is_dir()]
    assert _mode(folder) == 0o755
