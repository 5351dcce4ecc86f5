"""Self-atomic energies (SAE): a robust linear fit of molecular energies on element counts."""
from __future__ import annotations

import warnings

import numpy as np

from ..constants import ELEMENTS, PERIODIC_TABLE
from ..errors import DataError

#: Conformers per chunk when counting elements (bounds the memory of the atom index).
_CHUNK = 1 << 18


def element_counts(ds, indices=None, elements=ELEMENTS, dtype=np.float64) -> np.ndarray:
    """(n, len(elements)) element counts of conformers ``indices`` (default: all)."""
    elements = [int(z) for z in elements]
    idx = np.arange(ds.n_conf) if indices is None else np.asarray(indices, np.int64)
    lut = np.full(256, -1, np.int64)
    lut[np.asarray(elements)] = np.arange(len(elements))
    k = len(elements)
    out = np.zeros((idx.size, k), dtype)
    for c0 in range(0, idx.size, _CHUNK):
        sub = idx[c0:c0 + _CHUNK]
        start = np.asarray(ds.conf_offsets[sub])
        n = np.asarray(ds.n_atoms[sub])
        tot = int(n.sum())
        first = np.cumsum(n) - n
        atom = np.repeat(start - first, n) + np.arange(tot)
        col = lut[np.asarray(ds.numbers[atom])]
        if (col < 0).any():
            c = int(sub[np.searchsorted(np.cumsum(n), np.flatnonzero(col < 0)[0], side="right")])
            raise DataError(f"element outside {[PERIODIC_TABLE[z] for z in elements]}",
                            *ds.name(c).rsplit(":", 2))
        conf = np.repeat(np.arange(sub.size), n)
        out[c0:c0 + sub.size] = np.bincount(conf * k + col, minlength=sub.size * k).reshape(-1, k)
    return out


def fit_sae(ds, elements=ELEMENTS, indices=None, huber_k: float = 1.345, trim: float = 6.0,
            max_iter: int = 50) -> np.ndarray:
    """Self-atomic energies (len(elements),) float64 Hartree: energy ≈ Σ_element count · SAE.

    Robust: Huber-weighted iteratively reweighted least squares (scale = 1.4826 · MAD of the
    residuals), then an ordinary least-squares refit without conformers whose residual exceeds
    ``trim`` robust standard deviations. Conformers without an energy (NaN) are left out. Elements
    that occur in none of the fitted conformers get 0.0 (with a warning); when the compositions do
    not determine every SAE (e.g. only CH4, NH3, H2O), the minimum-norm solution is returned.
    """
    return fit_sae_rows(ds, elements, indices, huber_k, trim, max_iter, stacklevel=3)[0]


def fit_sae_rows(ds, elements=ELEMENTS, indices=None, huber_k: float = 1.345, trim: float = 6.0,
                 max_iter: int = 50, stacklevel: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``fit_sae`` and the distinct compositions it was fitted on: (sae (k,), rows (m, k) float64
    element counts), for ``checks.check_sae_plausible`` (which SAE the compositions determine)."""
    elements = [int(z) for z in elements]
    idx = np.arange(ds.n_conf) if indices is None else np.asarray(indices, np.int64)
    if "energy" not in ds.labels:
        raise DataError("no energy label to fit self-atomic energies to")
    y = np.asarray(ds.labels["energy"][idx], np.float64)
    ok = np.isfinite(y)
    idx, y = idx[ok], y[ok]
    if idx.size == 0:
        raise DataError("no conformer with an energy to fit self-atomic energies to")
    x = element_counts(ds, idx, elements, dtype=np.int32)
    # Conformers of one composition share a row: solve the normal equations on unique rows. A
    # composition packs into one int64 key (8 bits per element, up to 8 elements, counts < 256;
    # otherwise a row-wise unique), which is much faster than unique over rows.
    if len(elements) <= 8 and x.max(initial=0) < 256:
        shift = 8 * np.arange(len(elements), dtype=np.int64)
        key = np.empty(x.shape[0], np.int64)
        for c0 in range(0, x.shape[0], _CHUNK):
            key[c0:c0 + _CHUNK] = (x[c0:c0 + _CHUNK].astype(np.int64) << shift).sum(axis=1)
        ukey, first, inv = np.unique(key, return_index=True, return_inverse=True)
        rows = x[first].astype(np.float64)
    else:
        rows, inv = np.unique(x, axis=0, return_inverse=True)
        rows = rows.astype(np.float64)
    inv = np.asarray(inv).reshape(-1)
    del x
    present = rows.any(axis=0)
    if not present.all():
        warnings.warn("fit_sae: no data for " + ", ".join(
            PERIODIC_TABLE[z] for z, p in zip(elements, present) if not p) + "; their SAE is 0.0",
            stacklevel=stacklevel)
    xr = rows[:, present]

    def solve(w):
        sw = np.bincount(inv, weights=w, minlength=len(rows))
        swy = np.bincount(inv, weights=w * y, minlength=len(rows))
        a = (xr * sw[:, None]).T @ xr
        b = xr.T @ swy
        # Scale columns to unit diagonal so lstsq's cutoff treats elements alike.
        d = np.sqrt(np.maximum(np.diag(a), 1e-300))
        beta = np.linalg.lstsq(a / d[:, None] / d[None, :], b / d, rcond=1e-12)[0] / d
        return beta, y - (xr @ beta)[inv]

    w = np.ones_like(y)
    beta, r = solve(w)
    for _ in range(max_iter):
        s = max(1.4826 * np.median(np.abs(r - np.median(r))), 1e-8)
        u = np.abs(r) / s
        w = np.where(u <= huber_k, 1.0, huber_k / np.maximum(u, 1e-300))
        beta_new, r = solve(w)
        done = np.max(np.abs(beta_new - beta)) < 1e-10
        beta = beta_new
        if done:
            break
    s = max(1.4826 * np.median(np.abs(r - np.median(r))), 1e-8)
    keep = (np.abs(r) <= trim * s).astype(np.float64)
    beta, _ = solve(keep)
    out = np.zeros(len(elements), np.float64)
    out[present] = beta
    return out, rows


def relative_energy(ds, sae, indices=None, elements=ELEMENTS) -> np.ndarray:
    """(n,) float64 Hartree: energy minus Σ count · SAE (NaN where the energy is missing)."""
    idx = np.arange(ds.n_conf) if indices is None else np.asarray(indices, np.int64)
    return np.asarray(ds.labels["energy"][idx], np.float64) - element_counts(ds, idx, elements) @ sae
