"""A search: an Optuna sampler picks the points, a pruner stops the hopeless ones early.

`bin/sweep --search=tpe|random|cmaes|grid --trials=N --pruner=asha|hyperband|median|none`:
the spec's axes and random knobs become Optuna's search space (an axis: a categorical over its
values; uniform/log_uniform: a float range; choice: a categorical). Each trial is a point run
as a grid's are: a bin/train process in ROOT/<point name>, started and watched by
runner.Driver, its state in sweep_state.json. While it trains, each validation loss it writes
to eval.jsonl is reported to the trial; when the pruner says so the run gets SIGTERM (bin/train
saves a checkpoint and stops) and the trial is marked pruned at that step.

The study lives in a database (ROOT/study.db, or --storage=postgresql://...) that any number
of drivers share: each takes a shared lock of ROOT, the database hands out the trials. A
driver beats a heartbeat per running trial; a trial whose driver died stops beating, and the
next driver to look fails it and enqueues its point again, which bin/train resumes from its
checkpoint. A point two trials pick (a sampler may repeat itself) runs once: the later trial
copies the earlier one's result or, while the earlier one is still to finish, is dropped
(failed, not counted).
"""
import contextlib
import dataclasses
import json
import logging as std_logging
import math
import os
import signal
import socket
import time
import warnings

from gptneo.errors import UserError
from gptneo.sweep import metrics
from gptneo.sweep import report as report_lib
from gptneo.sweep import root as root_lib
from gptneo.sweep import runner
from gptneo.sweep import spec as spec_lib

STUDY_DB = "study.db"  # the default storage: SQLite in the root
HISTORY_PNG, IMPORTANCES_PNG = "optimization_history.png", "param_importances.png"
_DROPPED_HOLD_SECONDS = 5.0  # after dropping a repeated point, before asking again


@dataclasses.dataclass(frozen=True)
class Param:
  """One Optuna parameter: an axis (its values as choices) or a random knob (a range).

  Attributes:
    axis: the spec_lib.Axis it sets (a random knob: an axis of its one name).
    texts: an axis's values (gin text tuples); None for a float range.
    choices: what Optuna sees for each of `texts` (numbers where the value is one).
    distribution: the optuna distribution.
  """
  axis: object
  texts: tuple
  choices: tuple
  distribution: object

  @property
  def name(self):
    return ",".join(self.axis.names)

  def value(self, chosen):
    """The gin text tuple of the value Optuna chose."""
    if self.texts is not None:
      return self.texts[self.choices.index(chosen)]
    return (spec_lib.gin_utils.gin_literal(float(f"{chosen:.3g}")),)  # as RandomKnob.draw


def _choice(texts):
  """A value as Optuna's categorical holds it: a number stays one (plots, importances)."""
  if len(texts) == 1:
    value = spec_lib.parse_value(texts[0], "value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return value
  return " | ".join(texts)


def space(spec) -> list:
  """The spec's search space as Params, in axis order; refuses what its sampler can't take.

  Args:
    spec: a spec_lib.Spec with a search.
  """
  from optuna import distributions  # pylint: disable=g-import-not-at-top
  params = []
  for axis in spec.axes:
    choices = tuple(_choice(v) for v in axis.values)
    params.append(Param(axis, axis.values, choices, distributions.CategoricalDistribution(choices)))
  for knob in spec.random:
    axis = spec_lib.Axis((knob.name,), ())
    args = [spec_lib.parse_value(a, knob.name) for a in knob.args]
    if knob.distribution == "choice":
      texts = tuple((a,) for a in knob.args)
      choices = tuple(_choice(t) for t in texts)
      params.append(Param(axis, texts, choices, distributions.CategoricalDistribution(choices)))
    else:
      params.append(Param(axis, None, None, distributions.FloatDistribution(
          float(args[0]), float(args[1]), log=knob.distribution == "log_uniform")))
  if not params:
    raise UserError(f"search {spec.search} has nothing to search; add an axis or a random knob")
  for param in params:
    _check_sampler(spec.search, param)
  return params


def _check_sampler(sampler, param):
  if sampler == "grid" and param.texts is None:
    raise UserError(f"search grid can't take {param.name} (a range: it has no grid of "
                    f"values); use --search=tpe or random, or make it an axis")
  if sampler == "cmaes" and param.texts is not None:
    raise UserError(f"search cmaes samples numbers from ranges, but {param.name} is a list of "
                    f"values; use --search=tpe, or make it 'random NAME = uniform(LOW, HIGH)'")


def grid_size(params):
  return math.prod(len(p.texts) for p in params if p.texts is not None)


def point(spec, params, chosen, index):
  """The point a trial's chosen values (by Optuna param name) make, indexed by its number."""
  return spec_lib.point_of(spec, [(p.axis, p.value(chosen[p.name])) for p in params], index)


def first_point(spec, params):
  """A point of the space (each axis's first value, each range's low end): the one checked,
  as bin/train would, before anything is created."""
  chosen = {p.name: p.choices[0] if p.texts is not None else p.distribution.low
            for p in params}
  return point(spec, params, chosen, 0)


def sampler(spec, params):
  """The Optuna sampler --search names, seeded by random_seed."""
  import optuna  # pylint: disable=g-import-not-at-top
  samplers = optuna.samplers
  if spec.search == "grid":

    class Grid(samplers.GridSampler):
      def after_trial(self, *args):
        """Not Study.stop() once the grid is visited (it works inside Study.optimize only):
        our driver counts the trials itself."""

    return Grid({p.name: list(p.choices) for p in params}, seed=spec.random_seed)
  make = {"random": samplers.RandomSampler, "tpe": samplers.TPESampler,
          "cmaes": samplers.CmaEsSampler}[spec.search]
  return make(seed=spec.random_seed)


def pruner(spec, facts):
  """The Optuna pruner --pruner names; rungs start at the first evaluation.

  Args:
    spec: the spec.
    facts: root_lib.Facts of a point (its eval_every_n_steps and train_steps).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  pruners, first = optuna.pruners, max(1, facts.eval_every_n_steps)
  if spec.pruner == "none":
    return pruners.NopPruner()
  if not facts.eval_every_n_steps:
    raise UserError(f"pruner {spec.pruner} needs the validation loss while a point trains; set "
                    f"train.eval_every_n_steps (a divisor of train.train_steps)")
  if spec.pruner == "asha":
    return pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
  if spec.pruner == "hyperband":
    return pruners.HyperbandPruner(min_resource=first, max_resource=facts.train_steps,
                                   reduction_factor=3)
  return pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def default_storage(root):
  return f"sqlite:///{root.path / STUDY_DB}"


def _shown(url):
  """The URL as messages show it: without its password."""
  try:
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top
    return make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except  (a URL too broken to parse: show its scheme)
    return url.split("://", 1)[0] + "://..."


def _take_up(study, stale):
  """A trial whose driver died: its point is enqueued again (bin/train resumes it)."""
  study.enqueue_trial(stale.params, user_attrs={**stale.user_attrs, "takes_up": stale.number})


def open_storage(url, stale_seconds):
  """The study database at `url`, with heartbeats; UserError if it doesn't open.

  Args:
    url: an SQLAlchemy URL (sqlite:///PATH, postgresql://USER@HOST/DB).
    stale_seconds: a running trial whose heartbeat is older is taken up by another driver.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  import sqlalchemy.exc  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  std_logging.getLogger("alembic").setLevel(std_logging.WARNING)
  # Fail fast on a server that doesn't answer; wait out another driver's SQLite write lock.
  connect = ({"connect_timeout": 10} if url.startswith("postgresql") else
             {"timeout": 60} if url.startswith("sqlite") else {})
  try:
    with _quiet_warnings():
      return _storage_class()(
          url, engine_kwargs={"connect_args": connect},
          heartbeat_interval=max(1, stale_seconds // 4), grace_period=stale_seconds,
          heartbeat_stale_trial_callback=_take_up)
  except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as error:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    raise UserError(f"--storage={_shown(url)} does not open ({reason}); give a database URL "
                    f"that connects, e.g. sqlite:///PATH or postgresql://USER@HOST/DB") from None


def _storage_class():
  """Optuna's RDBStorage, whose stale trials also include a RUNNING trial never beaten.

  A driver asks for a trial, then beats its heartbeat; killed between the two, it leaves a
  trial Optuna never calls stale (it counts only trials with a heartbeat), which every other
  driver would wait for. Such a trial, started longer than the grace period ago, is stale.
  """
  import datetime  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top
  from optuna.storages._rdb import models  # pylint: disable=g-import-not-at-top

  class Storage(optuna.storages.RDBStorage):

    def _get_stale_trial_ids(self, study_id):
      stale = super()._get_stale_trial_ids(study_id)
      since = (datetime.datetime.now(datetime.timezone.utc)
               - datetime.timedelta(seconds=self.grace_period))
      session = self.scoped_session()
      try:
        never_beaten = [trial.trial_id for trial in (
            session.query(models.TrialModel)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
            .filter(~models.TrialModel.heartbeats.any()).all())
                        if trial.datetime_start.astimezone(datetime.timezone.utc) < since]
      finally:
        self.scoped_session.remove()
      return stale + never_beaten

  return Storage


@contextlib.contextmanager
def _quiet_warnings():
  """Optuna's warnings on heartbeats (experimental; meant for Study.optimize, whose loop our
  driver replaces: it beats them itself), which we use on purpose, unsaid."""
  import optuna  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    yield


def open_study(spec, params, facts, root, storage, update=False):
  """The study of this sweep (named after the root), created or loaded; refuses one made
  from another sweep unless `update`.

  Args:
    spec, params, facts: the spec, its space and the checked first point's facts.
    root: the root_lib.Root.
    storage: an open storage (open_storage).
    update: make a study of another sweep this one.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  study = optuna.create_study(
      storage=storage, study_name=root.name, sampler=sampler(spec, params),
      pruner=pruner(spec, facts), direction=spec_lib.OBJECTIVES[spec.objective],
      load_if_exists=True)
  recorded = study.user_attrs.get("spec")
  if recorded is not None and recorded != spec.to_json() and not update:
    field = next((k for k, v in spec.to_json().items() if recorded.get(k) != v), "spec")
    raise UserError(f"the study {root.name!r} in {_shown(storage.url)} was made from another "
                    f"sweep (its {field} differ); use another --storage or --root, or --update "
                    f"to make it this sweep")
  if recorded != spec.to_json():
    study.set_user_attr("spec", spec.to_json())
  return study


@dataclasses.dataclass
class _Trial:
  """A trial this driver runs: the Optuna trial, the last step reported, the prune step."""
  trial: object
  resume: bool  # a pruned point taken up again (--resume_pruned): never pruned again
  reported: int = -1
  pruned_step: int = None
  beat: float = 0.0


def _counted(trial):
  """A trial that counts towards --trials: not a pruned point's continuation."""
  return "resumes" not in trial.user_attrs


class SearchDriver(runner.Driver):
  """Asks the study for trials and runs them, `parallel` at once, until --trials are finished.

  Args:
    root: the sweep's root_lib.Root (its shared lock held).
    spec, params: the spec and its space (`space`).
    study: the open study (open_study).
    facts: the checked first point's root_lib.Facts (its device needs).
    parallel, max_retries, log, poll_seconds: as runner.Driver.
  """

  def __init__(self, root, spec, params, study, facts, parallel, max_retries, log,
               poll_seconds=0.5):
    # The slots' GPUs are sized by the first point's; the points come with the trials.
    super().__init__(root, [], [facts], parallel, max_retries, log, poll_seconds)
    self.facts = []
    self.spec, self.params, self.study = spec, params, study
    self.distributions = {p.name: p.distribution for p in params}
    self.target = spec.trials or grid_size(params)
    self.trials = {}  # point name: _Trial
    self.hold_until = 0.0

  def resume_pruned(self):
    """Enqueues every pruned point not taken up yet, to run on without pruning."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
    trials = self.study.get_trials(deepcopy=False)
    resumed = {t.user_attrs.get("resumes") for t in trials}
    names = set()
    for trial in trials:
      name = trial.user_attrs.get("point")
      if (trial.state == TrialState.PRUNED and trial.number not in resumed and name not in names
          and "copy_of" not in trial.user_attrs):
        names.add(name)
        self.study.enqueue_trial(trial.params, user_attrs={"point": name,
                                                           "resumes": trial.number})
    self.log(f"{len(names)} pruned point(s) to take up again")

  def run(self):
    """Returns {trial state: count} over the study's trials once --trials are finished."""
    import collections  # pylint: disable=g-import-not-at-top
    import optuna  # pylint: disable=g-import-not-at-top
    queue = collections.deque()  # points whose bin/train failed, to run again
    self.log(f"search {self.spec.search}, pruner {self.spec.pruner}: {self.target} trials, "
             f"{len(self.cores)} at once")
    try:
      while True:
        with _quiet_warnings():
          optuna.storages.fail_stale_trials(self.study)
        self._fill_trials(queue)
        if not self.running and not queue and self._finished():
          break
        time.sleep(self.poll_seconds)
        for slot in list(self.running):
          self._look(slot, queue)
    finally:
      self._stop_all()
    return collections.Counter(t.state.name.lower() for t in self.study.get_trials())

  def _states(self):
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
    trials = self.study.get_trials(deepcopy=False)
    counted = [t for t in trials if _counted(t)]
    return (sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted),
            sum(t.state == TrialState.RUNNING for t in counted),
            any(t.state == TrialState.WAITING for t in trials),
            any(t.state == TrialState.RUNNING for t in trials))

  def _finished(self):
    finished, _, waiting, running = self._states()
    return finished >= self.target and not waiting and not running

  def _fill_trials(self, queue):
    for slot in range(len(self.cores)):
      while slot not in self.running:
        if queue:
          self._start(slot, queue.popleft())
          continue
        finished, running, waiting, _ = self._states()
        if time.time() < self.hold_until or not (waiting or finished + running < self.target):
          return
        with _quiet_warnings():
          trial = self.study.ask(self.distributions)
        self._beat(trial)  # at once: a trial never beaten is never found stale
        self._begin(slot, trial)

  def _begin(self, slot, trial):
    """Runs the trial's point on `slot`, or settles it at once (a repeat, a refused point)."""
    resume = "resumes" in trial.user_attrs
    this = point(self.spec, self.params, trial.params, trial.number)
    trial.set_user_attr("point", this.name)
    trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
    if self._settled_as_repeat(trial, this, resume):
      return
    # Here, not at the top: a search root's --report (plots) loads this module and must not
    # load the training stack (validate imports gptneo.train).
    from gptneo.sweep import validate  # pylint: disable=g-import-not-at-top
    try:
      facts = validate.check(this)
    except UserError as error:
      trial.set_user_attr("error", str(error))
      self.study.tell(trial, state=_state("FAIL"))
      self.log(f"trial {trial.number}: refused: {error}")
      return
    self._add(this, facts, trial)
    self.trials[this.name] = _Trial(trial, resume)
    self._start(slot, len(self.points) - 1)

  def _settled_as_repeat(self, trial, this, resume):
    """A point an earlier trial has: copy its result, or drop this trial while it runs."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
    same = [t for t in self.study.get_trials(deepcopy=False)
            if t.user_attrs.get("point") == this.name and t.number != trial.number]
    ahead = [t for t in same if t.number < trial.number
             and t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if ahead:
      trial.set_user_attr("duplicate_of", ahead[0].number)
      self.study.tell(trial, state=TrialState.FAIL)
      self.hold_until = time.time() + _DROPPED_HOLD_SECONDS
      return True
    done = [t for t in same if t.state == TrialState.COMPLETE
            or (t.state == TrialState.PRUNED and not resume)]
    if not done:
      return False
    earlier = done[-1]
    trial.set_user_attr("copy_of", earlier.number)
    for step, value in sorted(earlier.intermediate_values.items()):
      trial.report(value, step)
    if earlier.state == TrialState.COMPLETE:
      self.study.tell(trial, earlier.value)
    else:
      self.study.tell(trial, state=TrialState.PRUNED)
    self.log(f"trial {trial.number}: {this.name} again, as trial {earlier.number} "
             f"({earlier.state.name.lower()}): its result copied")
    return True

  def _add(self, this, facts, trial):
    """The point joins the root: its run dir, point.gin and trial.json (its first trial's)."""
    run_dir = self.root.run_dir(this)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / root_lib.TRIAL_JSON).is_file():
      root_lib.write_json(run_dir / root_lib.TRIAL_JSON,
                          {"point": this.to_json(), "facts": dataclasses.asdict(facts)})
      (run_dir / root_lib.POINT_GIN).write_text(root_lib.point_gin(this, self.root, run_dir))
    state = self.root.state(this)
    if state["status"] == "running":  # its driver died: that attempt ended at its last beat
      last = state["attempts"][-1]
      last.update(end=state.get("heartbeat", last["start"]), outcome="interrupted")
    state["trials"] = [*state.get("trials", []), trial.number]
    state.pop("pruned_step", None)
    self.root.write_state(this, {**state, "status": "pending"})
    self.points.append(this)
    self.facts.append(facts)

  def _look(self, slot, queue):
    attempt, now = self.running[slot], time.time()
    run = self.trials[attempt.point.name]
    if now - run.beat >= self.study._storage.get_heartbeat_interval():  # pylint: disable=protected-access
      run.beat = now
      self._beat(run.trial)
    if run.pruned_step is None and attempt.process.poll() is None:
      self._report(attempt, run)
    super()._look(slot, queue)

  def _beat(self, trial):
    """The trial's heartbeat: its driver is alive (Study.optimize's thread does this there)."""
    self.study._storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access

  def _report(self, attempt, run):
    """Reports the run's new validation losses; stops it (SIGTERM) if the pruner says so."""
    new = [e for e in metrics.validation(self.root.live_dir(attempt.point))
           if e["step"] > run.reported and isinstance(e.get("loss"), (int, float))
           and math.isfinite(e["loss"])]
    if not new:
      return
    for record in new:
      run.trial.report(record["loss"], record["step"])
    run.reported = new[-1]["step"]
    if not run.resume and run.reported < attempt.facts.train_steps and run.trial.should_prune():
      run.pruned_step = run.reported
      attempt.process.send_signal(signal.SIGTERM)  # bin/train saves a checkpoint and stops
      self.log(f"{attempt.point.name}: pruned at step {run.reported} (validation loss "
               f"{new[-1]['loss']:.4f}); stopping it")

  def _finish(self, attempt, exit_code, queue):
    run = self.trials[attempt.point.name]
    if run.pruned_step is not None:
      attempt.log.close()
      state = self.root.state(attempt.point)
      state["attempts"][-1].update(end=time.time(), exit_code=exit_code, outcome="pruned")
      self.root.write_state(attempt.point, {**state, "status": "pruned",
                                            "pruned_step": run.pruned_step})
      self._tell(run, state="PRUNED")
      return
    super()._finish(attempt, exit_code, queue)
    status = self.root.state(attempt.point)["status"]
    if status == "done":
      row = report_lib.row(self.root, attempt.point, attempt.facts)
      value = row[self.spec.objective]
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tell(run, value=float(value))
      else:
        self._tell(run, state="FAIL", why=f"no {self.spec.objective}")
    elif status == "diverged":  # worse than any finished point: the sampler learns from it
      self._tell(run, state="PRUNED", why="diverged")
    elif status == "failed":
      self._tell(run, state="FAIL", why="failed")

  def _tell(self, run, value=None, state=None, why=None):
    import optuna  # pylint: disable=g-import-not-at-top
    try:
      if why:
        run.trial.set_user_attr("outcome", why)
      if state:
        self.study.tell(run.trial, state=_state(state))
      else:
        self.study.tell(run.trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:
      self.log(f"trial {run.trial.number}: already finished by another driver (its heartbeat "
               f"stopped for longer than --stale_seconds)")


def _state(name):
  from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
  return TrialState[name]


@contextlib.contextmanager
def loaded_study(root, record):
  """The study of a search's sweep.json record, read-only use (the report); its database
  connections closed at the end."""
  import optuna  # pylint: disable=g-import-not-at-top
  storage = open_storage(record["storage"], record.get("stale_seconds", 60))
  try:
    yield optuna.load_study(study_name=root.name, storage=storage)
  finally:
    storage.engine.dispose()


def plots(root, record):
  """Optuna's optimization history and parameter importances, beside loss.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as optuna_plots  # pylint: disable=g-import-not-at-top
  drawn = []
  with loaded_study(root, record) as study:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    for name, draw, needs in ((HISTORY_PNG, optuna_plots.plot_optimization_history, 1),
                              (IMPORTANCES_PNG, optuna_plots.plot_param_importances, 2)):
      if len(complete) < needs or (name == IMPORTANCES_PNG and not _varied(complete)):
        continue
      with _quiet_warnings():
        axes = draw(study)
      axes.figure.set_size_inches(8, 5)
      axes.figure.tight_layout()
      axes.figure.savefig(root.path / name, dpi=110)
      plt.close(axes.figure)
      drawn.append(name)
  return drawn


def _varied(trials):
  """Whether some parameter takes two values among the trials (importances need one)."""
  return any(len({json.dumps(t.params.get(name)) for t in trials}) > 1
             for name in trials[0].params)
