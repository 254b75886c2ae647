"""The comparison study of perception coherence against the baselines (``docs/study.md``):
:mod:`.protocol` (config, runs, the plan), :mod:`.execute` (read back or train),
:mod:`.report` (tables, verdicts, figures), :mod:`.cli` (``python benchmarks/compare_losses.py``).
"""
