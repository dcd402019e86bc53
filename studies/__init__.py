"""Studies: multi-run experiments on the embedded default (ablations, tuning grids, the staleness sweep,
the critic's quality), each run recorded in ``studies/records/`` and compared across seeds. Run from the
repository root as ``python -m studies.ablation`` (``tune``, ``staleness``, ``critic_quality``).
``bench/`` holds the benchmarks; ``studies.runs`` (launch a run, read its rows) is shared with them."""
