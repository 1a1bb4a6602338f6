"""Where a training run stands: the typed state a checkpoint saves and a resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch done
    tokens: int = 0  # real tokens trained on (no padding)
    best_val: float | None = None  # validation loss of the best checkpoint
    best_metric: float | None = None  # its task metric, when eval.metric is one
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    last_eval_step: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0  # training time of the earlier sessions of a resumed run, to their last checkpoint
    mixed_precision: str | None = None  # what the run trains in (a resumed `auto` run keeps it)
    # the best evaluations, best first ({step, val_loss, metric}), whose weights best-ranked/ keeps
    ranked: list[dict] = field(default_factory=list)

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, eval_every: int | None = None) -> "LoopState":
        """A checkpoint's loop.json; keys it lacks (older checkpoints) keep their defaults, unknown ones are
        ignored."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        # from before last_eval_step was kept: take the evaluation then due as the last one
        if "last_eval_step" not in saved and eval_every:
            state.last_eval_step = state.step - state.step % eval_every
        return state
