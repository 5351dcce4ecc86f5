"""Packed cache (build chunk by chunk, memory-map, keys), collate, SAE fit and the default set."""
import os

import h5py
import numpy as np
import pytest
import torch

import aimnet_fast.data.readers as readers
from aimnet_fast.constants import ELEMENTS
from aimnet_fast.data import (collate, default_dataset_path, default_sources, fit_sae, load_dataset,
                              relative_energy)
from bench.synthetic import K_HA_PER_A2, load_templates, write_synthetic_ani1x


@pytest.fixture(scope="module")
def synth(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "synthetic_ani1x.h5"
    info = write_synthetic_ani1x(path, load_templates(shared / "data" / "ani1x_sample.h5"),
                                 n_conformers=2003, n_groups=17, seed=1, nan_energy_every=50)
    return path, info


def test_cache_equals_direct_read_and_is_memory_mapped(synth, tmp_path, monkeypatch):
    path, info = synth
    direct = load_dataset(path)
    # small chunks: the cache is built in many pieces that straddle groups
    monkeypatch.setattr(readers, "CHUNK_ATOMS", 200)
    cached = load_dataset(path, cache_dir=tmp_path / "cache")
    assert direct.n_conf == cached.n_conf == info["conformers"]
    assert direct.conf_offsets[-1] == info["atoms"]
    for a, b in [(direct.numbers, cached.numbers), (direct.coord, cached.coord),
                 (direct.conf_offsets, cached.conf_offsets), (direct.group, cached.group),
                 (direct.conf_index, cached.conf_index)]:
        np.testing.assert_array_equal(a, b)
    assert set(direct.labels) == set(cached.labels) == {"energy", "forces", "charges", "volumes"}
    for k in direct.labels:
        np.testing.assert_array_equal(direct.labels[k], cached.labels[k])
    assert isinstance(cached.coord, np.memmap) and isinstance(cached.labels["forces"], np.memmap)
    assert cached.numbers.dtype == np.int64 and cached.coord.dtype == np.float32
    assert cached.labels["energy"].dtype == np.float64
    assert direct.summary() == cached.summary()
    assert cached.summary_dict()["labels"]["energy"]["nan"] == sum(
        len(range(0, n, 50)) for n in np.bincount(direct.group))
    folders = os.listdir(tmp_path / "cache")
    assert len(folders) == 1 and folders[0].startswith("synthetic_ani1x-")
    assert sorted(os.listdir(tmp_path / "cache" / folders[0]))[:3] == ["conf_index.npy", "conf_offsets.npy",
                                                                       "coord.npy"]
    # a second load reuses the cache (no new folder), also when the reader would now fail
    monkeypatch.setattr(readers, "iter_blocks", None)
    again = load_dataset(path, cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == folders and again.n_conf == cached.n_conf


def test_pickle_sends_the_cache_folder_not_the_arrays(synth, tmp_path):
    import pickle
    path, _ = synth
    ds = load_dataset(path, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the folder name only
    back = pickle.loads(blob)
    assert isinstance(back.coord, np.memmap) and back.n_conf == ds.n_conf
    np.testing.assert_array_equal(back.labels["forces"], ds.labels["forces"])
    direct = load_dataset(path)  # in memory: pickled whole
    assert pickle.loads(pickle.dumps(direct)).summary() == direct.summary()


def test_several_sources_share_one_memory_mapped_cache(synth, shared, tmp_path):
    path, _ = synth
    srcs = [{"path": shared / "data" / "ani1x_06r_gdb11_s01.h5", "layout": "06r"},
            {"path": path, "layout": "ani1x"},
            {"path": shared / "data" / "spice_sample.h5", "skip_unknown_elements": True}]
    direct = load_dataset(srcs)
    cached = load_dataset(srcs, cache_dir=tmp_path / "cache")
    assert [f for f in os.listdir(tmp_path / "cache")][0].startswith("ani1x_06r_gdb11_s01+2-")
    assert isinstance(cached.coord, np.memmap) and isinstance(cached.source, np.memmap)
    assert cached.sources == direct.sources == [str(s["path"]) for s in srcs]
    assert np.bincount(cached.source).tolist() == [4366, 2003, 50]
    for a, b in [(direct.numbers, cached.numbers), (direct.coord, cached.coord),
                 (direct.conf_offsets, cached.conf_offsets), (direct.group, cached.group),
                 (direct.source, cached.source), (direct.h5group, cached.h5group)]:
        np.testing.assert_array_equal(a, b)
    assert set(cached.labels) == {"energy", "forces", "charges", "volumes"}
    for k in cached.labels:
        np.testing.assert_array_equal(direct.labels[k], cached.labels[k])
    # volumes only in the synthetic file: NaN elsewhere, counted absent
    a0, a1 = cached.conf_offsets[4366], cached.conf_offsets[4366 + 2003]
    v = np.asarray(cached.labels["volumes"])
    assert np.isfinite(v[a0:a1]).all() and np.isnan(v[:a0]).all() and np.isnan(v[a1:]).all()
    assert cached.summary_dict()["labels"]["volumes"]["absent"] == 4366 + 50
    assert cached.summary() == direct.summary()
    assert cached.name(4366 + 2003).startswith(str(shared / "data" / "spice_sample.h5") + ":103147721:0")
    assert len(cached.group_names) == 3 + 17 + 1 and cached.group.max() == 20


def _build_in_child(path, cache, q):
    try:
        q.put(load_dataset(path, cache_dir=cache).n_conf)
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


def test_ranks_building_the_same_cache_at_once(synth, tmp_path):
    import multiprocessing as mp
    path, info = synth
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(path, tmp_path / "cache", q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [q.get(timeout=5) for _ in procs] == [info["conformers"]] * 2
    assert len(os.listdir(tmp_path / "cache")) == 1  # no temporary folder left behind


def test_cache_key_follows_file_and_property_map(synth, tmp_path):
    path, _ = synth
    cache = tmp_path / "cache"
    load_dataset(path, cache_dir=cache)
    load_dataset([{"path": path, "properties": {"energy": {"key": "wb97x_dz.energy"}}}], cache_dir=cache)
    assert len(os.listdir(cache)) == 2
    copy = tmp_path / "copy.h5"
    copy.write_bytes(path.read_bytes())
    load_dataset(copy, cache_dir=cache)
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "modified": rebuilt
    load_dataset(copy, cache_dir=cache)
    assert len(os.listdir(cache)) == 4


def test_synthetic_labels_consistent(synth):
    """The synthetic file's forces are −∇ of its energies (harmonic model around each template)."""
    path, _ = synth
    ds = load_dataset(path)
    with h5py.File(path, "r") as f:
        g = f[sorted(f)[0]]
        c = 1
        f2 = (g["wb97x_tz.forces"][c].astype(np.float64) ** 2).sum()
        e0 = g["wb97x_tz.energy"][c] - 0.5 * K_HA_PER_A2 * f2 / K_HA_PER_A2 ** 2
    a, b = ds.conf_offsets[c], ds.conf_offsets[c + 1]
    d = -ds.labels["forces"][a:b].astype(np.float64) / K_HA_PER_A2
    assert abs(ds.labels["energy"][c] - (e0 + 0.5 * K_HA_PER_A2 * (d ** 2).sum())) < 1e-9


def test_collate(synth):
    path, _ = synth
    ds = load_dataset(path)
    idx = np.array([5, 0, 1999, 49, 50, 700])
    b = collate(ds, idx)
    n = [int(ds.conf_offsets[i + 1] - ds.conf_offsets[i]) for i in idx]
    assert b.offsets.tolist() == [0] + list(np.cumsum(n)) and b.n_mol == len(idx)
    assert b.mol_sizes.tolist() == n and b.conf_idx.tolist() == idx.tolist()
    assert b.mol_idx.tolist() == sum(([m] * k for m, k in enumerate(n)), [])
    for m, i in enumerate(idx):
        a0, a1 = ds.conf_offsets[i], ds.conf_offsets[i + 1]
        o0, o1 = b.offsets[m], b.offsets[m + 1]
        assert torch.equal(b.numbers[o0:o1], torch.from_numpy(ds.numbers[a0:a1]))
        assert torch.equal(b.coord[o0:o1], torch.from_numpy(ds.coord[a0:a1]))
        assert torch.equal(b.labels["forces"][o0:o1], torch.from_numpy(ds.labels["forces"][a0:a1]))
        e = ds.labels["energy"][i]
        assert b.masks["energy"][m].item() == np.isfinite(e)
        assert b.labels["energy"][m].item() == (e if np.isfinite(e) else 0.0)
    assert b.labels["energy"].dtype == torch.float64 and b.coord.dtype == torch.float32
    assert b.masks["forces"].shape == (b.numbers.shape[0],) and b.masks["forces"].all()
    # every 50th conformer of a group has no energy: conformers 0 and 50 of group 0 (118 conformers)
    assert b.masks["energy"].tolist() == [True, False, True, True, False, True]
    assert b.labels["charges"].shape == b.labels["volumes"].shape == b.numbers.shape
    assert set(b.labels) == set(b.masks) == set(ds.labels)


def test_fit_sae_robust_against_outliers(synth):
    """Energies built from known SAE plus small noise and 3% gross outliers: the fit recovers the SAE."""
    path, _ = synth
    ds = load_dataset(path)
    rng = np.random.default_rng(0)
    true = np.array([-0.6, -38.1, -54.7, -75.2, -398.2, -99.9, -460.2])
    # different compositions are needed: give every conformer its own random element counts
    counts = np.zeros((ds.n_conf, 7))
    z = np.asarray(ds.numbers).copy()
    for c in range(ds.n_conf):
        a, b = ds.conf_offsets[c], ds.conf_offsets[c + 1]
        z[a:b] = rng.choice(ELEMENTS, size=b - a)
        counts[c] = [(z[a:b] == e).sum() for e in ELEMENTS]
    e = counts @ true + rng.normal(0, 0.005, ds.n_conf)
    out = rng.random(ds.n_conf) < 0.03
    e[out] += rng.choice([-1, 1], out.sum()) * rng.uniform(1, 50, out.sum())
    ds.numbers = z
    ds.labels["energy"] = e
    sae = fit_sae(ds)
    np.testing.assert_allclose(sae, true, atol=2e-3)
    ols = np.linalg.lstsq(counts, e, rcond=None)[0]
    assert np.abs(ols - true).max() > 10 * np.abs(sae - true).max()  # plain least squares is thrown off
    rel = relative_energy(ds, sae)
    assert np.median(np.abs(rel[~out])) < 0.01


def test_fit_sae_indices_and_nan(synth):
    path, _ = synth
    ds = load_dataset(path)
    idx = np.arange(0, ds.n_conf, 3)
    sae = fit_sae(ds, indices=idx)
    assert sae.dtype == np.float64 and sae.shape == (7,) and np.isfinite(sae).all()


def test_default_dataset():
    path = default_dataset_path()
    assert path.name == "default.h5" and path.parent.name == "data"
    if not path.exists():
        pytest.skip("the embedded default data set is not built yet")
    ds = load_dataset(default_sources())
    assert ds.n_conf > 0 and {"energy", "forces", "charges"} <= set(ds.labels)
    assert np.isfinite(ds.labels["energy"]).mean() > 0.9
    sums = np.add.reduceat(np.nan_to_num(ds.labels["charges"].astype(np.float64)), ds.conf_offsets[:-1])
    assert np.median(np.abs(sums)) < 0.05  # neutral molecules
