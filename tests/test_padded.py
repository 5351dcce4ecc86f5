"""Fixed-shape batches and neighbor lists (``aimnet_fast.padded``) against the reference search and
the unpadded model: the same lists in their first slots, ghosts after; the same energies, forces,
loss and parameter gradients; overflow flagged, never a silent truncation; and no host sync, which
FakeTensorMode proves on the CPU (it has no values: any op that needs one raises)."""

import pytest
import torch

from aimnet_fast.batch import Batch
from aimnet_fast.constants import ANGULAR_CUTOFF_A, RADIAL_CUTOFF_A
from aimnet_fast.model import AIMNet
from aimnet_fast.neighbors import build_neighbors
from aimnet_fast.padded import Capacity, build_neighbors_padded, pad_batch
from aimnet_fast.train.config import LossConfig
from aimnet_fast.train.loss import loss_fn


def _random_batch(seed, sizes, dtype=torch.float64, labels=True):
    """Molecules of ``sizes`` atoms of H C N O, 1.2 Å apart at least, with labels and some masked."""
    g = torch.Generator().manual_seed(seed)
    mols = []
    for n in sizes:
        pts = []
        while len(pts) < n:
            p = torch.rand(3, generator=g, dtype=torch.float64) * (2.0 + n ** (1 / 3) * 1.6)
            if all(float((p - q).norm()) > 1.2 for q in pts):
                pts.append(p)
        numbers = torch.tensor([1, 6, 7, 8])[torch.randint(0, 4, (n,), generator=g)]
        mols.append((numbers, torch.stack(pts)))
    b = Batch.from_molecules(mols, dtype=dtype)
    if labels:
        n, m = b.n_atoms, b.n_mol
        b.labels = {"energy": torch.randn(m, generator=g, dtype=torch.float64) - 40.0,
                    "forces": torch.randn(n, 3, generator=g, dtype=torch.float64).float() * 0.05,
                    "charges": torch.randn(n, generator=g, dtype=torch.float64).float() * 0.3}
        b.masks = {"energy": torch.rand(m, generator=g) > 0.2,
                   "forces": torch.rand(n, generator=g) > 0.2}
    return b


def _padded_lists(b, cap=None):
    cap = cap or Capacity.for_batch(b)
    pb, pad = pad_batch(b, cap)
    nb, counts = build_neighbors_padded(pb.coord, pb.mol_idx, pb.offsets, cap, pad.ghosts)
    return pb, pad.ghosts, cap, nb, counts


def _check_lists(b, pb, ghosts, cap, nb, counts):
    ref = build_neighbors(b.coord, b.mol_idx)
    c = counts.host()
    assert not c["overflow"]
    expected = {"radial": cap.pairs, "angular": cap.angular, "triplets": cap.triplets,
                "pairs": cap.unique_pairs}
    for field, width in expected.items():
        got, want = getattr(nb, field), getattr(ref, field)
        assert got.shape[1] == width                          # fixed by the capacities alone
        torch.testing.assert_close(got[:, :want.shape[1]], want, rtol=0, atol=0)
    assert [c["pairs"], c["angular"], c["triplets"], c["unique_pairs"]] == [
        ref.radial.shape[1], ref.angular.shape[1], ref.triplets.shape[1], ref.pairs.shape[1]]
    T = ref.triplets.shape[1]
    torch.testing.assert_close(nb.triplet_pair[:T], ref.triplet_pair, rtol=0, atol=0)
    # The padding: ghosts only, out of every cutoff, after every real entry.
    x = pb.coord.double()
    g1, g2, g3 = ghosts
    for lst, n_real in ((nb.radial, c["pairs"]), (nb.angular, c["angular"])):
        pad = lst[:, n_real:]
        assert set(pad.flatten().tolist()) <= {g1, g2}
        assert bool((pad[0] != pad[1]).all())
        d = (x[pad[1]] - x[pad[0]]).norm(dim=1)
        assert bool((d > RADIAL_CUTOFF_A).all())
        assert bool((lst[0, 1:] >= lst[0, :-1]).all())             # sorted by centre
        keys = sorted((lst[0] * pb.n_atoms + lst[1]).tolist())     # both directions
        assert keys == sorted((lst[1] * pb.n_atoms + lst[0]).tolist())
    pad_t = nb.triplets[:, T:]
    assert bool((pad_t == torch.tensor([[g1], [g2], [g3]])).all())
    assert bool(((x[pad_t[1]] - x[pad_t[0]]).norm(dim=1) > ANGULAR_CUTOFF_A).all())
    Q = ref.pairs.shape[1]
    assert bool((nb.triplet_pair[T:] == Q).all()) if T < cap.triplets else True
    assert bool((nb.pairs[:, Q:] == torch.tensor([[g2], [g3]])).all())


def test_padded_lists_are_the_reference_lists_then_ghosts_on_real_molecules(reference_molecules):
    for dtype in (torch.float32, torch.float64):
        b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules],
                                 dtype=dtype)
        _check_lists(b, *_padded_lists(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_lists_on_random_molecules_with_lone_atoms(seed):
    """Sizes from 1 atom (no neighbors at all) to 40, in float32, where the angular subset is
    decided in the coordinates' dtype."""
    b = _random_batch(seed, (1, 7, 2, 40, 1, 13, 25), dtype=torch.float32, labels=False)
    _check_lists(b, *_padded_lists(b))


def test_padded_lists_with_no_triplets_or_no_pairs_at_all():
    """Only lone atoms (every list empty: all padding), and one diatomic (pairs, no triplets)."""
    for sizes in ((1, 1, 1), (2,)):
        b = _random_batch(9, sizes, labels=False)
        _check_lists(b, *_padded_lists(b))


def test_overflow_is_flagged_and_grown_capacities_hold_the_lists():
    b = _random_batch(3, (12, 30, 9), labels=False)
    full = Capacity.for_batch(b)
    for field in ("pairs", "angular", "triplets", "unique_pairs"):
        small = Capacity(**{**full.__dict__, field: 8})
        *_, counts = _padded_lists(b, small)
        c = counts.host()
        assert c["overflow"], field
        grown = small.grown(counts)
        _check_lists(b, *_padded_lists(b, grown))


def test_pad_batch_refuses_what_does_not_fit_and_masks_the_ghosts():
    b = _random_batch(4, (5, 6))
    cap = Capacity.for_batch(b)
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(b, Capacity(**{**cap.__dict__, "atoms": b.n_atoms + 2}))
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(b, Capacity(**{**cap.__dict__, "max_atoms": 5}))
    pb, pad = pad_batch(b, cap)
    assert (pb.n_atoms, pb.n_mol) == (cap.atoms, cap.molecules)
    assert (pad.n_atoms, pad.n_mol) == (b.n_atoms, b.n_mol)
    assert bool((pb.mol_sizes > 0).all())        # no empty ghost molecule (0/0 in the loss)
    for name, mask in pb.masks.items():
        n_real = b.n_mol if name == "energy" else b.n_atoms
        assert not bool(mask[n_real:].any())
        torch.testing.assert_close(mask[:n_real], b.masks.get(name, torch.ones(n_real, dtype=torch.bool)))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_padded_batch_gives_the_unpadded_energies_forces_loss_and_gradients(backend):
    """Float64, a force loss (double backward) on every target: the real molecules' outputs and
    every parameter gradient equal the unpadded batch's to rounding. The Triton kernels (the
    GPU path, here interpreted) see the ghost padding too."""
    torch.manual_seed(0)
    model = AIMNet(backend=backend).double()
    small = backend == "triton"    # the interpreter: few atoms, tight capacities
    b = _random_batch(5, (3, 6, 1, 5) if small else (3, 11, 1, 24, 8, 17))
    cfg = LossConfig(forces=True)
    targets = ["energy", "charges", "forces"]
    cap = Capacity.for_batch(b, atoms_round=8, molecules_round=2, pairs_per_atom=12,
                             angular_per_atom=8, triplets_per_atom=12, unique_per_atom=8) \
        if small else Capacity.for_batch(b)
    pb, pad = pad_batch(b, cap)

    def run(batch, neighbors):
        model.zero_grad(set_to_none=True)
        coord = batch.coord.detach().requires_grad_(True)
        out = model(batch.numbers, coord, batch.mol_idx, batch.n_mol, neighbors=neighbors)
        (grad,) = torch.autograd.grad(out["energy"].sum(), coord, create_graph=True)
        loss = loss_fn(out, batch, cfg, targets, -grad)
        loss.backward()
        return out, -grad, loss.detach(), [None if p.grad is None else p.grad.clone()
                                          for p in model.parameters()]

    out0, f0, loss0, grads0 = run(b, None)
    nb, counts = build_neighbors_padded(pb.coord, pb.mol_idx, pb.offsets, pad.cap, pad.ghosts)
    assert not counts.host()["overflow"]
    out1, f1, loss1, grads1 = run(pb, nb)
    n, m = b.n_atoms, b.n_mol
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out1["energy"][:m], out0["energy"], **tol)
    torch.testing.assert_close(out1["charges"][:n], out0["charges"], **tol)
    torch.testing.assert_close(f1[:n], f0, **tol)
    torch.testing.assert_close(loss1, loss0, **tol)
    assert sum(g is not None for g in grads0) > 20
    for g0, g1 in zip(grads0, grads1):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g1, g0, **tol)


def test_no_host_sync_and_no_data_dependent_shape():
    """The padded search, and a forward + loss + backward on its lists, run under FakeTensorMode:
    tensors there have shapes but no values, so ``.item()``, ``bool(t)``, a boolean-mask index,
    ``torch.unique`` or ``nonzero`` would raise. Every output's shape follows from the capacities."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    b = _random_batch(6, (4, 9, 15), dtype=torch.float32)
    cap = Capacity.for_batch(b)
    pb, pad = pad_batch(b, cap)
    model = AIMNet(backend="torch")
    cfg = LossConfig()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fb = pb._map(mode.from_tensor)
        nb, counts = build_neighbors_padded(fb.coord, fb.mol_idx, fb.offsets, cap, pad.ghosts)
        out = model(fb.numbers, fb.coord, fb.mol_idx, fb.n_mol, neighbors=nb)
        loss = loss_fn(out, fb, cfg, ["energy", "charges"])
        loss.backward()
        assert nb.triplets.shape == (3, cap.triplets) and nb.pairs.shape == (2, cap.unique_pairs)
        assert out["energy"].shape == (cap.molecules,)
        assert counts.overflow.shape == ()
        # The control: the reference search sizes its lists on the host, and is caught.
        with pytest.raises(DataDependentOutputException):
            build_neighbors(fb.coord, fb.mol_idx)


def test_static_shapes_training_equals_plain_training_through_overflows(tmp_path, monkeypatch, capsys):
    """``static_shapes=true``: a float64 run with forces, T = 1 then T = 3, whose first capacities
    are far too small (every list overflows, the steps are redone), ends with the parameters of
    the same run without padding; the run says that it grew them."""
    from aimnet_fast import padded
    from aimnet_fast.train import config as C
    from aimnet_fast.train import trainer as T
    small = ["data.max_conformers=40", "data.mols_per_batch=4", "max_steps_per_epoch=3",
             "num_threads=1", "tensorboard=false", "device=cpu", "dtype=float64", "plot=false",
             "loss.forces=true", "curriculum=[{n_pass: 1, epochs: 1}, {n_pass: 3, epochs: 1}]",
             "deterministic=true"]
    plain = T.Trainer(C.load_config(None, small + [f"run_dir={tmp_path / 'plain'}"]))
    plain.fit()
    real = padded.Capacity.for_batch.__func__
    monkeypatch.setattr(padded.Capacity, "for_batch", classmethod(
        lambda cls, b, **kw: real(cls, b, pairs_per_atom=1, angular_per_atom=1,
                                  triplets_per_atom=1, unique_per_atom=1)))
    static = T.Trainer(C.load_config(None, small + [f"run_dir={tmp_path / 'static'}",
                                                    "static_shapes=true"]))
    static.fit()
    assert "padded lists overflowed: capacities grown" in capsys.readouterr().out
    assert static.state.bad_steps == 0 and static.state.global_step == plain.state.global_step
    for (name, a), b in zip(plain.model.named_parameters(), static.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
