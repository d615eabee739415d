"""Generative distillation of bank slots (``--retention trajectory|snr``, ``--teacher_controlnet``).

``trajectory`` (the math: SNR switch, recorded-state choice, eps/v conversion, recorder and states),
``teacher`` (the frozen teacher ControlNet and its (caption, hint) pairs), ``bank_extras`` (what
distillation adds to bank generation, and the bank's reader of the recorded states) and ``trainer``
(``DistillationTrainer``). Importing this package registers the ``trajectory``, ``snr`` and ``teacher``
retention sources and the bank's ``trajectory`` extra.
"""

from difftune_control.distill.bank_extras import BankDistillation
from difftune_control.distill.trainer import DistillationTrainer

__all__ = ["BankDistillation", "DistillationTrainer"]
