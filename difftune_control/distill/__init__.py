"""Generative distillation of bank slots (``--retention trajectory|snr``, ``--teacher_controlnet``).

``trajectory`` (the math: SNR switch, recorded-state choice, eps/v conversion, recorder and states),
``teacher`` (the frozen teacher ControlNet and its (caption, hint) pairs), ``bank_extras`` (what
distillation adds to bank generation) and ``trainer`` (``DistillationTrainer``, registered as the
``trajectory``, ``snr`` and ``teacher`` retention sources when this package is imported).
"""

from difftune_control.distill.trainer import DistillationTrainer

__all__ = ["DistillationTrainer"]
