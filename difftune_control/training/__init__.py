"""A training run from a config: models and data order (``runtime``), the run's pieces (``setup``), the
optimizer-step loop (``loop``), checkpoints, several processes (``distributed``) and the step-0 bank check
(``diagnostics``).

Import the modules themselves (``from difftune_control.training.setup import setup``); this package's
``__init__`` imports nothing, so loading one part never loads the others.
"""
