"""``python -m async_vapo.launch``: start and supervise this node's share of a run.

    launcher (one per node; node 0 serves the run's rendezvous store)
      ├─ learner ranks of this node (DeepSpeed; rank 0 also runs the controller thread:
      │                              ZeroMQ sockets, buffer, prompt dispatch, weight sync)
      └─ rollout workers of this node (vLLM engine + verifier pool)

With no arguments it runs the embedded default on one node: the built-in addition task and the tiny model,
on CPU. On a cluster the same command runs on every node (``--nnodes/--node-rank/--master-addr`` or the
torchrun / Slurm environment); ``--dry-run`` prints the placement and a memory estimate and exits.

    cli.py         the command line, --dry-run
    plan.py        what this node runs, as data (pure: testable without a store or a process)
    supervisor.py  the run store, the processes, restarts and shutdown
"""

from async_vapo.launch.cli import DEFAULT_CONFIG, main, parse_args

__all__ = ["DEFAULT_CONFIG", "main", "parse_args"]
