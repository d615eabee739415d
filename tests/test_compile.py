"""``--torch_compile``: the compiled-artefact cache under the project's cache root, unless the user set one."""

from __future__ import annotations

import os

import pytest
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

from difftune_control.training.compilation import (
    CACHE_DIR_ENV,
    compile_cache,
)

SWITCHES = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture
def clean_env(monkeypatch):
    """No user setting of the compiler's caches; both caches off, as an older torch has them (restored after)."""
    for name in (CACHE_DIR_ENV, *SWITCHES):
        monkeypatch.delenv(name, raising=False)
    # the config modules' own patch(): monkeypatch's undo deletes a config entry instead of restoring it
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield monkeypatch


def test_the_cache_lives_under_the_project_cache_root(clean_env, tmp_path):
    clean_env.setenv("DIFFTUNE_CACHE", str(tmp_path / "difftune"))
    cache = compile_cache()
    assert os.environ[CACHE_DIR_ENV] == cache["dir"] == str(tmp_path / "difftune" / "inductor")
    assert cache["user_dir"] is False
    assert inductor_config.fx_graph_cache is True and functorch_config.enable_autograd_cache is True
    assert cache["fx_graph_cache"] is True and cache["enable_autograd_cache"] is True
    # --cache_dir names the cache root of the run
    clean_env.delenv(CACHE_DIR_ENV)
    assert compile_cache(tmp_path / "runcache")["dir"] == str(tmp_path / "runcache" / "inductor")


def test_the_users_settings_stand(clean_env, tmp_path):
    clean_env.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    clean_env.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    cache = compile_cache(tmp_path / "runcache")
    assert os.environ[CACHE_DIR_ENV] == cache["dir"] == str(tmp_path / "mine") and cache["user_dir"] is True
    assert inductor_config.fx_graph_cache is False and cache["fx_graph_cache"] is False  # the user said 0
    assert functorch_config.enable_autograd_cache is True  # not set by the user: switched on
    assert not (tmp_path / "runcache").exists()
