"""Where each iteration's row goes live, as the run goes: the console, the report (rewritten), TensorBoard
and W&B."""

from __future__ import annotations

import os
import uuid

from pipeline.metrics import TIMESTAMPS
from pipeline.report import write_report
from pipeline.rundir import RunDir


class Reporter:
    """What the driver calls after each iteration: console row, report rewrite, TensorBoard scalars."""

    def __init__(self, rundir: RunDir, cfg, console) -> None:
        self.rundir, self.console = rundir, console
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(rundir.root / "tensorboard"))
        self.wandb = _init_wandb(rundir, cfg, console) if cfg.wandb else None

    def iteration_done(self, row: dict) -> None:
        self.console.iteration_done(row)
        scalars = {
            k: v
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in TIMESTAMPS
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["iteration"])
        write_report(self.rundir.root)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(rundir: RunDir, cfg, console):
    """A W&B run in `OUTPUT_DIR/wandb/`, offline unless WANDB_MODE says otherwise; a resumed run keeps
    its W&B id (stored in `OUTPUT_DIR/wandb_id`), so `wandb sync` joins the pieces into one run."""
    try:
        import wandb
    except ImportError:
        console.log("wandb=true but wandb is not installed (pip install wandb); skipping W&B logging")
        return None
    id_file = rundir.root / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(
        dir=str(rundir.root),
        project=cfg.wandb_project,
        name=rundir.root.name,
        id=run_id,
        resume="allow",
        mode=os.environ.get("WANDB_MODE", "offline"),
        config=cfg.model_dump(mode="json"),
        settings=wandb.Settings(quiet=True),
    )
