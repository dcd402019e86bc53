"""``python -m async_vapo.launch``: parse the command line, plan this node, supervise it (or --dry-run)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog
import yaml

from async_vapo.cluster import Layout, NodeInfo, layout, node_info
from async_vapo.cluster.placement import PlacementError
from async_vapo.config import Config, ConfigError, check_learner_split, load_config
from async_vapo.logging import LOG_DIR_ENV, configure_logging

log = structlog.get_logger("async_vapo.launch")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "embedded_default.yaml"
_DESCRIPTION = "Start and supervise this node's share of a run."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m async_vapo.launch",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML recipe from configs/ (default: the embedded default)")
    p.add_argument("--rollout-gpus", type=int, default=0, help="GPUs for vLLM engines, all nodes (0: CPU)")
    p.add_argument("--train-gpus", type=int, default=0, help="GPUs for learner ranks, all nodes (0: CPU)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per card, for --dry-run's estimate")
    p.add_argument("--learner-ranks", type=int, default=1, help="CPU only: learner ranks per node (gloo)")
    p.add_argument("--nnodes", type=int, help="nodes in the run (default: torchrun/Slurm env, else 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank (node 0 hosts learner rank 0)")
    p.add_argument("--master-addr", help="node 0's address (rendezvous store, learner sockets)")
    p.add_argument("--master-port", type=int, help="port of the rendezvous store on node 0")
    p.add_argument("--dry-run", action="store_true", help="print placement and memory estimate, then exit")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe + overrides), every field documented, then exit",
    )
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/latest")
    p.add_argument("--insecure", action="store_true", help="allow non-loopback sockets without CURVE keys")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.actor_lr=1e-5")
    return p.parse_intermixed_args(argv)  # flags and overrides in any order


def resolve_model(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    from async_vapo.tasks.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(progress=True))


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    # the environment's own tools (ninja, which DeepSpeed's JIT ops need) for every child, also when the
    # launcher is run as .venv/bin/python without the environment activated
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.insecure:
        overrides.append("insecure=true")
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        node = node_info(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        if args.dry_run and node.source == "single":  # plan for as many nodes as the GPUs need
            need = -(-(args.train_gpus + args.rollout_gpus) // args.gpus_per_node)
            node = NodeInfo(max(1, need), 0, node.master_addr, node.master_port, "dry-run")
        lay = layout(
            args.train_gpus,
            args.rollout_gpus,
            node.nnodes,
            args.gpus_per_node,
            cfg.rollout.tensor_parallel_size,
            args.learner_ranks,
            cfg.rollout.num_workers,
        )
        check_learner_split(cfg, lay.learner_world)
        if args.print_config:
            from async_vapo.config import describe

            print(describe(cfg), end="")
            return 0
    except (ConfigError, PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problem := preflight(cfg, args.dry_run):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, lay, args.gpu_memory_gb)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "config.yaml").write_text(
        yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
    )
    # one log file per process in <output_dir>/logs (children inherit the variable)
    os.environ[LOG_DIR_ENV] = str(Path(cfg.output_dir) / "logs")
    configure_logging(process=f"launcher-node{node.node_rank}")
    model_path = resolve_model(cfg)
    log.info("placement", node=node.node_rank, nnodes=node.nnodes, source=node.source, plan=lay.describe())
    from async_vapo.launch.supervisor import Supervisor

    return Supervisor(cfg, lay, node, model_path, args.resume, args.insecure).run()


def preflight(cfg: Config, dry_run: bool) -> str | None:
    """What would fail minutes into a run, checked before anything starts: the model directory holds a
    config and a tokenizer (a dry run may still size a model it cannot see, from its name, and says
    so), the verifiers load and the data files' first rows read and score (a dry run notes a data file
    it cannot read here: it may live on the cluster). None, or the problem."""
    path = Path(cfg.model.path) if cfg.model.path else None
    if path is not None:
        missing = [
            what
            for what, names in (
                ("config.json", ("config.json",)),
                ("a tokenizer", ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")),
            )
            if not any((path / n).exists() for n in names)
        ]
        if missing and dry_run:
            print(f"note: model.path {path} has no {' or '.join(missing)} here; sizing it from its name")
        elif missing:
            return (
                f"model.path {path} has no {' or '.join(missing)} (a Hugging Face model directory is needed)"
            )
    from async_vapo.config import verifier_names
    from async_vapo.rewards.pool import check_verifier

    for name in verifier_names(cfg):
        if (why := check_verifier(name, cfg.rollout.verifier_timeout_s + 60).error) is not None:
            field = "data.verifier" if cfg.data.verifier else "data.verifiers"
            return f"{field} {name!r} cannot be used: {why}"
    if (
        cfg.train.offload_optimizer
        and not dry_run
        and (why := cpu_adam_problem(cfg.train.op_build_timeout_s))
    ):
        return f"train.offload_optimizer needs DeepSpeed's CPU Adam, which cannot be built here: {why}"
    if cfg.data.task != "addition":
        return preflight_data(cfg, dry_run)
    return None


CPU_ADAM_BUILD = (
    "from deepspeed.ops.op_builder import CPUAdamBuilder\n"
    "from torch.utils.cpp_extension import _get_build_directory\n"
    "print(_get_build_directory(CPUAdamBuilder().name, verbose=False), flush=True)\n"
    "CPUAdamBuilder().load(verbose=False)\n"
)


def cpu_adam_problem(timeout_s: float) -> str | None:
    """Build (or find built) DeepSpeed's CPU Adam once, before the learner ranks would each try: it is
    compiled on first use (a C++ compiler and ninja; about a minute) and cached. The build runs in a child
    process given ``timeout_s`` (``train.op_build_timeout_s``): a build that does not finish, such as one
    waiting on the lock file of a build that was killed, is an error that names that file, not a wait
    without end. None, or why not."""
    cmd = [sys.executable, "-c", CPU_ADAM_BUILD]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        where = out.strip().splitlines()[0] if out.strip() else "the torch extensions directory"
        return (
            f"the build did not finish within train.op_build_timeout_s={timeout_s:g} s (a lock file left by a"
            f" killed build blocks it: remove {where}/lock if no other build is running)"
        )
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        return f"{tail[-300:]} (it needs a C++ compiler, Python headers and ninja)"
    return None


PREFLIGHT_ROWS = 4  # rows of each data file read and scored before a run starts


def preflight_data(cfg: Config, dry_run: bool = False) -> str | None:
    """The first rows of the training and held-out files, read through the real loader (fields, template,
    extras), and the training rows' answers scored by every verifier as if they were responses: a
    verifier whose call raises, hangs or returns something outside the interface (a keyword it needs
    and is not given, say) stops the launch instead of giving every sample the wrong reward."""
    d = cfg.data
    sources = [(d.train_file, d.train_split, d.prompt_template, d.prompt_field, d.answer_field)]
    if d.eval_file:
        sources.append(
            (
                d.eval_file,
                d.eval_split,
                d.eval_prompt_template or d.prompt_template,
                d.eval_prompt_field or d.prompt_field,
                d.eval_answer_field or d.answer_field,
            )
        )
    items: list[tuple[str, str, dict[str, Any]]] = []
    for source in sources:
        problem = _preflight_rows(cfg, *source, dry_run, items if source[0] == d.train_file else [])
        if problem is not None:
            return problem
    return _preflight_scores(cfg, items)


def _preflight_rows(
    cfg: Config,
    path: str,
    split: str,
    template: str,
    prompt_field: str,
    answer_field: str,
    dry_run: bool,
    items: list[tuple[str, str, dict[str, Any]]],
) -> str | None:
    """Read one data file's first rows and fill the template with each; each row's (answer, answer,
    verifier context) is appended to ``items``. None, or the problem."""
    from async_vapo.tasks.datasets import DatasetError, _get, read_rows, row_extras

    try:
        rows = read_rows(path, split)[:PREFLIGHT_ROWS]
    except (DatasetError, OSError) as exc:
        if dry_run:
            print(f"note: data file {path} cannot be read here; not checked ({exc})")
            return None
        return f"data file {path}: {exc}"
    for i, row in enumerate(rows):
        answer, problem = _get(row, answer_field), _get(row, prompt_field)
        if answer is None or problem is None:
            missing = answer_field if answer is None else prompt_field
            return f"{path}: row {i} has no field {missing!r} (data.*_field)"
        try:
            text = problem if isinstance(problem, list) else template.format(**{**row, "problem": problem})
        except (KeyError, IndexError, ValueError) as exc:
            return f"{path}: row {i}: the prompt template cannot be filled ({type(exc).__name__}: {exc})"
        context = {"prompt": str(text)} | json.loads(row_extras(row, tuple(cfg.data.extra_fields)) or "{}")
        items.append((str(answer), str(answer), context))
    return None


def _preflight_scores(cfg: Config, items: list[tuple[str, str, dict[str, Any]]]) -> str | None:
    """Every verifier scores the training rows' answers given as responses. None, or the problem."""
    from async_vapo.config import verifier_names
    from async_vapo.rewards.pool import VerifierPool

    names = verifier_names(cfg)
    if not names or not items:
        return None
    r = cfg.rollout
    pool = VerifierPool(1, r.verifier_timeout_s, correct_reward=r.correct_reward, wrong_reward=r.wrong_reward)
    try:
        for name in names:
            for i, (response, answer, context) in enumerate(items):
                v = pool.score_one(name, response, answer, context)
                if v.detail.startswith(("error", "timeout", "bad_output")):
                    return (
                        f"verifier {name!r} fails on row {i} of {cfg.data.train_file} (its answer given as "
                        f"the response): {v.detail}"
                    )
    finally:
        pool.close()
    return None


def dry_run(cfg: Config, lay: Layout, card_gib: float) -> int:
    """Print the placement and the per-GPU memory estimate; exit 2 if the layout cannot work."""
    from async_vapo.cluster import estimate_memory, model_shape

    print(lay.describe())
    path = cfg.model.path
    if not path:
        from async_vapo.tasks.tiny_model import tiny_model_dir

        path = str(tiny_model_dir())
    try:
        shape = model_shape(path)
    except ValueError as exc:
        print(f"memory: {exc}")
        return 0
    if not lay.on_gpu:
        card_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kv_cpu = None if lay.on_gpu else float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    plan = estimate_memory(shape, cfg, lay.learner_world, card_gib, None if lay.on_gpu else 1, kv_cpu)
    print(f"model {path}: {shape.params / 1e6:,.1f} M parameters, {shape.layers} layers")
    print(plan.describe(card_gib, "GPU" if lay.on_gpu else "process (host memory)"))
    return 2 if plan.problems and lay.on_gpu else 0
