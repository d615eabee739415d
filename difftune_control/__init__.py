"""difftune-control: ControlNet training for Stable Diffusion with Diff-Tuning.

Data flows one way: dataset + extractor -> (bank) -> trainer (+ detector) -> run folder -> report / export.
"""

__version__ = "0.1.0"
