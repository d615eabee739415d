"""Run ``difftune train`` in this process and SIGKILL it at a chosen point (for the kill -9 resume tests).

    python tests/kill_driver.py POINT N -- <difftune train flags>

POINT is where the process kills itself, at the N-th time it gets there (``none`` never does):
``step`` after the N-th micro-batch's backward, before its optimizer step; ``save`` inside the N-th
checkpoint save, after accelerate wrote its state and before the folder is complete; ``eval`` inside
the N-th detector evaluation. A fault injector, not a mock: everything else runs as in production.
"""

from __future__ import annotations

import os
import signal
import sys

import torch


def _kill_on_call(owner: object, name: str, nth: int, before: bool) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if before and calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if not before and calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    point, nth, sep, *flags = argv
    assert sep == "--", "usage: kill_driver.py POINT N -- FLAGS"
    torch.set_num_threads(1)  # as the in-process tests (conftest.py)
    if point == "step":
        from difftune_control.methods.base import ControlNetTrainer

        _kill_on_call(ControlNetTrainer, "training_step", int(nth), before=False)
    elif point == "save":
        from accelerate import Accelerator

        _kill_on_call(Accelerator, "save_state", int(nth), before=False)
    elif point == "eval":
        from difftune_control.convergence import ConvergenceMonitor
        from difftune_control.extractors.base import ConditionExtractor

        # in the N-th evaluation, at its re-extraction: images sampled, not yet scored
        state = {"evals": 0}
        evaluate, extract = ConvergenceMonitor.evaluate, ConditionExtractor.__call__

        def counting_evaluate(self, *args, **kwargs):
            state["evals"] += 1
            return evaluate(self, *args, **kwargs)

        def killing_extract(self, *args, **kwargs):
            if state["evals"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return extract(self, *args, **kwargs)

        ConvergenceMonitor.evaluate, ConditionExtractor.__call__ = counting_evaluate, killing_extract
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    from difftune_control.cli import main as cli_main

    return cli_main(["train", *flags])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
