"""Configuration: YAML file + key=value overrides, types from the dataclass, errors name the key."""
import typing
from pathlib import Path

import pytest
import yaml

from aimnet_fast.errors import AIMNetError
from aimnet_fast.train import config as C
from aimnet_fast.train.config import ConfigError, TrainConfig, dump_yaml, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "aimnet_fast" / "configs").glob("*.yaml"))


def test_defaults_match_the_paper():
    cfg = TrainConfig()
    assert cfg.optim.name == "amsgrad" and cfg.optim.lr == 1e-3
    assert cfg.schedule.factor == 0.9 and cfg.schedule.patience == 6
    assert [p.n_pass for p in cfg.curriculum] == [1, 3] and cfg.curriculum[1].zero_update
    assert cfg.loss.energy_unit_Ha == pytest.approx(1 / 627.509474)
    assert cfg.loss.charges_unit_e == 0.0063 and cfg.loss.volumes_unit_bohr3 == 4.386


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\noptim:\n  lr: 5.0e-4\n  name: adam\ncurriculum:\n  - {n_pass: 1, epochs: 7}\n"
                 "  - {n_pass: 3, epochs: 9, zero_update: true}\ndata:\n  mols_per_batch: 16\n")
    cfg = load_config(p, ["optim.lr=1e-4", "curriculum.1.epochs=2", "data.atoms_per_batch=500",
                          "model.freeze=[afv_table, 'combine_mlp.*']", "run_dir=runs/x",
                          "data.max_conformers=null", "plot=false"])
    assert cfg.seed == 3 and cfg.optim.name == "adam"
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)   # YAML reads 1e-4 as a string
    assert cfg.curriculum[0].epochs == 7 and cfg.curriculum[1].epochs == 2
    assert cfg.curriculum[1].zero_update is True
    assert cfg.data.mols_per_batch == 16 and cfg.data.atoms_per_batch == 500
    assert cfg.model.freeze == ["afv_table", "combine_mlp.*"]
    assert cfg.run_dir == "runs/x" and cfg.data.max_conformers is None and cfg.plot is False
    # The dumped YAML reads back to the same config.
    q = tmp_path / "resolved.yaml"
    q.write_text(dump_yaml(cfg))
    assert load_config(q) == cfg


@pytest.mark.parametrize("item, key", [
    ("optim.lrr=1", "optim.lrr"), ("nope=1", "nope"), ("curriculum.5.epochs=1", "curriculum.5"),
    ("curriculum.0.foo=1", "curriculum.0.foo"), ("data.mols_per_batch=many", "data.mols_per_batch"),
    ("data.mols_per_batch=2.5", "data.mols_per_batch"), ("plot=maybe", "plot"),
])
def test_bad_overrides_name_the_key(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [item])


def test_unknown_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(p)


def test_invalid_values():
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(None, ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="loss.targets"):
        load_config(None, ["loss.targets=[energy, dipoles]"])


def test_command_line_resume_uses_the_runs_config(tmp_path):
    from aimnet_fast.train.trainer import parse_args
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config(None, ["data.mols_per_batch=7", f"run_dir={run}"])
    (run / "config.yaml").write_text(dump_yaml(saved))
    cfg = parse_args([f"run_dir={run}", "--resume", "curriculum.1.epochs=9"])
    assert cfg.resume and cfg.data.mols_per_batch == 7 and cfg.curriculum[1].epochs == 9
    cfg = parse_args(["optim.lr=2e-4"])
    assert not cfg.resume and cfg.optim.lr == 2e-4


def test_resume_without_run_dir_finds_the_latest_run_and_its_config(tmp_path, monkeypatch):
    from aimnet_fast.errors import TrainingError
    from aimnet_fast.train.trainer import parse_args
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match="no runs/\\*/last.pt"):
        parse_args(["--resume"])
    for name, mols in (("20261201-100000", 5), ("20261202-090000", 9), ("20261203-000000", 3)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_yaml(load_config(None, [f"data.mols_per_batch={mols}",
                                                                      f"run_dir={run}"])))
        if mols != 3:                       # the newest folder has no checkpoint: not a run to resume
            (run / "last.pt").write_bytes(b"")
    cfg = parse_args(["--resume", "optim.lr=3e-4"])
    assert cfg.run_dir == str(Path("runs") / "20261202-090000")
    assert cfg.data.mols_per_batch == 9 and cfg.optim.lr == 3e-4 and cfg.resume


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    q = tmp_path / "config.yaml"
    q.write_text(dump_yaml(cfg))
    assert load_config(q) == cfg
    if cfg.data.sources is not None:
        assert all(isinstance(s, C.SourceConfig) for s in cfg.data.sources)


def test_default_yaml_is_the_defaults_but_for_the_quick_run():
    """default.yaml is TrainConfig's defaults except where it says so: what the bare command runs."""
    cfg = load_config(next(p for p in CONFIGS if p.name == "default.yaml"))
    base = TrainConfig()
    base.data.mols_per_batch = 32
    base.loss.targets, base.loss.energy_unit_Ha, base.loss.forces = ["energy"], C.KCALMOL_HA / 5, True
    base.schedule.factor, base.schedule.patience, base.schedule.min_lr = 0.6, 1, 1e-6
    base.curriculum = [C.PhaseConfig(n_pass=1, epochs=14)]
    assert cfg == base


def test_sources_are_typed_and_become_the_readers_dicts(tmp_path):
    from aimnet_fast.data import default_sources
    from aimnet_fast.data.readers import normalize_source
    path = next(p for p in CONFIGS if p.name == "ani1x_06r_gdb11_s01.yaml")
    cfg = load_config(path, ["data.sources.0.path=x.h5", "data.sources.0.properties.forces.key=forces",
                             "data.sources.0.properties.forces.convention=gradient"])
    src = cfg.data.sources[0]
    assert (src.path, src.layout, src.coord_unit) == ("x.h5", "06r", None)
    assert src.properties["charges"].drop_last_column and src.properties["energy"].unit == "hartree"
    assert src.properties["forces"].convention == "gradient" and src.properties["forces"].unit is None
    raw = yaml.safe_load(path.read_text())["data"]["sources"][0]
    raw["path"] = "x.h5"
    raw["properties"]["forces"] = {"key": "forces", "convention": "gradient"}
    dicts = C.source_dicts(cfg.data)
    assert dicts == [src.as_dict()] and "coord_unit" not in dicts[0]   # unset: the reader's default
    assert normalize_source(dicts[0]) == normalize_source(raw)
    # Resume: the run's config.yaml (from dump_yaml) plus overrides gives the same sources.
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_config(tmp_path / "config.yaml", ["resume=true"])
    assert again.data.sources == cfg.data.sources and again.resume
    assert C.source_dicts(load_config(None).data) == default_sources()


def test_a_whole_source_list_as_an_override():
    cfg = load_config(None, ["data.sources=[{path: a.h5, layout: ani1x}, {path: b.h5}]"])
    assert [(s.path, s.layout, s.properties) for s in cfg.data.sources] == [("a.h5", "ani1x", None),
                                                                          ("b.h5", "auto", None)]


def test_choices_match_the_code_that_uses_them():
    from aimnet_fast.data.readers import LAYOUTS
    from aimnet_fast.model import HEAD_SIZES
    from aimnet_fast.ops import BACKENDS
    assert set(typing.get_args(C.Layout)) == set(LAYOUTS) | {"auto"}
    assert set(typing.get_args(C.Head)) == set(HEAD_SIZES)
    assert set(typing.get_args(C.Backend)) == set(BACKENDS)
    cfg = load_config(None, ["optim.fused=true", "dtype=float64", "backend=torch", "device=cuda:1"])
    assert cfg.optim.fused is True and str(cfg.optim.fused).lower() == "true"
    assert (cfg.dtype, cfg.backend, cfg.device) == ("float64", "torch", "cuda:1")


@pytest.mark.parametrize("item, message", [
    ("optim.lr=abc", r"^optim\.lr: .*'abc'.*Float"),
    ("nosuchkey=1", r"^unknown config key 'nosuchkey'; known here: run_dir, "),
    ("dtype=float16", r"^dtype: Invalid value 'float16', expected one of \['float32', 'float64'\]"),
    ("optim.fused=maybe", r"^optim\.fused: "),
    ("data.split=random", r"^data\.split: "),
    ("backend=cuda", r"^backend: "),
    ("device=gpu", r"^device: 'gpu'"),
    ("data.sources=[{path: x.h5, layout: hdf5}]", r"^data\.sources\.0\.layout: Invalid value 'hdf5'"),
    ("data.sources=[{layout: ani1x}]", r"^data\.sources\.0\.path: .*missing"),
    ("data.sources=[{path: x.h5, properties: {energy: {key: e, units: ev}}}]",
     r"^unknown config key 'data\.sources\.0\.properties\.energy\.units'"),
    ("data.sources.0.path=x.h5", r"^data\.sources\.0\.path: .*None"),
    ("model.heads=[energy, dipole]", r"^model\.heads\.1: "),
    ("schedule.factor=1.5", r"^schedule: factor"),
    ("curriculum=[]", r"^curriculum: at least one phase"),
    ("curriculum.0.n_pass=0", r"^curriculum\.0: n_pass"),
    ("data.mols_per_batch=0", r"^data\.mols_per_batch must be"),
    ("optim.lr", r"not key=value"),
])
def test_errors_are_one_line_and_start_with_the_key(item, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [item])
    assert isinstance(e.value, AIMNetError) and isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_yaml_file_errors_name_the_file_or_key(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(missing)
    p = tmp_path / "list.yaml"
    p.write_text("- seed: 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_config(p)
    p.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: cannot read"):
        load_config(p)
    p.write_text("data:\n  sources:\n    - {path: x.h5, layout: 06r, coord_unit: 3}\n"
                 "curriculum:\n  - {n_pass: 1, epochs: many}\n")
    with pytest.raises(ConfigError, match=r"^curriculum\.0\.epochs: "):
        load_config(p)
    p.write_text("")
    assert load_config(p) == TrainConfig()


def test_trainer_imports_and_configs_work_without_omegaconf():
    """A GPU image may lack omegaconf: the dataclasses, dump_yaml and the trainer still import;
    load_config says what is missing, in one line."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['omegaconf'] = None\n"
        "from aimnet_fast.train import trainer, config as C\n"
        "cfg = C.TrainConfig(); cfg.optim.lr = 5e-4\n"
        "assert 'lr: 0.0005' in C.dump_yaml(cfg)\n"
        "try:\n    C.load_config(None, ['optim.lr=1'])\nexcept C.ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs omegaconf" in r.stdout and "pip install" in r.stdout
