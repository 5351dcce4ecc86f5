"""Splits by molecule, and the distributed batch sampler: coverage, reproducibility, equal step
counts on 1..4 ranks, atom balance, atom budgets and mid-epoch resume."""
import numpy as np
import pytest

from aimnet_fast.data import BatchSampler, DataError, load_dataset, split


@pytest.fixture(scope="module")
def ds(shared):
    d = shared / "data"
    # mixed sizes 2..34 atoms, 3+66+1 molecules/formulas and 2..? : 06r + s66x8 + ANI-2x diatomics
    return load_dataset([d / "ani1x_06r_gdb11_s01.h5", d / "comp6_s66x8.h5", d / "ani2x_diatomics.h5"])


def test_split_keeps_molecules_on_one_side(ds):
    tr, va = split(ds, val_fraction=0.1, seed=3)
    assert np.intersect1d(tr, va).size == 0 and tr.size + va.size == ds.n_conf
    assert np.intersect1d(ds.group[tr], ds.group[va]).size == 0
    # whole groups: the fraction is approximate, but one group away from 10% at most
    assert abs(va.size - 0.1 * ds.n_conf) <= np.bincount(ds.group).max()
    tr2, va2 = split(ds, val_fraction=0.1, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split(ds, val_fraction=0.1, seed=4)[1])


def test_split_with_few_large_groups(shared):
    """CH4 5400, NH3 3600, H2O 1800 conformers: 10 % cannot be met; the smallest group is the best."""
    d = load_dataset(shared / "data" / "ani1_gdb_s01.h5")
    for seed in range(5):
        tr, va = split(d, val_fraction=0.1, seed=seed)
        assert va.size == 1800 and tr.size == 9000
    tr, va = split(d, val_fraction=0.0)
    assert va.size == 0 and tr.size == d.n_conf


def test_kfold_covers_every_conformer_once(ds):
    seen = np.zeros(ds.n_conf, int)
    for f in range(5):
        tr, va = split(ds, n_folds=5, fold=f, seed=0)
        assert np.intersect1d(ds.group[tr], ds.group[va]).size == 0 and tr.size + va.size == ds.n_conf
        seen[va] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError):
        split(ds, n_folds=5, fold=5)


def test_split_of_one_molecule_is_an_error(shared):
    one = load_dataset([{"path": shared / "data" / "spice_sample.h5", "skip_unknown_elements": True}])
    with pytest.raises(DataError, match="one molecule"):
        split(one, val_fraction=0.1)


@pytest.mark.parametrize("mode", [{"mols_per_batch": 64}, {"atoms_per_batch": 700, "mols_per_batch": 0}])
def test_sampler_equal_steps_and_atom_balance(ds, mode, capsys):
    tr, _ = split(ds, val_fraction=0.1, seed=0)
    kw = {"mols_per_batch": mode["mols_per_batch"]} if "atoms_per_batch" not in mode else \
        {"atoms_per_batch": mode["atoms_per_batch"]}
    report = []
    for world in (1, 2, 3, 4):
        samplers = [BatchSampler(ds, tr, seed=7, rank=r, world_size=world, **kw) for r in range(world)]
        for s in samplers:
            s.set_epoch(2)
        lens = {len(s) for s in samplers}
        assert len(lens) == 1, f"ranks disagree on the number of steps: {lens}"
        steps = [list(s) for s in samplers]
        assert {len(x) for x in steps} == lens
        allidx = np.concatenate([b for x in steps for b in x])
        # every training conformer once; padding (only in a last step smaller than world) repeats a few
        assert set(allidx.tolist()) == set(tr.tolist()) and allidx.size - tr.size < world
        assert all(b.size > 0 for x in steps for b in x)
        atoms = np.array([[ds.n_atoms[b].sum() for b in x] for x in steps])  # (rank, step)
        full = atoms[:, :-1] if atoms.shape[1] > 1 else atoms
        imb = (full.max(0) - full.min(0)) / full.mean(0)
        report.append(f"{kw} world {world}: {len(steps[0])} steps, atoms/rank/step "
                      f"{full.mean():.0f}, max imbalance {imb.max():.2%}, mean {imb.mean():.2%}")
        assert imb.max() < 0.1
        if "atoms_per_batch" in kw:
            assert (atoms.sum(0) <= world * kw["atoms_per_batch"] + ds.n_atoms.max()).all()
        else:
            mols = np.array([[b.size for b in x] for x in steps])
            assert (mols[:, :-1].max(0) - mols[:, :-1].min(0) <= 1).all()
            assert mols[:, :-1].sum(0).tolist() == [world * 64] * (mols.shape[1] - 1)
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_sampler_reproducible_and_reshuffled(ds):
    a = BatchSampler(ds, seed=1, mols_per_batch=100)
    b = BatchSampler(ds, seed=1, mols_per_batch=100)
    a.set_epoch(3)
    b.set_epoch(3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    first = [x.copy() for x in a]
    a.set_epoch(4)
    assert not all(np.array_equal(x, y) for x, y in zip(first, a))
    c = BatchSampler(ds, seed=1, mols_per_batch=100, shuffle=False)
    assert np.array_equal(np.concatenate(list(c)), np.arange(ds.n_conf))


def test_sampler_resume_mid_epoch(ds):
    a = BatchSampler(ds, seed=5, mols_per_batch=50, rank=1, world_size=2)
    a.set_epoch(1)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    rest = list(it)
    b = BatchSampler(ds, seed=5, mols_per_batch=50, rank=1, world_size=2)
    b.load_state_dict(state)
    resumed = list(b)
    assert len(resumed) == len(rest) == len(a) - 7
    assert all(np.array_equal(x, y) for x, y in zip(rest, resumed))
    with pytest.raises(DataError, match=f"for {ds.n_conf} conformers, this run samples 10\\b"):
        BatchSampler(ds, np.arange(10), seed=5, mols_per_batch=50, rank=1,
                     world_size=2).load_state_dict(state)


def test_sampler_state_with_read_ahead(ds):
    """A loader that has read one batch ahead saves the position of the batches it used."""
    a = BatchSampler(ds, seed=3, mols_per_batch=64)
    it = iter(a)
    used = [next(it) for _ in range(3)]
    next(it)  # read ahead, not used
    state = a.state_dict(position=len(used))
    b = BatchSampler(ds, seed=3, mols_per_batch=64)
    b.load_state_dict(state)
    c = BatchSampler(ds, seed=3, mols_per_batch=64)
    rest, ref = list(b), list(c)[3:]
    assert len(rest) == len(ref) > 0 and all(np.array_equal(x, y) for x, y in zip(rest, ref))


def _take(samplers, steps):
    """The conformers of the next ``steps`` steps of every rank's sampler (iterators kept)."""
    out = []
    for it in samplers:
        for _ in range(steps):
            out += list(next(it))
    return out


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 3), (3, 2, 1), (2, 4, 1)])
@pytest.mark.parametrize("budget", [{"mols_per_batch": 40}, {"atoms_per_batch": 500}])
def test_sampler_resumes_on_other_world_sizes_training_each_conformer_once(ds, worlds, budget):
    """A run killed mid-epoch and resumed (once or more) on another number of ranks: the steps of
    all its parts together use every conformer of the epoch, each once (as one uninterrupted run
    does), and the parts' steps follow on from the saved position."""
    idx = np.arange(0, ds.n_conf, 3)       # a subset that pads no last step

    def make(world, rank):
        return BatchSampler(ds, idx, seed=7, rank=rank, world_size=world, **budget)

    whole = [make(worlds[0], r) for r in range(worlds[0])]
    for s in whole:
        s.set_epoch(2)
    full = sorted(_take([iter(s) for s in whole], len(whole[0])))
    if len(full) != len(set(full)):
        pytest.skip("this subset pads its last step")
    assert full == sorted(idx.tolist())

    used, state = [], None
    for k, world in enumerate(worlds):
        part = [make(world, r) for r in range(world)]
        for s in part:
            s.set_epoch(2) if state is None else s.load_state_dict(state)
        assert len({len(s) for s in part}) == 1
        its = [iter(s) for s in part]
        left = len(part[0]) - part[0].position
        steps = left if k == len(worlds) - 1 else max(1, left // 3)
        used += _take(its, steps)
        state = part[0].state_dict()
    assert sorted(used) == full
