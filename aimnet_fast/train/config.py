"""Training configuration: one dataclass tree, filled from a YAML file and ``key=value`` overrides.

    cfg = load_config("my.yaml", ["optim.lr=5e-4", "curriculum.1.epochs=20", "data.sources.0.path=x.h5"])

The dataclasses below are the schema of an OmegaConf structured config: OmegaConf merges the YAML
file and the overrides into it, converts each value to the declared type (``1e-3`` a float, ``true``
a bool, ``[a, b]`` a list) and rejects unknown keys and wrong types; ``load_config`` turns its errors
into ``ConfigError`` with the full dotted key. Nested keys use dots; an element of a list is addressed
by its index (``curriculum.0.n_pass``). Choices are ``typing.Literal`` types (below), which
OmegaConf ≥ 2.4 checks. Units are in the field names where they could be doubted (``_Ha``, ``_e``,
``_bohr3``, ``_A``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from ..errors import ConfigError
from ..units import KCALMOL_HA

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
except ImportError as err:
    # The dataclasses, to_dict, dump_yaml and the trainer's run(cfg) work without OmegaConf (a GPU
    # image may lack it); only reading a YAML file or overrides (load_config) needs it.
    OmegaConf = None
    _NO_OMEGACONF = str(err)

    class OmegaConfBaseException(Exception):
        pass
    ConfigAttributeError = ConfigKeyError = OmegaConfBaseException
    DictConfig = ListConfig = dict

#: OmegaConf's marker of a value the YAML must give (a required field).
MISSING = "???"

#: The configuration of ``python -m aimnet_fast.train`` without a config file: a quick run on the
#: embedded default data set that learns (energy and forces, T=1) in a few CPU minutes.
DEFAULT_RUN = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


# -- the choices (checked by OmegaConf) -----------------------------------------------------------
OptimName = Literal["amsgrad", "adam"]          # "amsgrad": the paper's "Amstrad"
Fused = Literal["auto", True, False]            # fused Adam: where available / required / never
Split = Literal["group", "conformer"]
DType = Literal["float32", "float64"]
Backend = Literal["auto", "torch", "cpu", "triton"]    # aimnet_fast.ops.BACKENDS
Head = Literal["energy", "elmoments", "volume"]  # aimnet_fast.model.HEAD_SIZES
Target = Literal["energy", "charges", "volumes"]
Layout = Literal["ani1x", "ani1", "06r", "ani2x", "aimnet2", "spice", "auto"]  # readers.LAYOUTS
Convention = Literal["force", "gradient"]
Progress = Literal["auto", "bar", "lines"]
Per = Literal["atom", "conformer"]


@dataclass
class PropertyConfig:
    """One label of a source (see ``aimnet_fast.data.readers``); ``None``: the reader's default."""
    key: str = MISSING                    # dataset name inside a molecule group
    unit: Optional[str] = None            # default: the stored unit of the standard name
    convention: Convention = "force"      # "gradient": +dE/dR is stored, negated on reading
    drop_last_column: bool = False        # 06r charge arrays carry an extra residual column
    per: Optional[Per] = None             # known for the standard names
    zero_is_missing: Optional[bool] = None
    required: bool = True                 # a key found in no group of the file is an error


@dataclass
class SourceConfig:
    """One HDF5 file and how to read it; ``as_dict()`` is what ``aimnet_fast.data.load_dataset``
    takes. ``None``: the reader's default (properties: the layout's defaults)."""
    path: str = MISSING
    layout: Layout = "auto"
    properties: Optional[dict[str, PropertyConfig]] = None
    coord_unit: Optional[str] = None
    skip_unknown_elements: bool = False
    skip_bad_conformers: bool = False
    skip_charged: bool = False
    elements: Optional[list[int]] = None

    def as_dict(self) -> dict:
        """The source dict of ``aimnet_fast.data.readers``, without the unset (None) entries."""
        return _drop_none(dataclasses.asdict(self))


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


@dataclass
class DataConfig:
    #: Data sources (path, layout, properties); ``None`` means the embedded default data set
    #: (``aimnet_fast.data.default_sources()``). See ``source_dicts``.
    sources: Optional[list[SourceConfig]] = None
    cache_dir: Optional[str] = None
    val_fraction: float = 0.1
    #: "group": a molecule (formula group) stays on one side of the split (``data.split``);
    #: "conformer": conformers are split at random (for sets with only a handful of molecules).
    split: Split = "group"
    split_seed: int = 0
    #: Use at most this many conformers (a random subset, fixed by ``split_seed``); for quick runs.
    max_conformers: Optional[int] = None
    #: Molecules per batch on one rank; the effective batch is this times the world size.
    mols_per_batch: int = 16
    atoms_per_batch: Optional[int] = None
    val_mols_per_batch: Optional[int] = None
    #: Held-out sources, in the form of ``sources``. With ``val_sources`` the run validates on them
    #: and trains on all of ``sources`` (``val_fraction`` and ``split`` are then unused); without,
    #: it validates on a split of ``sources``. ``test_sources`` are never seen in training: the
    #: test report at the end of the run (``test_metrics.json``) is computed on them.
    val_sources: Optional[list[SourceConfig]] = None
    test_sources: Optional[list[SourceConfig]] = None


def source_dicts(data: DataConfig, which: str = "sources") -> list[dict]:
    """The sources of ``data`` (``which``: "sources", "val_sources" or "test_sources") as dicts
    for ``aimnet_fast.data.load_dataset``; for "sources", the embedded default data set where
    ``data.sources`` is None; for the held-out ones, [] where they are None."""
    srcs = getattr(data, which)
    if srcs is None:
        if which != "sources":
            return []
        from ..data import default_sources
        return default_sources()
    return [s.as_dict() if isinstance(s, SourceConfig) else dict(s) for s in srcs]


@dataclass
class ModelConfig:
    heads: list[Head] = field(default_factory=lambda: ["energy", "elmoments", "volume"])
    #: Start from this checkpoint (our format; convert released files first with
    #: ``aimnet_fast.checkpoint.convert_released``). Weights whose name and shape match are loaded;
    #: the others (e.g. a new head) keep their fresh initialisation and are listed at start-up.
    init_from: Optional[str] = None
    #: fnmatch patterns of parameter names to keep fixed, e.g. ["afv_table", "combine_mlp.*"].
    freeze: list[str] = field(default_factory=list)
    #: If set, only parameters matching one of these patterns train (e.g. ["heads.energy.*"]).
    trainable: Optional[list[str]] = None
    #: fnmatch patterns of parameters to re-initialise after loading ``init_from``.
    reinit: list[str] = field(default_factory=list)
    #: Keep the SAE of ``init_from`` instead of fitting it on the training split.
    keep_sae: bool = False


@dataclass
class LossConfig:
    """L = Σ_p w_p Σ_t w_t mean_i (y − ŷ)², w_p = 1/unit_p², w_t = 1/T (see ``aimnet_fast.loss``)."""
    #: Targets to fit when the data has them (and the model has the head); forces: ``forces=true``.
    targets: list[Target] = field(default_factory=lambda: ["energy", "charges", "volumes"])
    energy_unit_Ha: float = KCALMOL_HA           # per atom: 1 kcal/mol
    charges_unit_e: float = 0.0063
    volumes_unit_bohr3: float = 4.386             # 0.65 Å³
    #: Add a forces term (−dE/dR of the last pass; costs a double backward).
    forces: bool = False
    forces_unit_Ha_per_A: float = KCALMOL_HA     # 1 kcal/mol/Å


@dataclass
class OptimConfig:
    name: OptimName = "amsgrad"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    #: "auto": fused Adam where this torch supports it for the device; true: require it.
    fused: Fused = "auto"
    #: Clip the global gradient norm to this value (0: off).
    grad_clip: float = 0.0


@dataclass
class ScheduleConfig:
    """Reduce on plateau of the (rank-averaged) validation loss."""
    factor: float = 0.9
    #: Multiply lr by ``factor`` once this many epochs in a row have not improved the best loss.
    patience: int = 6
    #: An epoch improves if val < best · (1 − threshold).
    threshold: float = 0.0
    #: A phase stops when the lr falls below this floor (0: never).
    min_lr: float = 1e-5
    #: Early stopping: a phase stops once this many epochs in a row have not improved its best
    #: validation loss (0: never).
    early_stopping: int = 0
    #: After each cold restart (the start of every phase: fresh optimizer moments), the lr rises
    #: linearly from lr/warmup_steps to lr over this many steps (0: no warm-up).
    warmup_steps: int = 0


@dataclass
class PhaseConfig:
    n_pass: int = 1
    epochs: int = 1
    #: Zero the last layer of update_mlp at the start of the phase (the T=1 → T=3 switch:
    #: the extra passes then start as identity and predictions are unchanged).
    zero_update: bool = False
    #: With ``max_time``: the phase ends (at the latest) once the run has used this fraction of
    #: the budget since the end of the previous phases with a fraction, so that a budgeted run
    #: reaches every phase; e.g. 0.4 and 0.6. ``epochs`` still bounds the phase.
    time_fraction: Optional[float] = None
    #: The lr this phase starts at (None: ``optim.lr``); e.g. lower for the T=3 phase, which
    #: starts from a converged T=1 model.
    lr: Optional[float] = None


@dataclass
class EmaConfig:
    """An exponential moving average of the trainable weights: w_ema ← decay·w_ema + (1−decay)·w
    after every optimizer step. Validation, ``best.pt``, ``last.pt`` and the test report use the
    averaged weights (the raw ones are in ``last.pt`` too, for an exact resume). At each new phase
    the raw weights start from the averaged ones."""
    decay: float = 0.0           # 0: off; typical 0.99–0.999


def _default_curriculum() -> list:
    return [PhaseConfig(n_pass=1, epochs=10), PhaseConfig(n_pass=3, epochs=5, zero_update=True)]


@dataclass
class TrainConfig:
    #: Output folder; default ``runs/<UTC timestamp>``.
    run_dir: Optional[str] = None
    #: Continue the run in ``run_dir`` from its ``last.pt``.
    resume: bool = False
    seed: int = 0
    device: str = "auto"         # "auto", or a torch device: "cpu", "cuda", "cuda:1"
    dtype: DType = "float32"     # model parameters
    backend: Backend = "auto"    # model ops
    num_threads: Optional[int] = None
    #: Bit-for-bit repeatable runs (and resumes): on the CPU one intra-op thread unless
    #: ``num_threads`` says otherwise (the thread count fixes the order of parallel sums) and
    #: torch's deterministic algorithms; on CUDA torch's deterministic algorithms (warning where an
    #: op has none) and a fixed cuBLAS workspace. README, "Exact resumes", says when it holds.
    deterministic: bool = False
    #: On the CPU, flush denormal floats to zero: the AEV Gaussians underflow into denormals, and
    #: arithmetic on them made a CPU training step ~50× slower.
    flush_denormal: bool = True
    #: Pad every training batch and its neighbor lists to fixed capacities (``aimnet_fast.padded``):
    #: the step then reads no device value until its flags after the backward (no host sync; the
    #: shapes a CUDA graph needs), with the same gradients. Lists that overflow their capacities
    #: are grown and the step redone. Costs the padding's work; meant for GPUs.
    static_shapes: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    curriculum: list[PhaseConfig] = field(default_factory=_default_curriculum)
    ema: EmaConfig = field(default_factory=EmaConfig)
    #: Wall-clock budget of the run over all restarts, e.g. "90s", "45m", "2h", "1h30m" or a
    #: number of seconds: the run then stops cleanly (checkpoint, test report). None: no budget.
    max_time: Optional[str] = None
    #: Train at most this many steps per epoch (None: the whole epoch); for tests and benchmarks.
    max_steps_per_epoch: Optional[int] = None
    log_every: int = 10
    #: "bar": a live progress bar per epoch (tqdm); "lines": a plain line every ``log_every``
    #: steps; "auto": the bar on a terminal outside torchrun, lines otherwise.
    progress: Progress = "auto"
    #: Also write ``last.pt`` every this many steps within an epoch (0: at the end of epochs only).
    checkpoint_every: int = 0
    #: Stop after this many consecutive steps with a NaN/inf loss or gradient.
    max_bad_steps: int = 20
    plot: bool = True
    tensorboard: bool = True


# -- loading ---------------------------------------------------------------------------------------
def _config_error(e: OmegaConfBaseException, key: str) -> ConfigError:
    """OmegaConf's error as one line that starts with the full dotted key (``a.0.b``, not ``a[0].b``)."""
    full = re.sub(r"\[([^\]]*)\]", r".\1", getattr(e, "full_key", None) or key or "")
    msg = " ".join(str(getattr(e, "msg", None) or e).split("\n")[0].split())
    if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and "not in" in msg:
        schema = getattr(e, "object_type", None)
        if not dataclasses.is_dataclass(schema):
            return ConfigError(f"unknown config key {full!r}")
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        return ConfigError(f"unknown config key {full!r}; known here: {known}")
    return ConfigError(f"{full}: {msg}" if full else msg)


def _ensure_mapping(cfg: DictConfig, key: str) -> None:
    """Make the absent or None mapping at ``key`` an empty one (its parents too, up to a list item)."""
    if isinstance(OmegaConf.select(cfg, key), (DictConfig, ListConfig)):
        return
    parent, _, last = key.rpartition(".")
    if parent and not parent.rpartition(".")[2].isdigit():
        _ensure_mapping(cfg, parent)
    OmegaConf.update(cfg, parent, {last: {}}, merge=True) if parent else cfg.merge_with({last: {}})


def _set(cfg: DictConfig, key: str, value) -> None:
    """Merge the plain YAML ``value`` into ``cfg`` at the dotted ``key``.

    Mappings merge key by key and lists of mappings item by item, into nodes that are already in
    the tree, so that OmegaConf's errors carry the full key (``OmegaConf.merge`` checks new list
    items and mapping values apart from the tree, and its errors then name the key within them)."""
    parts = key.split(".")
    for n in range(1, len(parts)):    # an index past the end of a list: say so (OmegaConf doesn't)
        node = OmegaConf.select(cfg, ".".join(parts[:n]))
        if isinstance(node, ListConfig) and not (parts[n].isdigit() and int(parts[n]) < len(node)):
            raise ConfigError(f"unknown config key {'.'.join(parts[:n + 1])!r}: "
                              f"{'.'.join(parts[:n])} has {len(node)} items")
    try:
        if len(parts) > 1 and not parts[-2].isdigit():
            _ensure_mapping(cfg, ".".join(parts[:-1]))
        if isinstance(value, dict):
            _ensure_mapping(cfg, key)
            for k, v in value.items():
                _set(cfg, f"{key}.{k}", v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            OmegaConf.update(cfg, key, [{}] * len(value), merge=True)   # a list is replaced
            for n, v in enumerate(value):
                _set(cfg, f"{key}.{n}", v)
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise _config_error(e, key) from None


def _read_yaml(path: str | Path) -> dict:
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: cannot read the YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, "
                          f"got a {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then the ``dotted.key=value`` overrides in order."""
    if OmegaConf is None:
        raise ConfigError(f"reading a configuration needs omegaconf ({_NO_OMEGACONF}): "
                          f"pip install 'omegaconf>=2.4'")
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        for k, v in _read_yaml(path).items():
            _set(cfg, str(k), v)
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {raw!r} as YAML: {getattr(e, 'problem', e)}") from None
        _set(cfg, key, value)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _config_error(e, "") from None
    validate(obj)
    return obj


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value) -> float:
    """Seconds of a duration: a number (seconds) or e.g. "90s", "45m", "2h", "1h30m", "1.5h"."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ConfigError(f"max_time: {value!r} is not a duration (e.g. 90s, 45m, 2h, 1h30m, "
                              f"or seconds)") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"max_time: {value!r} must be a positive, finite duration")
    return seconds


def validate(cfg: TrainConfig) -> None:
    """The checks that span fields or values (types and choices are OmegaConf's)."""
    if not cfg.curriculum:
        raise ConfigError("curriculum: at least one phase is needed")
    fractions = 0.0
    for n, ph in enumerate(cfg.curriculum):
        if ph.n_pass < 1 or ph.epochs < 0:
            raise ConfigError(f"curriculum.{n}: n_pass must be ≥ 1 and epochs ≥ 0")
        if ph.lr is not None and not ph.lr > 0:
            raise ConfigError(f"curriculum.{n}.lr: {ph.lr} must be > 0")
        if ph.time_fraction is not None:
            if not 0 < ph.time_fraction <= 1:
                raise ConfigError(f"curriculum.{n}.time_fraction: {ph.time_fraction} is not in (0, 1]")
            if cfg.max_time is None:
                raise ConfigError(f"curriculum.{n}.time_fraction needs a budget: set max_time")
            fractions += ph.time_fraction
    if fractions > 1 + 1e-9:
        raise ConfigError(f"curriculum: the time fractions add up to {fractions:g} > 1")
    if cfg.max_time is not None:
        parse_duration(cfg.max_time)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr: {cfg.optim.lr} must be > 0")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay: {cfg.ema.decay} must be in [0, 1) (0: off)")
    if cfg.schedule.warmup_steps < 0 or cfg.schedule.early_stopping < 0:
        raise ConfigError("schedule: warmup_steps and early_stopping must be ≥ 0")
    if cfg.data.val_sources is not None and not cfg.data.val_sources:
        raise ConfigError("data.val_sources: an empty list; give sources or leave it unset")
    if not (0 < cfg.schedule.factor < 1 and cfg.schedule.patience >= 1):
        raise ConfigError("schedule: factor must be in (0, 1) and patience ≥ 1")
    if cfg.data.mols_per_batch < 1:
        raise ConfigError("data.mols_per_batch must be ≥ 1")
    if cfg.device != "auto":
        import torch
        try:
            torch.device(cfg.device)
        except RuntimeError as e:
            raise ConfigError(f"device: {cfg.device!r} is not 'auto' or a torch device ({e})") from None


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    """The config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
