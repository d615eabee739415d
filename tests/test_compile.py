"""``--torch_compile``: the compiled-artefact cache, its log line, the backend switch, and the same numbers as eager."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from conftest import build_trainer, target_batch, tiny_config

from difftune_control.compiler import (
    BACKEND_ENV,
    CACHE_DIR_ENV,
    compile_backend,
    compile_cache,
)


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


def test_choosing_the_backend_leaves_the_cache_folder_to_us(tmp_path):
    """Inductor writes its /tmp default into $TORCHINDUCTOR_CACHE_DIR whenever something asks for its cache
    folder (listing dynamo's backends does); the run's cache must still land under the project's cache root
    (a fresh process: in this one inductor has long been asked)."""
    import subprocess
    import sys

    code = (
        "import torch._inductor.runtime.cache_dir_utils as inductor_dirs\n"
        "inductor_dirs.cache_dir()\n"  # what any part of a run may ask first
        "from difftune_control.compiler import compile_backend, compile_cache\n"
        "compile_backend()\n"
        "print(compile_cache()['dir'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != CACHE_DIR_ENV}
    env["DIFFTUNE_CACHE"] = str(tmp_path / "difftune")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "difftune" / "inductor")


def test_the_backend_comes_from_the_environment(clean_env):
    assert compile_backend() == "inductor"
    clean_env.setenv(BACKEND_ENV, "aot_eager")
    assert compile_backend() == "aot_eager"
    clean_env.setenv(BACKEND_ENV, "warp_drive")
    with pytest.raises(ValueError, match=rf"\${BACKEND_ENV}: got 'warp_drive'; choose one of \[.*'inductor'"):
        compile_backend()


def one_step(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and ControlNet gradients of one training step with a fixed plan and noise."""
    plan = trainer.plan(4)
    trainer.generator.manual_seed(5)
    loss = trainer.training_step(target_batch(trainer), plan=plan)["loss"].item()
    controlnet = trainer.accelerator.unwrap_model(trainer.controlnet)
    return loss, {k: p.grad.clone() for k, p in controlnet.named_parameters() if p.grad is not None}


def test_compiled_step_gives_the_eager_loss_and_gradients(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, caplog
):
    """``--torch_compile`` through the run's own setup, with the ``aot_eager`` backend (the same graph capture
    and AOT autograd as inductor, without its C compiler): one INFO line, the cache under the project's
    cache root, the blocks compiled in place (checkpoint keys unchanged), and the eager step's numbers.

    Tolerance: the captured graphs run the same ATen kernels in the same order (bit for bit on the 2-core
    CPU here), but AOT autograd may reorder independent ops, so float32 rounding is allowed: rtol 1e-5,
    atol 1e-7 (the gradients reach ~2; their rounding is ~1e-7 relative).
    """
    clean_env.setenv(BACKEND_ENV, "aot_eager")
    results = []
    for compiled in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(compiled), train__torch_compile=compiled
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="difftune_control"):
            trainer, _ = build_trainer(cfg)
        lines = [r for r in caplog.records if "torch.compile" in r.getMessage()]
        controlnet = trainer.accelerator.unwrap_model(trainer.controlnet)
        compiled_blocks = [m for m in controlnet.modules() if getattr(m, "_compiled_call_impl", None)]
        if not compiled:  # compile off: nothing compiled, nothing said, the environment untouched
            assert lines == [] and compiled_blocks == [] and CACHE_DIR_ENV not in os.environ
            keys = list(controlnet.state_dict())
        else:
            assert len(lines) == 1 and lines[0].levelno == logging.INFO
            cache = Path(os.environ["DIFFTUNE_CACHE"]) / "inductor"
            assert os.environ[CACHE_DIR_ENV] == str(cache)
            message = lines[0].getMessage()
            assert f"ControlNet ({len(compiled_blocks)})" in message and "UNet (" in message, message
            assert "mode default" in message and "backend aot_eager" in message and str(cache) in message
            assert "FX-graph cache on" in message and "AOT-autograd cache on" in message
            assert len(compiled_blocks) > 0 and list(controlnet.state_dict()) == keys
        results.append(one_step(trainer))
    torch._dynamo.reset()
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_stages_scope_compiles_whole_stages_and_gives_the_eager_step(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, caplog
):
    """``--torch_compile_scope stages`` (``aot_eager``): each down/mid/up stage of the ControlNet and UNet is one
    compiled module, no block inside it is compiled on its own, the log names the stages, and the step's loss
    and gradients are the eager ones (the tolerance of the test above)."""
    from difftune_control.training.compilation import COMPILED_BLOCKS, COMPILED_STAGES, compile_signature

    clean_env.setenv(BACKEND_ENV, "aot_eager")
    results, signatures = [], set()
    for scope in (None, "stages"):
        overrides = (
            {} if scope is None else {"train__torch_compile": True, "train__torch_compile_scope": scope}
        )
        cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(scope), **overrides)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="difftune_control"):
            trainer, _ = build_trainer(cfg)
        controlnet = trainer.accelerator.unwrap_model(trainer.controlnet)
        signatures.add(compile_signature(cfg, controlnet, trainer.base.unet))
        if scope is not None:
            for net in (controlnet, trainer.base.unet):
                compiled = [
                    type(m).__name__ for m in net.modules() if getattr(m, "_compiled_call_impl", None)
                ]
                assert compiled and set(compiled) <= set(COMPILED_STAGES), compiled
                assert not set(compiled) & set(COMPILED_BLOCKS)
            message = next(r.getMessage() for r in caplog.records if "torch.compile on" in r.getMessage())
            assert "CrossAttnDownBlock2D" in message and "ResnetBlock2D" not in message, message
        results.append(one_step(trainer))
    torch._dynamo.reset()
    assert len(signatures) == 2  # a stages build is not taken for a blocks one in the compile cache
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_compile_mode_reaches_every_block(clean_env, tmp_path, monkeypatch):
    from conftest import tiny_unet
    from diffusers import ControlNetModel

    from difftune_control.training import compilation

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    unet = tiny_unet()
    controlnet = ControlNetModel.from_unet(unet)
    out = compilation.compile_for_training(controlnet, unet, cache_dir=tmp_path, mode="reduce-overhead")
    assert out["mode"] == "reduce-overhead" and sum(out["blocks"].values()) == len(seen) > 0
    assert all(kw["mode"] == "reduce-overhead" and kw["dynamic"] is False for _, kw in seen)
    seen.clear()
    compilation.compile_for_training(controlnet, unet, cache_dir=tmp_path)
    assert seen and all("mode" not in kw for _, kw in seen)  # torch.compile's own default


def test_fused_backward_pass_updates_compiled_blocks_as_eager(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env
):
    """--fused_backward_pass under --torch_compile (aot_eager): the gradient hooks fire for the compiled
    blocks' parameters too, and one step leaves the weights the eager fused step leaves."""
    clean_env.setenv(BACKEND_ENV, "aot_eager")
    weights = []
    for compiled in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / str(compiled),
            method__method="vanilla",
            train__torch_compile=compiled,
            train__fused_backward_pass=True,
        )
        trainer, _ = build_trainer(cfg)
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        before = {k: v.detach().clone() for k, v in net.state_dict().items()}
        trainer.generator.manual_seed(0)
        trainer.training_step(target_batch(trainer))
        assert all(p.grad is None for p in net.parameters())
        after = {k: v.detach().clone() for k, v in net.state_dict().items()}
        assert sum(not torch.equal(before[k], after[k]) for k in after) > len(after) // 2
        weights.append(after)
    torch._dynamo.reset()
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_cuda_graph_modes_mark_every_step_and_lambdas_measurement_runs_eagerly(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, monkeypatch
):
    """Under CUDA graphs each step starts a new generation, so a block's forward never waits behind the
    previous step's uninvoked backward graphs. Lambda's measuring passes run the compiled blocks' eager code:
    nothing compiled or graphed for them (replayed as CUDA graphs their saved activations were overwritten
    before their backward on the GPU)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from difftune_control.training.compilation import cuda_graphs
    from difftune_control.training.diagnostics import bank_pull

    def train(compile_, mode):
        return SimpleNamespace(torch_compile=compile_, torch_compile_mode=mode)

    assert cuda_graphs(train(True, "reduce-overhead")) and cuda_graphs(train(True, "max-autotune"))
    assert not cuda_graphs(train(True, "default")) and not cuda_graphs(train(False, "reduce-overhead"))
    assert not cuda_graphs(train(True, "max-autotune-no-cudagraphs"))
    trainer, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "eager"))
    assert trainer.graphed is False  # no --torch_compile
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer.training_step(target_batch(trainer))  # lambda's first measurement, then the step
    assert marks == []

    clean_env.setenv(BACKEND_ENV, "aot_eager")
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "compiled", train__torch_compile=True)
    trainer, _ = build_trainer(cfg)
    trainer.graphed = True  # as a run under --torch_compile_mode reduce-overhead is built
    counters.clear()
    check = bank_pull(trainer, target_batch(trainer))
    assert check["plans"] >= 1 and marks == [] and counters["stats"].get("unique_graphs", 0) == 0
    trainer.training_step(target_batch(trainer))  # measures again (step 0), then the compiled step
    assert len(marks) == 1 and counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()


def test_torch_compile_reads_true_false_or_auto():
    import argparse

    from difftune_control.flags import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ["train"])
    read = lambda *argv: getattr(parser.parse_args(list(argv)), "train.torch_compile")  # noqa: E731
    assert read() is None  # not given: the config's value (False) stands
    assert read("--torch_compile") is True and read("--torch_compile", "yes") is True
    assert read("--torch_compile", "false") is False and read("--torch_compile=auto") == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--torch_compile", "sometimes"])


def test_compiling_pays_only_where_a_gain_was_measured_and_the_steps_earn_it_back():
    from difftune_control.training.compilation import COMPILE_SECONDS, compile_pays

    # batch 4 with CUDA graphs: 5% of a 100 ms step saved, 5 ms; 177 s on an empty cache -> 35,400 steps
    assert compile_pays(36_000, 0.1, 4, graphs=True, warm=False)[0]
    pays, why = compile_pays(30_000, 0.1, 4, graphs=True, warm=False)
    assert not pays and "30,000 steps at 100 ms eager" in why and "about 150 s saved" in why
    assert f"about {COMPILE_SECONDS['empty']:.0f} s of compiling on an empty compile cache" in why
    assert compile_pays(5000, 0.1, 4, graphs=True, warm=True)[0]  # 21 s on a warm cache: 4,200 steps
    assert not compile_pays(3000, 0.1, 4, graphs=True, warm=True)[0]
    # batch 8 with CUDA graphs: measured, no gain
    pays, why = compile_pays(10**7, 0.115, 8, graphs=True, warm=True)
    assert not pays and "no gain was measured for sd1 models at batch 8 with CUDA graphs" in why
    # batch 4 without CUDA graphs: no gain measured, whatever the length of the run
    pays, why = compile_pays(10**7, 0.175, 4, graphs=False, warm=True)
    assert not pays and "no gain was measured for sd1 models at batch 4 without CUDA graphs" in why
    assert compile_pays(10**5, 0.33, 32, graphs=False, warm=False)[0]  # 9% of 330 ms over 100k steps
    assert not compile_pays(10**5, 0.33, 32, graphs=True, warm=False)[0]  # graphs at batch 32: not measured
    pays, why = compile_pays(10**7, 0.33, 32, graphs=False, warm=True, scope="stages")
    assert not pays and "--torch_compile_scope stages" in why  # measured with blocks only
    for model in ("sdxl", "toy"):  # measured at SD1.5 only
        assert not compile_pays(10**7, 0.175, 4, graphs=True, warm=True, model=model)[0]


def test_a_failed_compile_trains_the_first_step_eagerly(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, caplog, monkeypatch
):
    """A compiler that fails at the first step (here a backend that raises, as inductor does without a C
    compiler) costs one warning naming its error: the blocks go back to eager and the step is the eager
    step, the same loss and gradients; later steps need no second try."""
    from difftune_control.training import compilation

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(compilation, "compile_backend", lambda: broken)
    results = []
    for compiled in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(compiled), train__torch_compile=compiled
        )
        trainer, _ = build_trainer(cfg)
        assert trainer.untried_compile is compiled
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftune_control"):
            results.append(one_step(trainer))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == compiled, warnings
    torch._dynamo.reset()
    assert "torch.compile failed at the first step (RuntimeError: no C compiler here)" in warnings[0]
    net = trainer.accelerator.unwrap_model(trainer.controlnet)
    assert not trainer.untried_compile and not trainer.graphed
    assert all(m._compiled_call_impl is None for m in (*net.modules(), *trainer.base.unet.modules()))
    (eager_loss, eager_grads), (loss, grads) = results
    assert loss == eager_loss and grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert torch.equal(grads[name], grad), name


def test_cuda_graphs_pay_where_the_eager_step_leaves_the_gpu_idle():
    """With the GPU's busy time measured, the saving counted for CUDA graphs is the eager step beyond 1.5x busy,
    for any model and batch; a step that keeps the GPU busy has nothing for graphs to save."""
    from difftune_control.training.compilation import GRAPHED_BUSY_FACTOR, compile_pays

    assert GRAPHED_BUSY_FACTOR == 1.5
    # a slow host at batch 8: 181 ms eager, the GPU busy 98.4: 1 - 1.5 * 98.4 / 181 = 18% saved, 33 ms per step
    pays, why = compile_pays(6_000, 0.181, 8, graphs=True, warm=False, busy_seconds=0.0984)
    assert pays and "the GPU busy 98 ms of the eager step's 181" in why and "18% of each saved" in why
    assert not compile_pays(5_000, 0.181, 8, graphs=True, warm=False, busy_seconds=0.0984)[0]  # 163 s < 177 s
    for model in ("sdxl", "toy"):  # the measurement stands for any model
        assert compile_pays(10**5, 0.181, 8, graphs=True, warm=False, model=model, busy_seconds=0.0984)[0]
    # a fast host: 114 ms eager with 100 ms busy: graphs cannot save what is not there
    pays, why = compile_pays(10**7, 0.114, 8, graphs=True, warm=True, busy_seconds=0.1)
    assert not pays and "too little host time for CUDA graphs to save" in why
    # without CUDA graphs the busy time is not the question: the table decides
    pays, why = compile_pays(10**7, 0.181, 8, graphs=False, warm=True, busy_seconds=0.0984)
    assert not pays and "no gain was measured" in why


def test_auto_picks_cuda_graphs_where_the_gpu_idles(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, caplog, monkeypatch
):
    """``--torch_compile auto`` with no mode given: CUDA graphs when the measured busy time says they pay (the
    trainer then marks each step for the graphs), the default mode when only the table's gain pays, and a given
    mode is the only one weighed."""
    from difftune_control.training import compilation

    clean_env.setenv(CACHE_DIR_ENV, str(tmp_path / "inductor"))
    monkeypatch.setattr(compilation, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 0.0, "warm": 0.0})
    compiled = []
    monkeypatch.setattr(compilation, "compile_for_training", lambda *a, **kw: compiled.append(a[3]))

    def auto(name: str, busy: float | None, **over) -> tuple[str, bool]:
        # the profiler's pass (busy) is made only where compiling could pay at all
        monkeypatch.setattr(
            compilation,
            "_eager_step_seconds",
            lambda trainer, batch, worth: (0.2, busy if worth(0.2) else None),
        )
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / name, train__torch_compile="auto", **over
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="difftune_control"):
            trainer, _ = build_trainer(cfg)
        said = [r.getMessage() for r in caplog.records if "--torch_compile auto" in r.getMessage()]
        assert len(said) == 1
        return said[0], trainer.graphed

    said, graphed = auto("idle", 0.05)  # 1 - 1.5 * 50 / 200: 62% saved
    assert compiled == ["reduce-overhead"] and graphed
    assert (
        said.startswith("--torch_compile auto: compiling: mode reduce-overhead: ") and "62% of each" in said
    )
    monkeypatch.setattr(compilation, "MEASURED_GAINS", (("sd1", False, 1, None, 0.1, "a test"),))
    said, graphed = auto("busy", 0.19)
    assert compiled[1:] == ["default"] and not graphed
    assert "compiling: mode default: " in said and "(mode reduce-overhead: the GPU busy 190 ms" in said
    said, graphed = auto("given", 0.05, train__torch_compile_mode="default")  # graphs not weighed
    assert compiled[2:] == ["default"] and "reduce-overhead" not in said and not graphed
    said, graphed = auto("checkpointed", 0.05, train__gradient_checkpointing=True)  # graphs never measured so
    assert compiled[3:] == ["default"] and not graphed
    assert "CUDA graphs not weighed: not measured with --gradient_checkpointing" in said
    monkeypatch.setattr(compilation, "MEASURED_GAINS", ())
    said, graphed = auto("none", None)  # no busy time measured (no profiler), no table entry
    assert len(compiled) == 4 and said.startswith("--torch_compile auto: not compiling: mode reduce-overhead")
    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 1e9, "warm": 1e9})
    said, graphed = auto("short", 0.05)  # the run's eager time is less than compiling: no gain weighed
    assert len(compiled) == 4 and not graphed and said.startswith("--torch_compile auto: not compiling: ")
    assert "no more than the 1000000000 s of compiling" in said and "mode" not in said


def test_gpu_busy_time_is_measured_on_cuda_and_unknown_elsewhere():
    """One call under the profiler: the kernels' time on CUDA (a chain of matmuls keeps the GPU busy for a
    share of the wall time that no host dispatch can shrink), None without a GPU."""
    from difftune_control.training.profiling import gpu_busy_seconds

    if not torch.cuda.is_available():
        assert gpu_busy_seconds(lambda: torch.ones(4).sum()) is None
        return
    x = torch.randn(4096, 4096, device="cuda")

    def work():
        for _ in range(20):
            x @ x

    work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    busy = gpu_busy_seconds(work)
    assert busy is not None and 0.5 * wall < busy < 2 * wall


GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_auto_compiles_when_it_pays_and_a_second_run_counts_on_the_warm_cache(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, caplog, monkeypatch, device
):
    """``--torch_compile auto`` through the run's setup (on the CPU allowed here; aot_eager): the eager step
    timed without an update or a draw of the trainer's generator, the reckoning logged, the blocks compiled
    when it pays, and the setting noted so the next run reckons with the warm cache's cost."""
    from difftune_control.training import compilation

    clean_env.setenv(BACKEND_ENV, "aot_eager")
    clean_env.setenv(CACHE_DIR_ENV, str(tmp_path / "inductor"))  # this test's own: no setting noted before
    monkeypatch.setattr(compilation, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(compilation, "MEASURED_GAINS", (("sd1", False, 1, None, 0.5, "a test"),))
    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 1e9, "warm": 0.0})

    def auto_run(name: str) -> tuple[list[str], list, list[str]]:
        """A run's setup under --torch_compile auto: its auto log lines, its compiled blocks, all its lines."""
        cfg = tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / name,
            train__torch_compile="auto",
            train__device=device,
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="difftune_control"):
            trainer, _ = build_trainer(cfg)
        lines = [r.getMessage() for r in caplog.records]
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        compiled = [m for m in net.modules() if getattr(m, "_compiled_call_impl", None)]
        return [m for m in lines if "--torch_compile auto" in m], compiled, lines

    said, built = zip(*[auto_run(name)[:2] for name in ("first", "second")], strict=True)
    torch._dynamo.reset()
    # the run's whole eager time is less than compiling takes: no reckoning of the gain needed
    assert len(said[0]) == 1 and said[0][0].startswith("--torch_compile auto: not compiling: ")
    assert "no more than the 1000000000 s of compiling" in said[0][0] and built[0] == []
    # the first run compiled nothing, so nothing is noted: the second reckons with an empty cache too
    assert len(said[1]) == 1 and "no more than the 1000000000 s of compiling" in said[1][0] and built[1] == []
    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 1e-6, "warm": 0.0})
    monkeypatch.setattr(compilation, "MEASURED_GAINS", (("sd1", False, 1, None, 1e-9, "a test"),))
    said = auto_run("fifth")[0]
    assert "not compiling: " in said[0] and "on an empty compile cache" in said[0]
    monkeypatch.setattr(compilation, "MEASURED_GAINS", (("sd1", False, 1, None, 0.5, "a test"),))

    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 0.0, "warm": 0.0})
    messages, compiled, lines = auto_run("third")
    assert len(messages) == 1 and messages[0].startswith("--torch_compile auto: compiling: ")
    assert compiled and any("torch.compile on" in m for m in lines)
    noted = list((Path(os.environ[CACHE_DIR_ENV]) / "difftune-compiled").iterdir())
    assert len(noted) == 1
    monkeypatch.setattr(compilation, "COMPILE_SECONDS", {"empty": 1e9, "warm": 0.0})
    messages = auto_run("fourth")[0]
    assert "compiling: " in messages[0] and "this setting's warm compile cache" in messages[0]
    torch._dynamo.reset()


def test_auto_leaves_the_run_as_it_would_be_eager(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, monkeypatch
):
    """Timing the eager step draws nothing from the trainer's generator and updates nothing: a run under
    ``--torch_compile auto`` that stays eager takes the eager run's first step exactly (the CPU: not weighed)."""
    from difftune_control.training import compilation

    steps = []
    for value in (False, "auto"):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(value), train__torch_compile=value
        )
        trainer, _ = build_trainer(cfg)
        steps.append(one_step(trainer))
    assert steps[0][0] == steps[1][0]
    for name, grad in steps[0][1].items():
        assert torch.equal(steps[1][1][name], grad), name
    # and where it is weighed (monkeypatched to the CPU), the timing passes leave the same first step
    monkeypatch.setattr(compilation, "AUTO_DEVICES", ("cpu",))
    monkeypatch.setattr(compilation, "MEASURED_GAINS", ())
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "weighed", train__torch_compile="auto")
    trainer, _ = build_trainer(cfg)
    loss, grads = one_step(trainer)
    assert loss == steps[0][0]
    for name, grad in steps[0][1].items():
        assert torch.equal(grads[name], grad), name


def test_sampling_runs_compiled_blocks_eagerly(clean_env):
    """The detector and validation grids sample under ``sampling_mode``: blocks compiled for training are not
    compiled again for no-grad sampling at other batch sizes."""
    from torch._dynamo.utils import counters

    from difftune_control.validation import sampling_mode

    layer = torch.nn.Linear(8, 8)
    layer.compile(backend="aot_eager", dynamic=False)
    layer(torch.randn(4, 8)).sum().backward()
    counters.clear()
    unet = torch.nn.Linear(1, 1)  # the sampling mode reads the frozen UNet's device and dtype
    unet.device, unet.dtype = torch.device("cpu"), torch.float32
    with torch.no_grad(), sampling_mode(unet):
        out = layer(torch.randn(6, 8))
    assert counters["stats"].get("unique_graphs", 0) == 0 and out.shape == (6, 8)
    with torch.no_grad():
        layer(torch.randn(6, 8))
    assert counters["stats"]["unique_graphs"] == 1  # outside it, the compiler would have compiled again
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_gives_the_eager_loss_and_gradients(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env, mode
):
    """What the CPU test checks with aot_eager, with inductor's own kernels on the GPU, plain and under CUDA
    graphs. TF32 off for matmuls and cuDNN's convolutions (on by default: there a last-bit difference upstream
    can flip an input's rounding to TF32's 10-bit mantissa), so the difference is float32 rounding in fused
    kernels: each gradient within 1e-4 of its norm, the loss within 1e-5."""
    clean_env.setenv(CACHE_DIR_ENV, str(tmp_path / "inductor"))
    clean_env.setattr(torch.backends.cudnn, "allow_tf32", False)
    results = []
    for compiled in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / str(compiled),
            train__torch_compile=compiled,
            train__torch_compile_mode=mode,
            train__allow_tf32=False,
            train__device="cuda",
        )
        trainer, _ = build_trainer(cfg)
        assert trainer.device.type == "cuda" and trainer.graphed is (compiled and mode == "reduce-overhead")
        results.append(one_step(trainer))
    torch._dynamo.reset()
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    errors = {
        k: float((compiled_grads[k] - g).norm() / g.norm().clamp_min(1e-12)) for k, g in eager_grads.items()
    }
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] < 1e-4, f"largest relative gradient errors: {worst}"
