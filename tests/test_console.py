"""What a run prints: a short summary of the resolved run, no warnings a user cannot act on, and a
finished run that is resumed says so instead of silently doing nothing."""

from __future__ import annotations

import logging

from conftest import tiny_config

from difftune_control.config import RunConfig, resolve_defaults
from difftune_control.console import run_summary


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_summary_names_model_data_method_steps_batch_and_run_folder():
    cfg = resolve_defaults(RunConfig(), toy=True)
    cfg.data.max_train_samples = 512
    text = run_summary(cfg, run_dir="runs/demo", toy=True, device="cpu", precision="no")
    assert text.startswith("new run in runs/demo (resolved config: runs/demo/config.json)")
    for fact in (
        "toy world",
        "first 512 samples",
        "depth hints, 64 px",
        "Diff-Tuning, fixed split",
        f"memory bank of {cfg.bank.bank_size} images",
        f"{cfg.train.max_train_steps} optimizer steps, batch 64",
        "learning rate 1e-4, on cpu (fp32)",
    ):
        assert fact in text, fact
    assert len(text.splitlines()) <= 8  # a summary, not the config dump

    cfg.method.method = "vanilla"
    text = run_summary(cfg, run_dir="runs/demo", toy=True, device="cuda", precision="bf16", resumed_step=200)
    assert text.startswith("resuming runs/demo at step 200") and "vanilla ControlNet" in text
    assert "memory bank" not in text and "(bf16), torch.compile auto (CUDA graphs or not: decided" in text
    cfg.train.torch_compile = False
    assert "torch.compile" not in run_summary(cfg, run_dir="r", toy=True, device="cuda", precision="bf16")
    cfg.train.torch_compile = "auto"  # the default
    assert "torch.compile" not in run_summary(cfg, run_dir="r", toy=True, device="cpu", precision="no")
    cfg.train.torch_compile, cfg.train.torch_compile_mode = True, "reduce-overhead"
    assert "on cuda (bf16), torch.compile (mode reduce-overhead)" in run_summary(
        cfg, run_dir="r", toy=True, device="cuda", precision="bf16"
    )
    cfg.train.torch_compile = "auto"
    assert "torch.compile auto (mode reduce-overhead: decided before the first step)" in run_summary(
        cfg, run_dir="r", toy=True, device="cuda", precision="bf16"
    )
    cfg.train.torch_compile, cfg.train.torch_compile_scope = True, "stages"
    assert "torch.compile (mode reduce-overhead, whole stages)" in run_summary(
        cfg, run_dir="r", toy=True, device="cuda", precision="bf16"
    )


def test_run_prints_no_config_dump_nor_fp32_note_and_a_finished_run_says_how_to_continue(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, caplog
):
    from difftune_control.training.loop import run_training as train

    def cfg(steps, **kw):
        return tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path,
            train__max_train_steps=steps,
            method__method="vanilla",
            **kw,
        )

    diffusers_log = _Kept()  # diffusers logs to its own handler, without propagating
    logging.getLogger("diffusers").addHandler(diffusers_log)
    try:
        with caplog.at_level(logging.INFO):
            run = train(cfg(2))
    finally:
        logging.getLogger("diffusers").removeHandler(diffusers_log)
    assert "new run in" in caplog.text and "resolved config:\n{" not in caplog.text
    assert not [m for m in diffusers_log.messages if "kept in float32" in m]

    caplog.clear()
    metrics = (run / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        assert train(cfg(2, train__resume_from_checkpoint="latest")) == run
    assert "already finished" in caplog.text and "--max_train_steps (e.g. 4)" in caplog.text
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained, nothing logged

    with caplog.at_level(logging.INFO):
        train(cfg(4, train__resume_from_checkpoint="latest"))
    assert "resuming" in caplog.text and (run / "checkpoint-4").is_dir()
