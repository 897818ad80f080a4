"""`fleetrec tune`: hyperparameter sweeps with Ray Tune over the same `run(cfg)` as `fleetrec run`.

A search-space YAML (see tune_spaces/README.md) names a base experiment config, overrides,
the metric to optimize, the search algorithm, the scheduler and a `space` that maps dotted
config paths to distributions. It goes through the same loader as experiment configs, so a
bad key or value is one line naming its dotted path; every `space` path must exist in the
base config, and the end points of every distribution must build a valid config.

Each trial builds its config through the same loader, calls `run(cfg)` inside a placement
group sized from the base config's resources (trial + coordinator: 0 CPU; one bundle per
worker with cpus_per_worker / gpus_per_worker), and reports every round to Tune
(training_iteration = round + 1), so ASHA can stop bad trials early. MLflow gets one parent
run per sweep and one nested child run per trial; the parent gets the best trial, its config
(YAML) and plots at the end.

Modules: `tune_space.py` (the YAML schema and its checks), `tune_trial.py` (one trial),
`tune_report.py` (summary, plots, MLflow parent, terminal report); this one runs the sweep.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray.tune import Callback as TuneCallback

from fleetrec.simulator.config_loader import ConfigError, to_dict
from fleetrec.simulator.tune_report import SweepResult, summarize
from fleetrec.simulator.tune_space import SWEEP_STATE, AshaConfig, Sweep, check_searcher_installed, encode_value
from fleetrec.simulator.tune_trial import trial


# ------------------------------------------------------------------------------ the sweep
def _search_alg(sweep: Sweep):
    sc = sweep.cfg
    points = [{k: encode_value(v) for k, v in p.items()} for p in sc.points_to_evaluate or []] or None
    if sc.search_alg in ("random", "grid"):
        from ray.tune.search import BasicVariantGenerator
        return BasicVariantGenerator(random_state=sc.seed, max_concurrent=sc.max_concurrent_trials or 0,
                                     points_to_evaluate=points)
    check_searcher_installed(sc.search_alg, sweep.source)
    if sc.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        alg = OptunaSearch(metric=sc.metric, mode=sc.mode, seed=sc.seed, points_to_evaluate=points)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch
        alg = HyperOptSearch(metric=sc.metric, mode=sc.mode, random_state_seed=sc.seed, points_to_evaluate=points)
    if sc.max_concurrent_trials:
        from ray.tune.search import ConcurrencyLimiter
        alg = ConcurrencyLimiter(alg, max_concurrent=sc.max_concurrent_trials)
    return alg


def _scheduler(sweep: Sweep):
    s = sweep.cfg.scheduler
    if isinstance(s, AshaConfig):
        from ray.tune.schedulers import ASHAScheduler
        return ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or sweep.base_cfg.rounds,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                             stop_last_trials=False)   # trials that reach max_t end by themselves
    return None


def param_space(sweep: Sweep) -> dict:
    grid = sweep.cfg.search_alg == "grid"
    return {k: d.tune_domain(grid) for k, d in sweep.space.items()}


def trainable(sweep: Sweep, parent_run_id: str | None):
    from ray import tune
    fn = tune.with_parameters(trial, sweep=sweep, parent_run_id=parent_run_id, cwd=str(Path.cwd()))
    return tune.with_resources(fn, tune.PlacementGroupFactory(sweep.bundles()))


class TrialLines(TuneCallback):
    """The sweep's terminal output: one line when a trial starts, one per round it reports (the
    optimized metric and the trial's best so far) and one when it ends -- instead of Tune's
    tables and per-trial boxes, which are switched off (legacy output at verbosity 0)."""

    def __init__(self, sweep: Sweep, stream=None):
        self.metric, self.mode = sweep.cfg.metric, sweep.cfg.mode
        # (a grid multiplies num_samples by its size: no total then)
        self.total = "" if sweep.cfg.search_alg == "grid" else f"/{sweep.cfg.num_samples}"
        self.stream, self.t0 = stream, time.time()
        self.best: dict[str, tuple[float, int]] = {}
        self.index: dict[str, int] = {}

    def _line(self, trial, text: str) -> None:
        import sys
        from fleetrec.simulator.tune_space import to_python, trial_label
        k = self.index.setdefault(trial.trial_id, len(self.index) + 1)
        label = trial_label({n: to_python(v) for n, v in (trial.config or {}).items()}) or trial.trial_id
        print(f"[{time.time() - self.t0:6.0f}s] trial {k}{self.total} {label}: {text}",
              file=self.stream or sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value, rnd = result.get(self.metric), int(result.get("training_iteration", 0))
        if value is None or value != value:
            return
        best = self.best.get(trial.trial_id)
        if best is None or (value > best[0] if self.mode == "max" else value < best[0]):
            self.best[trial.trial_id] = best = (float(value), rnd)
        self._line(trial, f"round {rnd}  {self.metric} {value:.4f}  (best {best[0]:.4f} at round {best[1]})")

    def _ended(self, trial, how: str) -> None:
        best = self.best.get(trial.trial_id)
        self._line(trial, how + (f"; best {self.metric} {best[0]:.4f} at round {best[1]}" if best else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        rounds = int((trial.last_result or {}).get("training_iteration", 0))
        self._ended(trial, f"ended after {rounds} rounds")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "FAILED (see its error file under the sweep folder)")


def _parent_run(sweep: Sweep, resume: bool) -> str | None:
    if not sweep.base_cfg.tracking.mlflow:
        return None
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    state = sweep.exp_dir / SWEEP_STATE
    if resume and state.is_file():
        run_id = json.loads(state.read_text()).get("parent_run_id")
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
    exp = client.get_experiment_by_name(sweep.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(sweep.experiment)
    from fleetrec.simulator.tracking import mark_experiment
    mark_experiment(client, exp_id)               # the UI opens it on its runs
    run = client.create_run(exp_id, run_name=sweep.name, tags={"tune.sweep": sweep.name, "tune.parent": "true"})
    rid = run.info.run_id
    sc = sweep.cfg
    params = {"sweep.metric": sc.metric, "sweep.mode": sc.mode, "sweep.num_samples": sc.num_samples,
              "sweep.search_alg": sc.search_alg, "sweep.scheduler": json.dumps(to_dict(sc.scheduler)),
              "sweep.base": str(sweep.base_path), "sweep.overrides": json.dumps(list(sc.overrides)),
              "sweep.cli_overrides": json.dumps(list(sweep.cli_overrides)), "sweep.rounds": sweep.base_cfg.rounds,
              "sweep.bundles": json.dumps(sweep.bundles()), "sweep.max_failures": sc.max_failures,
              "sweep.storage_path": str(sweep.exp_dir)}
    params.update({f"space.{k}": json.dumps({d.kind(): list(getattr(d, d.kind()))})
                   for k, d in sweep.space.items()})
    for k, v in params.items():
        client.log_param(rid, k, str(v)[:500])
    client.log_artifact(rid, str(sweep.source))
    return rid


def tune_sweep(sweep: Sweep, resume: bool = False, verbose: int = 1) -> SweepResult:
    """Run (or resume) a sweep; returns the per-trial summary and the best trial."""
    import ray
    from ray import tune
    from fleetrec.simulator.run import ensure_ray
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")      # trials keep the driver's working dir
    # the legacy output engine honours verbosity 0 (the new one always prints a box per experiment);
    # TrialLines prints the progress instead
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ensure_ray(sweep.base_cfg)
    _check_fits(sweep, ray.cluster_resources())
    exp_dir = sweep.exp_dir
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume: no sweep to resume in {exp_dir}")
    elif exp_dir.exists():
        raise ConfigError(f"{exp_dir} already exists: pass --resume to continue that sweep, "
                          "or --name / storage_path for a new one")
    parent = _parent_run(sweep, resume)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SWEEP_STATE).write_text(json.dumps({"parent_run_id": parent, "source": str(sweep.source),
                                                   "started": time.time()}))
    fn = trainable(sweep, parent)
    _ENDED.clear()
    if resume:                         # trials that had ended before (a finished sweep never steps)
        _ENDED.update(t.trial_id for t in tune.ExperimentAnalysis(str(exp_dir)).trials
                      if t.status in ("TERMINATED", "ERROR"))
        tuner = tune.Tuner.restore(str(exp_dir), trainable=fn, resume_unfinished=True, restart_errored=True)
    else:
        sc = sweep.cfg
        tuner = tune.Tuner(
            fn, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(metric=sc.metric, mode=sc.mode, num_samples=sc.num_samples,
                                        search_alg=_search_alg(sweep), scheduler=_scheduler(sweep),
                                        max_concurrent_trials=sc.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.storage_path),
                                      callbacks=[EndedTrials()] + ([TrialLines(sweep)] if verbose else []),
                                      failure_config=tune.FailureConfig(max_failures=sc.max_failures),
                                      verbose=0))
    grid = tuner.fit()
    unfinished = len(grid) - len(_ENDED)
    if unfinished > 0:                 # interrupted (Ctrl-C): Tune saved its state; no summary yet
        if parent:
            from mlflow.tracking import MlflowClient
            MlflowClient(tracking_uri=sweep.tracking_uri).set_terminated(parent, "KILLED")
        raise SweepInterrupted(f"sweep {sweep.name} interrupted with {unfinished} of {len(grid)} trials "
                               f"unfinished; continue it with: fleetrec tune {sweep.source} --resume "
                               "(same overrides)")
    return summarize(sweep, grid, parent)


_ENDED: set[str] = set()              # trial ids that ended this sweep (filled by EndedTrials callbacks)


class EndedTrials(TuneCallback):
    """Records trials that ended (done, stopped by the scheduler, errored) rather than being cut
    off by Ctrl-C; on a restored sweep, those that had ended before count too (they are
    TERMINATED at the first step). A module-level class writing to a module-level set, so the
    copy that a restored sweep unpickles from its saved state records into the same set."""

    def on_step_begin(self, iteration, trials, **info):
        _ENDED.update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        _ENDED.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        _ENDED.add(trial.trial_id)


class SweepInterrupted(RuntimeError):
    """Ctrl-C during a sweep: the experiment state is saved under <storage_path>/<name>."""


def _check_fits(sweep: Sweep, cluster: dict) -> None:
    need: dict[str, float] = {}
    for b in sweep.bundles():
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    for k, v in need.items():
        if v > cluster.get(k, 0) + 1e-9:
            raise ConfigError(f"{sweep.source}: one trial needs {v:g} {k} (resources.workers x cpus_per_worker / "
                              f"gpus_per_worker of the base config) but the Ray cluster has {cluster.get(k, 0):g}")
