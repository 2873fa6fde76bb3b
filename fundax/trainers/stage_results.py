"""The main job's stage results: one frozen dataclass per stage, stored in stages/<name>.json.

A stage of `fundax.trainers.main_job` returns its result (or `Unfinished`); the job writes the
result's `to_json()` under "outputs" in `<workdir>/stages/<name>.json`, and a rerun reads it back
with `from_json` instead of running the stage again. Fields hold JSON values only (paths as str,
numbers, lists, dicts keyed by str), and a result built from a trainer's outputs goes through
the same JSON form, so a later stage sees equal results whether the stages before it ran now or
in an earlier run. `Results` holds them by stage, for later stages to read as typed fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any, TypeVar

R = TypeVar("R", bound="StageResult")

# A field that summary.json shows among the job's key metrics (the others are paths and details).
_figure = functools.partial(dataclasses.field, metadata={"figure": True})


@dataclasses.dataclass(frozen=True)
class StageResult:
  """What a finished stage hands the stages after it; the base of every stage's result."""

  def to_json(self) -> dict[str, Any]:
    """The fields as JSON values, as stages/<name>.json stores them."""
    return _jsonable(dataclasses.asdict(self))

  @classmethod
  def from_json(cls: type[R], record: Any) -> R:
    """The result whose `to_json()` is `record`.

    Raises:
      ValueError: `record` is not a mapping of this result's fields (one is missing or unknown).
    """
    if not isinstance(record, Mapping):
      raise ValueError(f"a {cls.__name__} is a JSON object, got {type(record).__name__}")
    try:
      return cls(**record)
    except TypeError as e:  # a missing or unknown field
      raise ValueError(f"not a {cls.__name__}: {e}") from e

  @classmethod
  def from_outputs(cls: type[R], outputs: Mapping[str, Any], **extra: Any) -> R:
    """The result from a job's outputs mapping (keys that are not fields are dropped).

    Args:
      outputs: what a trainer or job returned (paths, metrics, ...).
      **extra: fields not in `outputs` (or replacing its value).

    Raises:
      ValueError: a field is in neither.
    """
    given = {**outputs, **extra}
    names = [f.name for f in dataclasses.fields(cls)]
    return cls.from_json(_jsonable({n: given[n] for n in names if n in given}))

  def figures(self) -> dict[str, Any]:
    """The fields summary.json shows (those declared with `_figure()`), in field order."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.metadata.get("figure")}


def _jsonable(value: Any) -> Any:
  """`value` as JSON would give it back: tuples as lists, numpy scalars as Python floats."""
  return json.loads(json.dumps(value, default=float))


@dataclasses.dataclass(frozen=True)
class Unfinished:
  """A stage that stopped before its end (SIGTERM, or a trainer's `stop_at_step`).

  The job does not mark it finished and runs nothing after it, so no later stage builds on a
  half-trained model; rerunning the same command resumes it from its checkpoints.

  Attributes:
    reason: what stopped it, for the log and summary.json.
    preempted: the signal's name when a signal stopped it ("" otherwise): the CLI exits with
      the preemption code.
  """
  reason: str
  preempted: str = ""

  @classmethod
  def of(cls, outputs: Mapping[str, Any]) -> Unfinished | None:
    """The stop a trainer's outputs report under "unfinished" (None: it ran to its end)."""
    if "unfinished" not in outputs:
      return None
    return cls(outputs["unfinished"], outputs.get("preempted", ""))


@dataclasses.dataclass(frozen=True)
class DataResult(StageResult):
  """The data stage: the built dataset, its statistics and its preview grid."""
  dataset: str  # the dataset's TFDS data directory
  splits: dict[str, int]  # split -> examples
  stats: str  # data_stats.json: the build summary and per-split statistics
  preview: str  # preview.png


@dataclasses.dataclass(frozen=True)
class TrainResult(StageResult):
  """A trainer's finished run (the VAE and LDM stages) and its last logged metrics."""
  workdir: str
  checkpoints: str  # the checkpoints directory (what the next stage loads)
  metrics: str  # metrics.jsonl
  samples: str  # the trainer's sample grids
  eval: dict[str, float]  # the last "eval" record of metrics.jsonl ({} when none)
  # The last "train" record ({} when none, and in VAE stage files written before it was kept).
  train: dict[str, float] = dataclasses.field(default_factory=dict)
  nonfinite_steps: str = ""  # updates skipped on NaN/inf losses ("" when none)


@dataclasses.dataclass(frozen=True)
class GridsResult(StageResult):
  """The grids stage: one SYNTHETIC-stamped sample grid per DR grade and eye."""
  grids: dict[str, str]  # "dr<grade>_<eye>" -> PNG
  overview: str  # one sample per grade (columns) and eye (rows), PNG


@dataclasses.dataclass(frozen=True)
class EvaluatorResult(StageResult):
  """The independent evaluator the RLHF guard and the report judge with."""
  evaluator_dir: str  # its params directory (`fundax.eval.evaluator.load_evaluator`)
  metrics: str  # its training metrics.jsonl
  heldout: str  # heldout.json
  heldout_accuracy: dict[str, float]  # its held-out phantom scores
  reused: bool  # a finished run with the same config was reused rather than trained


@dataclasses.dataclass(frozen=True)
class SelectorResult(StageResult):
  """The Selector reward model and its acceptance threshold."""
  workdir: str  # what the RLHF rounds and the report load it from
  checkpoints: str
  metrics: str  # metrics.jsonl
  eval_report: str  # its held-out evaluation, JSON
  threshold: dict[str, float]  # the chosen threshold with its held-out precision and recall
  threshold_source: str  # the held-out set the threshold was chosen on
  heldout_auroc: float | None  # AUROC on that set (None when undefined)


@dataclasses.dataclass(frozen=True)
class RlhfResult(StageResult):
  """The RLHF rounds (`fundax.rl.rounds.run`): the kept model, the report's inputs, figures."""
  workdir: str
  best_checkpoint: str  # the kept round's LDM checkpoint (what the report samples)
  metrics: str  # metrics.jsonl
  report_html: str  # the rounds' own report
  report_json: str  # its history: each round's reward, composite and held-out metrics
  curves: str  # PNG: Selector reward and held-out composite per round
  curves_queries: str  # PNG: the same against cumulative Selector queries
  grid_before: str  # PNG: held-out prompts at round 0
  grid_after: str  # PNG: held-out prompts at the kept round
  stop_reason: str  # the reward-hacking guard's verdict ("" when it did not stop the rounds)
  accepted_fraction: list[float]  # share of candidates the Selector accepted, per round
  rounds_done: int = _figure()
  best_round: int = _figure()
  stopped: bool = _figure()  # the guard stopped the rounds early
  queries: int = _figure()  # Selector queries spent
  reward_before: float = _figure()  # Selector reward at round 0
  reward_after: float = _figure()  # ... at the last round
  composite_before: float = _figure()  # held-out composite at round 0
  composite_after: float = _figure()  # ... at the last round
  reward_kept: float = _figure()  # ... at the kept round
  composite_kept: float = _figure()
  heldout_before: dict[str, float] = _figure()  # held-out metrics at round 0
  heldout_after: dict[str, float] = _figure()
  heldout_kept: dict[str, float] = _figure()


@dataclasses.dataclass(frozen=True)
class ReportResult(StageResult):
  """The independent evaluation report of the kept model (`fundax.eval.run`)."""
  report: str  # report.html
  metrics_json: str  # metrics.json
  model: str  # the checkpoint sampled: the RLHF-kept model, else the LDM stage's
  samples: str  # the samples' PNG directory
  accepted_by_selector: float  # share of the samples the Selector accepts
  metrics: dict[str, dict[str, float]]  # metric -> generated / phantoms / control


@dataclasses.dataclass
class Results:
  """The results of the stages finished so far, by stage name (None: not finished)."""
  data: DataResult | None = None
  vae: TrainResult | None = None
  ldm: TrainResult | None = None
  grids: GridsResult | None = None
  evaluator: EvaluatorResult | None = None
  selector: SelectorResult | None = None
  rlhf: RlhfResult | None = None
  report: ReportResult | None = None
