"""A distillation run's configuration: one YAML file (configs/*.yaml) plus `section.key=value` overrides.

Sections: `teacher`, `plan`, `student`, `data` (grain DataConfig for training, plus optional `eval`),
`mesh`, `train` (TrainConfig), `loss` (LossConfig), `run` (directories, checkpoint/eval/log cadence), and
`presets`: named per-topology settings (`v5p-128: {mesh: {...}, train: {micro_batches: 8}}`) applied with
`--preset NAME` before the command-line overrides. Unknown keys are errors naming the key and the known ones,
so a typo never silently trains something else.

`load_run_config` parses all of it once into a typed `RunConfig` (sections as dataclasses: TrainConfig,
LossConfig, RunSettings, MeshConfig, DataSection); hyper-parameters are validated there, naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from boomerang_jax.data.pipeline import DataConfig
from boomerang_jax.distill.loss import LossConfig
from boomerang_jax.distill.optim import TrainConfig
from boomerang_jax.infra import storage
from boomerang_jax.infra.parallel import MeshConfig
from boomerang_jax.surgery.plan import LayerPlan


class RunConfigError(ValueError):
    """A run configuration with an unknown key, a bad value or a missing required setting."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where a run writes and how often it checkpoints, evaluates and logs."""

    dir: str = "runs/distill"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    export_student: bool = True  # write the final student as an HF dir (with its plan) under dir/student
    peak_tflops: float | None = None  # per device, bf16; None: guessed from the device kind (for MFU)
    progress: bool = True
    # A jax.profiler trace of steps FIRST..LAST (as metrics.jsonl numbers them) into dir/profile: "3,5", [3, 5]
    # or 4 (one step); None: no trace. Read it with TensorBoard's profile plugin or xprof.
    profile_steps: Any = None

    def __post_init__(self) -> None:
        self.profile_range()  # a bad value is an error at start-up, naming the key

    def profile_range(self) -> tuple[int, int] | None:
        """(first, last) step to trace, from `profile_steps`; None when not profiling."""
        value = self.profile_steps
        if value is None or value == "":
            return None
        parts = value if isinstance(value, (list, tuple)) else str(value).replace("-", ",").split(",")
        try:
            steps = [int(p) for p in parts]
        except (TypeError, ValueError):
            steps = []
        if len(steps) == 1:
            steps *= 2
        if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
            raise RunConfigError(f"run.profile_steps={value!r}: expected FIRST,LAST steps (1 <= FIRST <= LAST), "
                                 "e.g. 3,5, or one step, e.g. 4")
        return steps[0], steps[1]


DEFAULTS: dict[str, Any] = {
    "teacher": "smollm2-135m",
    "plan": {"every": 2, "first": 1, "last": 2},
    "student": None,  # None: prune the teacher with the plan; or an HF dir of a student (with its plan)
    "data": {"train": None, "eval": None},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "train": {},
    "loss": {},
    "run": {},
    "presets": {},
}
PRESET_SECTIONS = ("mesh", "train", "loss", "run", "data")


def _check_keys(section: str, given: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise RunConfigError(f"unknown {section} key(s) {unknown}; known: {sorted(known)}")


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _numbers(obj: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string; every number-looking string becomes an int or float."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    if isinstance(obj, str) and _NUMBER.match(obj.strip()):
        text = obj.strip()
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    return obj


def _parse_value(text: str) -> Any:
    try:
        return _numbers(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`train.lr=1e-3`, `data.train.batch_size=4`, `teacher=path` ... (values parsed as YAML scalars)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        if parts[0] not in DEFAULTS:
            raise RunConfigError(f"override {item!r}: unknown section {parts[0]!r}; known: {sorted(DEFAULTS)}")
        node = cfg
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return cfg


def _merge(base: Any, extra: Any) -> Any:
    """Deep merge of mappings (extra wins); anything else is replaced."""
    if isinstance(base, Mapping) and isinstance(extra, Mapping):
        out = dict(base)
        for k, v in extra.items():
            out[k] = _merge(base.get(k), v)
        return out
    return copy.deepcopy(extra)


def apply_preset(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """Merge `presets[name]` (settings for one topology) into the config."""
    presets = cfg.get("presets") or {}
    if name not in presets:
        raise RunConfigError(f"no preset {name!r} in this config; presets: {sorted(presets) or 'none'}")
    preset = presets[name] or {}
    unknown = sorted(set(preset) - set(PRESET_SECTIONS))
    if unknown:
        raise RunConfigError(f"preset {name!r}: unknown section(s) {unknown}; a preset may set {list(PRESET_SECTIONS)}")
    return {**cfg, **{k: _merge(cfg.get(k), v) for k, v in preset.items()}}


def _over_defaults(sections: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The defaults with `sections` merged in, one level deep (a file's `train:` adds to the default train keys)."""
    unknown = sorted(set(sections) - set(DEFAULTS))
    if unknown:
        raise RunConfigError(f"{where}unknown section(s) {unknown}; known: {sorted(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg[k], dict) and isinstance(v, Mapping) else copy.deepcopy(v)
    return cfg


def _merged(path: str | Path | None, overrides: Sequence[str], preset: str | None) -> dict[str, Any]:
    """Defaults, then the YAML file (yaml.safe_load), then the preset, then the overrides: the plain dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            loaded = _numbers(yaml.safe_load(storage.read_text(path)) or {})  # local or gs://
        except FileNotFoundError:
            raise RunConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, Mapping):
            raise RunConfigError(f"{path}: a run config is a mapping of sections ({', '.join(sorted(DEFAULTS))}), "
                                 f"got a {type(loaded).__name__}")
        cfg = _over_defaults(loaded, f"{path}: ")
    if preset:
        cfg = apply_preset(cfg, preset)
    return apply_overrides(cfg, overrides)


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RunConfigError(f"{name}: expected a section of key: value settings, got {value!r}")
    return dict(value)


def _typed(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    """`cls(**values)` after checking the keys; its own validation errors (naming `section.key`) pass through."""
    _check_keys(section, values, cls)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`data.train` (required) and `data.eval` (optional): grain DataConfig sections whose batch_size is the
    GLOBAL batch; each host's DataConfig is derived from them at start-up (distill/train.py)."""

    train: Mapping[str, Any]
    eval: Mapping[str, Any] | None = None

    @property
    def train_batch_size(self) -> int:
        """The global training batch (DataConfig's default when not given)."""
        return int(self.train.get("batch_size", DataConfig.batch_size))

    @property
    def eval_batch_size(self) -> int | None:
        """The held-out global batch, None without `data.eval`."""
        return int(self.eval.get("batch_size", DataConfig.batch_size)) if self.eval else None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A distillation run's whole configuration, parsed and validated once (see the module docstring).

    `plan` stays a spec until the teacher's layer count is known (`layer_plan`); `source` is the merged plain
    dict it was parsed from, which a run directory records (`to_dict`).
    """

    teacher: str
    plan: str | Mapping[str, Any]
    student: str | None
    data: DataSection
    mesh: MeshConfig
    train: TrainConfig
    loss: LossConfig
    run: RunSettings
    presets: Mapping[str, Any]
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Validate a merged config mapping (sections as in DEFAULTS; missing ones take their defaults)."""
        unknown = sorted(set(d) - set(DEFAULTS))
        if unknown:
            raise RunConfigError(f"unknown section(s) {unknown}; known: {sorted(DEFAULTS)}")
        cfg = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(dict(d))}
        train, loss, run = _section(cfg, "train"), _section(cfg, "loss"), _section(cfg, "run")
        _check_keys("train", train, TrainConfig)
        _check_keys("loss", loss, LossConfig)
        _check_keys("run", run, RunSettings)
        data = _section(cfg, "data")
        unknown = sorted(set(data) - {"train", "eval"})
        if unknown:
            raise RunConfigError(f"unknown data section(s) {unknown}; known: ['eval', 'train']")
        if not data.get("train"):
            raise RunConfigError("data.train is required: a prepared dataset section (path, seq_len, batch_size, ...)")
        for name in ("train", "eval"):
            if data.get(name) is not None and not isinstance(data[name], Mapping):
                raise RunConfigError(f"data.{name}: expected a dataset section (path, seq_len, batch_size, ...), "
                                     f"got {data[name]!r}")
        plan = cfg["plan"]
        if not isinstance(plan, (str, Mapping)):
            raise RunConfigError(f"plan: cannot read {plan!r}; expected e.g. 'every=2,first=1,last=2', "
                                 "{every: 2, first: 1, last: 2}, {kept: [...]} or a plan JSON file")
        return cls(teacher=str(cfg["teacher"]), plan=plan, student=str(cfg["student"]) if cfg["student"] else None,
                   data=DataSection(train=dict(data["train"]), eval=dict(data["eval"]) if data.get("eval") else None),
                   mesh=MeshConfig.parse(cfg["mesh"] if cfg["mesh"] is not None else {}),
                   train=_typed("train", TrainConfig, train), loss=_typed("loss", LossConfig, loss),
                   run=_typed("run", RunSettings, run), presets=dict(cfg.get("presets") or {}), source=cfg)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict this config was parsed from (what a run directory's checkpoints record as `config`)."""
        return copy.deepcopy(dict(self.source))

    def layer_plan(self, num_teacher_layers: int) -> LayerPlan:
        """The `plan:` spec resolved against the teacher's layer count (LayerPlan.from_spec)."""
        return LayerPlan.from_spec(self.plan, num_teacher_layers)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = (), *, preset: str | None = None
                    ) -> RunConfig:
    """Read a YAML run config, fill defaults, apply a preset and the overrides, and validate it (RunConfig)."""
    return RunConfig.from_dict(_merged(path, overrides, preset))


def build_run_config(settings: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from settings given as data (sections as in a YAML file, merged over the defaults like one),
    then `section.key=value` overrides: what code that builds its run (the demo) uses instead of YAML text."""
    return RunConfig.from_dict(apply_overrides(_over_defaults(settings), overrides))
