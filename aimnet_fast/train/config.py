"""Training configuration: one dataclass tree, filled from a YAML file and ``key=value`` overrides.

    cfg = load_config("my.yaml", ["optim.lr=5e-4", "curriculum.1.epochs=20", "run_dir=runs/x"])

Nested keys use dots; an element of a list is addressed by its index (``curriculum.0.n_pass``).
Values are parsed as YAML and then converted to the type the dataclass declares, so ``1e-3`` is a
float, ``true`` a bool and ``[a, b]`` a list. An unknown key is an error that names the key.
Units are in the field names where they could be doubted (``_Ha``, ``_e``, ``_bohr3``, ``_A``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..constants import HARTREE_TO_KCALMOL
from ..errors import ConfigError

KCALMOL_HA = 1.0 / HARTREE_TO_KCALMOL  # 1 kcal/mol in Hartree


@dataclass
class DataConfig:
    #: Source dicts for ``aimnet_fast.data.load_dataset`` (path, layout, properties); ``None``
    #: means the embedded default data set (``aimnet_fast.data.default_sources()``).
    sources: Optional[list] = None
    cache_dir: Optional[str] = None
    val_fraction: float = 0.1
    #: "group": a molecule (formula group) stays on one side of the split (``data.split``);
    #: "conformer": conformers are split at random (for sets with only a handful of molecules).
    split: str = "group"
    split_seed: int = 0
    #: Use at most this many conformers (a random subset, fixed by ``split_seed``); for quick runs.
    max_conformers: Optional[int] = None
    #: Molecules per batch on one rank; the effective batch is this times the world size.
    mols_per_batch: int = 16
    atoms_per_batch: Optional[int] = None
    val_mols_per_batch: Optional[int] = None


@dataclass
class ModelConfig:
    heads: list = field(default_factory=lambda: ["energy", "elmoments", "volume"])
    #: Start from this checkpoint (our format; convert released files first with
    #: ``aimnet_fast.checkpoint.convert_released``). Weights whose name and shape match are loaded;
    #: the others (e.g. a new head) keep their fresh initialisation and are listed at start-up.
    init_from: Optional[str] = None
    #: fnmatch patterns of parameter names to keep fixed, e.g. ["afv_table", "combine_mlp.*"].
    freeze: list = field(default_factory=list)
    #: If set, only parameters matching one of these patterns train (e.g. ["heads.energy.*"]).
    trainable: Optional[list] = None
    #: fnmatch patterns of parameters to re-initialise after loading ``init_from``.
    reinit: list = field(default_factory=list)
    #: Keep the SAE of ``init_from`` instead of fitting it on the training split.
    keep_sae: bool = False


@dataclass
class LossConfig:
    """L = Σ_p w_p Σ_t w_t mean_i (y − ŷ)², w_p = 1/unit_p², w_t = 1/T (see ``aimnet_fast.loss``)."""
    #: Targets to fit when the data has them (and the model has the head): energy, charges, volumes.
    targets: list = field(default_factory=lambda: ["energy", "charges", "volumes"])
    energy_unit_Ha: float = KCALMOL_HA           # per atom: 1 kcal/mol
    charges_unit_e: float = 0.0063
    volumes_unit_bohr3: float = 4.386             # 0.65 Å³
    #: Add a forces term (−dE/dR of the last pass; costs a double backward).
    forces: bool = False
    forces_unit_Ha_per_A: float = KCALMOL_HA     # 1 kcal/mol/Å


@dataclass
class OptimConfig:
    name: str = "amsgrad"        # "amsgrad" (the paper's "Amstrad") or "adam"
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    #: "auto": fused Adam where this torch supports it for the device; true: require it.
    fused: str = "auto"
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


@dataclass
class PhaseConfig:
    n_pass: int = 1
    epochs: int = 1
    #: Zero the last layer of update_mlp at the start of the phase (the T=1 → T=3 switch:
    #: the extra passes then start as identity and predictions are unchanged).
    zero_update: bool = False


def _default_curriculum() -> list:
    return [PhaseConfig(n_pass=1, epochs=10), PhaseConfig(n_pass=3, epochs=5, zero_update=True)]


@dataclass
class TrainConfig:
    #: Output folder; default ``runs/<UTC timestamp>``.
    run_dir: Optional[str] = None
    #: Continue the run in ``run_dir`` from its ``last.pt``.
    resume: bool = False
    seed: int = 0
    device: str = "auto"         # "auto", "cpu", "cuda"
    dtype: str = "float32"       # model parameters: "float32" or "float64"
    backend: str = "auto"        # model ops: "auto", "torch", "triton"
    num_threads: Optional[int] = None
    #: On the CPU, flush denormal floats to zero: the AEV Gaussians underflow into denormals, and
    #: arithmetic on them made a CPU training step ~50× slower.
    flush_denormal: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    curriculum: list = field(default_factory=_default_curriculum)
    #: Train at most this many steps per epoch (None: the whole epoch); for tests and benchmarks.
    max_steps_per_epoch: Optional[int] = None
    log_every: int = 10
    #: Also write ``last.pt`` every this many steps within an epoch (0: at the end of epochs only).
    checkpoint_every: int = 0
    #: Stop after this many consecutive steps with a NaN/inf loss or gradient.
    max_bad_steps: int = 20
    plot: bool = True
    tensorboard: bool = True


#: Element types of list fields that hold dataclasses.
LIST_ITEM_TYPES = {(TrainConfig, "curriculum"): PhaseConfig}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _convert(value: Any, tp, key: str, item_type=None):
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be empty (expected {getattr(tp, '__name__', tp)})")
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return _fill(tp(), value, key)
        if tp is bool:
            if isinstance(value, bool):
                return value
            words = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}
            if isinstance(value, str) and value.lower() in words:
                return words[value.lower()]
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 0)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is list or typing.get_origin(tp) is list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                raise ValueError
            if item_type is not None:
                return [_convert(v, item_type, f"{key}.{n}") for n, v in enumerate(value)]
            return list(value)
        if tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}")


def _fields(obj) -> dict:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fill(obj, values: dict, prefix: str = ""):
    hints = _hints(type(obj))
    names = _fields(obj)
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; known here: {', '.join(names)}")
        setattr(obj, k, _convert(v, hints[k], key, LIST_ITEM_TYPES.get((type(obj), k))))
    return obj


def apply_override(cfg: TrainConfig, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.split(".")
    obj, path = cfg, []
    for n, part in enumerate(parts):
        path.append(part)
        last = n == len(parts) - 1
        dotted = ".".join(path)
        if isinstance(obj, list):
            try:
                idx = int(part)
                obj[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"unknown config key {dotted!r}: list index out of range") from None
            if last:
                raise ConfigError(f"{dotted}: set a field of the list item, e.g. {dotted}.epochs=3")
            obj = obj[idx]
            continue
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            known = ", ".join(_fields(obj)) if dataclasses.is_dataclass(obj) else "none"
            raise ConfigError(f"unknown config key {dotted!r}; known here: {known}")
        if last:
            tp = _hints(type(obj))[part]
            setattr(obj, part, _convert(value, tp, dotted, LIST_ITEM_TYPES.get((type(obj), part))))
        else:
            obj = getattr(obj, part)
            if obj is None:
                raise ConfigError(f"{dotted} is empty; set it as a whole first")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then the overrides in order."""
    cfg = TrainConfig()
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        _fill(cfg, values)
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.optim.name not in ("amsgrad", "adam"):
        raise ConfigError(f"optim.name: {cfg.optim.name!r}; choose amsgrad or adam")
    if str(cfg.optim.fused).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"optim.fused: {cfg.optim.fused!r}; choose auto, true or false")
    if cfg.data.split not in ("group", "conformer"):
        raise ConfigError(f"data.split: {cfg.data.split!r}; choose group or conformer")
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype: {cfg.dtype!r}; choose float32 or float64")
    if not cfg.curriculum:
        raise ConfigError("curriculum: at least one phase is needed")
    for n, ph in enumerate(cfg.curriculum):
        if ph.n_pass < 1 or ph.epochs < 0:
            raise ConfigError(f"curriculum.{n}: n_pass must be ≥ 1 and epochs ≥ 0")
    unknown = set(cfg.loss.targets) - {"energy", "charges", "volumes"}
    if unknown:
        raise ConfigError(f"loss.targets: unknown {sorted(unknown)}; choose from energy, charges, "
                          f"volumes (forces: loss.forces=true)")
    if cfg.data.mols_per_batch < 1:
        raise ConfigError("data.mols_per_batch must be ≥ 1")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
