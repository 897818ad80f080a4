"""One Tune trial: the config built from the sampled values through the same loader, `run(cfg)`,
and every round reported to Tune and tagged in MLflow as a nested child of the sweep's run."""
from __future__ import annotations

import json
import os
from pathlib import Path


from fleetrec.simulator.config import from_dict
from fleetrec.simulator.run import Callback
from fleetrec.simulator.tune_space import Sweep, set_dotted, to_python, trial_label


# ------------------------------------------------------------------------------ the trial
class TuneReport(Callback):
    """Reports every round record to Tune (training_iteration = round + 1); rounds without evaluation
    repeat the last metric, and those before the first evaluation (eval.every > 1) report NaN, which
    Tune requires to be present and ASHA, the trial lines and the summary skip."""

    def __init__(self, metric: str):
        self.metric = metric
        self.last = None

    def on_start(self, cfg, info: dict) -> None:
        self.rounds = cfg.rounds

    def on_round(self, record: dict) -> None:
        from ray import tune
        out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.metric in out:
            self.last = out[self.metric]
        else:
            out[self.metric] = self.last if self.last is not None else float("nan")
        out["rounds"] = self.rounds
        tune.report(out)


class TrialTags(Callback):
    """Tags the trial's MLflow child run (it is the active run in this process)."""

    def __init__(self, values: dict, sweep: str):
        self.values, self.sweep = values, sweep

    def on_start(self, cfg, info: dict) -> None:
        import mlflow
        from ray import tune
        ctx = tune.get_context()
        mlflow.set_tags({"sweep": self.sweep, "tune.sweep": self.sweep, "tune.trial_id": ctx.get_trial_id(),
                         "tune.trial_name": ctx.get_trial_name(), "tune.sampled": json.dumps(self.values)})
        mlflow.log_params({f"sampled.{k}": str(v)[:500] for k, v in self.values.items()})


def trial(config: dict, sweep: Sweep, parent_run_id: str | None, cwd: str) -> None:
    """One Tune trial: build the config through the loader and call `run(cfg)`."""
    from ray import tune
    from fleetrec.simulator.run import run
    from fleetrec.simulator.tracking import MlflowLogger
    os.chdir(cwd)                                       # relative data paths as in the driver
    values = {k: to_python(v) for k, v in config.items()}
    name = tune.get_context().get_trial_name()
    data = sweep.trial_data(values)
    set_dotted(data, "tracking.run_name", trial_label(values) or name)    # the run says what was sampled
    ck = data.get("checkpoint") or {}
    if ck.get("every"):                                  # each trial checkpoints into a folder of its own
        set_dotted(data, "checkpoint.dir", str(Path(ck.get("dir", "checkpoints")) / name))
    cfg = from_dict(data, f"trial {name}")
    cbs: list[Callback] = []
    if cfg.tracking.mlflow:
        cbs += [MlflowLogger(cfg, parent_run_id=parent_run_id), TrialTags(values, sweep.name)]
    cbs.append(TuneReport(sweep.cfg.metric))
    run(cfg, cbs)
