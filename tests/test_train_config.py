"""Configuration: YAML file + key=value overrides, types from the dataclass, errors name the key."""
import pytest

from aimnet_fast.train.config import ConfigError, TrainConfig, dump_yaml, load_config


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
