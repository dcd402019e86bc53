"""Experiment-tracking sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases, switched by the
recipe's ``tracking`` section (both off by default; ``pip install -e .[tracking]`` installs them).

Every metrics row becomes scalars named ``<phase>/<key>`` (``train/reward_mean``, ``eval/eval_accuracy``,
``value_pretrain/value_loss``); nested counters one level deep become ``<phase>/<key>/<name>``. The x
axis is the row's ``step``. W&B runs offline by default (no network: ``wandb sync <dir>`` uploads later).
A sink that fails while the run goes on is logged once and switched off: tracking never stops training.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Protocol

import structlog

from async_vapo.config import Config, ConfigError

log = structlog.get_logger(__name__)


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    # optional: ``table(name, rows, step)`` for rows of text (logged samples); a sink without it skips them

    def close(self) -> None: ...


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row under ``<phase>/`` names (bools and non-finite values left out)."""
    phase = str(row.get("phase", "train"))
    out: dict[str, float] = {}

    def put(name: str, v: Any) -> None:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)

    for k, v in row.items():
        if k in ("phase", "step", "time"):
            continue
        if isinstance(v, dict):
            for sub, x in v.items():
                put(f"{phase}/{k}/{sub}", x)
        else:
            put(f"{phase}/{k}", v)
    return out


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        for r in rows:
            self.writer.add_text(f"{name}/{r.get('sample', 0)}", _as_markdown(r), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out_dir: Path, cfg: Config) -> None:
        import msgspec
        import wandb

        t = cfg.tracking
        # one W&B run per output directory: a resumed (or restarted) run continues it
        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=t.wandb_project,
            name=t.run_name or out_dir.name,
            dir=str(out_dir),
            mode=t.wandb_mode,
            config=msgspec.to_builtins(cfg),
            id=run_id,
            resume="allow",
        )
        # value pretraining has negative steps and W&B's own step must grow: plot against "step"
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        if not rows:
            return
        names = list(rows[0])
        data = [[str(r[c]) if isinstance(r.get(c), list) else r.get(c) for c in names] for r in rows]
        columns: list[str | int] = list(names)
        self.run.log({name: wandb.Table(columns=columns, data=data), "step": step})

    def close(self) -> None:
        self.run.finish()


def make_sinks(cfg: Config, out_dir: Path) -> list[Sink]:
    """The sinks ``cfg.tracking`` asks for; a clear error if one's package is missing."""
    t = cfg.tracking
    sinks: list[Sink] = []
    for on, name, make in (
        (t.tensorboard, "tensorboard", lambda: TensorBoardSink(out_dir / "tensorboard")),
        (t.wandb, "wandb", lambda: WandbSink(out_dir, cfg)),
    ):
        if not on:
            continue
        try:
            sinks.append(make())
        except ImportError as exc:
            raise ConfigError(
                f"tracking.{name} is on but {exc.name or name} is not installed (pip install -e '.[tracking]')"
            ) from None
    return sinks


class Fanout:
    """Forwards rows to every sink; a failing sink is reported once and dropped."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)

    def log(self, row: dict[str, Any]) -> None:
        scalars = scalars_of(row)
        if not scalars:
            return
        for s in list(self.sinks):
            try:
                s.log(scalars, int(row.get("step", 0)))
            except Exception as exc:
                log.error(
                    "a tracking sink failed; switching it off", sink=type(s).__name__, error=repr(exc)[:200]
                )
                self.sinks.remove(s)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of text to every sink that shows tables (W&B, TensorBoard's text tab)."""
        for s in list(self.sinks):
            if (table := getattr(s, "table", None)) is None:
                continue
            try:
                table(name, rows, step)
            except Exception as exc:
                log.error(
                    "a tracking sink failed; switching it off", sink=type(s).__name__, error=repr(exc)[:200]
                )
                self.sinks.remove(s)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:
                log.error("a tracking sink failed to close", sink=type(s).__name__, error=repr(exc)[:200])
        self.sinks = []


def _as_markdown(row: dict[str, Any]) -> str:
    head = ", ".join(f"{k}={row[k]}" for k in ("uid", "reward", "verdict", "versions") if k in row)
    prompt, response = (str(row.get(k, "")).replace("\n", "\n    ") for k in ("prompt", "response"))
    return f"{head}\n\n**prompt**\n\n    {prompt}\n\n**response**\n\n    {response}"
