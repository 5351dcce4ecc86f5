"""The fast CPU backend's native kernels (``cpu_native.c``): the centre sum of the AEV
contractions and its backward, the AEV terms, the ELU and the MLPs' matrix products at few rows,
in C compiled on first use by the machine's C compiler.

Why: torch composes the centre sum from gathers, padded rows, batched 16 × 16 products and an
``index_add``, each a pass over memory; the C loop keeps an atom's 16 × 16 sums in vector
registers while its terms stream past (an S66x8 batch's angular sum with its backward: 2.5 ms
against 10.6 ms through torch, bench/RESULTS.md). The products (``matmul``) take weights packed
once (``pack_panels``): MKL packs them again at every call, which at a small molecule's 21 rows
cost it a third of its speed.

The library is built once per machine and source into a cache directory (``AIMNET_FAST_CACHE``,
else ``$XDG_CACHE_HOME/aimnet_fast``, else ``~/.cache/aimnet_fast``) with ``-O3 -march=native``,
keyed by the source, the compiler, its flags and the CPU's model and instruction-set flags (a home
directory shared by different nodes never hands one CPU another's instructions). Where there is no
compiler (``$CC``, else ``cc``), it fails, or ``AIMNET_FAST_NATIVE=0`` is set, ``library()`` is
None and the backend uses its torch code instead (a warning says why, once, where it failed).

This module holds no math: it checks what it is given, allocates the outputs and calls the C.
Shapes: terms (T, C) with C a multiple of 16, feat (K, 16), ptr (N + 1,) int64 where each atom's
terms start (the terms sorted by centre atom), feat_index (T,) int64 rows of feat.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().with_name("cpu_native.c")  # absolute: it includes __FILE__
#: No -ffast-math: the C sums in a fixed order and keeps IEEE semantics (FMA contraction allowed).
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
LIBS = ("-lm",)
#: Tried first: the loops on torch's OpenMP threads (see cpu_native.c); without it where the
#: compiler has no OpenMP (one thread).
OPENMP = ("-fopenmp",)
#: Features per row the kernels handle (one vector), and the channel group they step by.
WIDTH = 16

#: Where outputs are allocated (tests replace it to fill them with NaN first).
_empty = torch.empty

_FUNCTIONS = {
    "centre_sum": ("p", "i", "p", "p", "p", "i", "p"),
    "centre_sum_backward": ("p", "i", "p", "i", "p", "p", "i", "p", "i", "p", "i", "i", "i",
                            "p"),
    "radial_terms": ("p", "p", "i", "p", "r", "r", "r", "p"),
    "radial_terms_backward": ("p", "i", "p", "i", "p", "r", "r", "r", "p", "i", "i", "p"),
    "angular_terms": ("p", "p", "i", "p", "p", "r", "r", "r", "r", "p"),
    "angular_terms_backward": ("p", "i", "p", "i", "p", "p", "r", "r", "r", "r", "p", "i", "i", "p"),
}
_OTHERS = {"elu_f32": (("p", "i", "f"), None), "csr_offsets": (("p", "i", "i", "p"), "i"),
           "out_of_range": (("p", "i", "i"), "i"), "triplet_count": (("p", "i"), "i"),
           "triplets_from_pairs": (("p", "i", "p", "i"), None),
           "unique_pairs": (("p", "i", "i", "p", "p", "p"), "i"),
           "pack_panels_f32": (("p", "i", "i", "i", "i", "p"), None),
           "matmul_f32": (("p", "i", "i", "i", "p", "i", "p", "i", "f", "p", "i"), None)}
_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


def _cache_dir() -> Path:
    if os.environ.get("AIMNET_FAST_CACHE"):
        return Path(os.environ["AIMNET_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aimnet_fast"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in text.splitlines()
             if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(lines))  # each distinct line once (one per core otherwise)


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC", "cc").split()
    return cc if cc and shutil.which(cc[0]) else None


def _build(cc: list[str]) -> Path:
    """The library's path, compiled into the cache unless already there: with OpenMP, or
    without where that fails."""
    # what the library depends on besides its flags: read once for both tries
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    identity = "\0".join([SOURCE.read_text(), " ".join(cc), version, platform.machine(),
                          _cpu_identity()])
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            return _build_with(cc, flags, identity)
        except RuntimeError as err:
            errors.append(str(err))
    raise RuntimeError("\n".join(errors))


def _build_with(cc: list[str], flags: tuple[str, ...], identity: str) -> Path:
    key = hashlib.sha256(f"{identity}\0{' '.join(flags + LIBS)}".encode()).hexdigest()[:20]
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"aimnet_fast-{os.getuid()}"
        cache.mkdir(exist_ok=True)
    path = cache / f"cpu_native-{key}.so"
    if path.exists():
        return path
    # compiled beside and renamed into place: processes starting together (torchrun) never load a
    # half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, *LIBS], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} {' '.join(flags)} failed on {SOURCE}:\n"
                               f"{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be had (see the module's docstring)."""
    if os.environ.get("AIMNET_FAST_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        kinds = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}
        # "r": a real number of the function's own precision
        functions = {name + suffix: ([kinds.get(a) or real for a in args], None)
                     for name, args in _FUNCTIONS.items()
                     for suffix, real in (("_f32", ctypes.c_float), ("_f64", ctypes.c_double))}
        functions.update({name: ([kinds[a] for a in args], kinds.get(result))
                          for name, (args, result) in _OTHERS.items()})
        for name, (argtypes, restype) in functions.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = restype
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
        warnings.warn(f"aimnet_fast: the cpu backend's native kernels are not available ({err}); "
                      "using its torch code instead (slower, same results)", RuntimeWarning,
                      stacklevel=2)
        return None
    return lib


def supports(terms: torch.Tensor, feat: torch.Tensor) -> bool:
    """Whether the kernels take these inputs (CPU, float32 or float64, 16 features, channels in
    groups of 16) and are available."""
    return (terms.device.type == "cpu" and terms.dtype in _SUFFIX and feat.dtype == terms.dtype
            and terms.dim() == 2 and terms.shape[1] % WIDTH == 0 and feat.dim() == 2
            and feat.shape[1] == WIDTH and library() is not None)


@functools.cache
def _function(name: str):
    """``library()``'s function ``name`` (looked up once; tests that rebuild the library clear
    this cache with ``library``'s)."""
    return getattr(library(), name)


def _call(name: str, *args):
    """The C function ``name`` on ``args``, tensors passed as their data pointers (None: NULL).
    A 21-atom molecule makes ~60 of these calls: the function is looked up once."""
    return _function(name)(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])


def centre_sum(terms: torch.Tensor, feat: torch.Tensor, ptr: torch.Tensor,
               feat_index: torch.Tensor) -> torch.Tensor:
    """out[i, c, f] = Σ_{t in ptr[i] .. ptr[i+1]-1} terms[t, c] · feat[feat_index[t], f] → (N, C, 16)."""
    terms, feat = terms.contiguous(), feat.contiguous()
    n_atoms, C = ptr.numel() - 1, terms.shape[1]
    out = _empty(n_atoms, C, WIDTH, dtype=terms.dtype)
    _call("centre_sum" + _SUFFIX[terms.dtype], terms, C, feat, ptr, feat_index, n_atoms, out)
    return out


def centre_sum_backward(terms: torch.Tensor, feat: torch.Tensor, ptr: torch.Tensor,
                        feat_index: torch.Tensor, grad_out: torch.Tensor, need_terms: bool,
                        need_feat: bool, by_channel: bool = False,
                        into: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d terms (T, C) and d feat (K, 16) of ``centre_sum`` from d out (N, C, 16), each None when
    not needed. ``by_channel``: d terms as the transposed view of a contiguous (C, T) tensor.
    ``into``: d terms are added to this (T, C) tensor (any strides), which is returned, instead
    of written to a new one (several passes' sums without a tensor each)."""
    terms, feat = terms.contiguous(), feat.contiguous()
    n_atoms, (T, C) = ptr.numel() - 1, terms.shape
    if grad_out.stride()[1:] != (WIDTH, 1):  # atoms may lie apart: no copy for a column slice
        grad_out = grad_out.contiguous()
    d_terms = None
    if into is not None:
        if not need_terms or into.shape != terms.shape or into.dtype != terms.dtype:
            raise ValueError(f"centre_sum_backward: into {tuple(into.shape)} {into.dtype} for "
                             f"terms {tuple(terms.shape)} {terms.dtype}")
        d_terms = into
    elif need_terms:
        d_terms = _empty(C, T, dtype=terms.dtype).t() if by_channel \
            else _empty(T, C, dtype=terms.dtype)
    if not need_feat and d_terms is None:
        return None, None
    d_feat = torch.zeros(feat.shape, dtype=feat.dtype) if need_feat else None
    st, sc = d_terms.stride() if d_terms is not None else (0, 0)
    _call("centre_sum_backward" + _SUFFIX[terms.dtype], terms, C, feat, feat.shape[0], ptr,
          feat_index, n_atoms, grad_out, grad_out.stride(0), d_terms, st, sc, into is not None,
          d_feat)  # None: NULL, not computed
    return d_terms, d_feat


def radial_terms(coord: torch.Tensor, pairs: torch.Tensor, shifts: torch.Tensor, eta: float,
                 cutoff: float, exp_floor: float) -> torch.Tensor:
    """g (P, 16) of the pairs (2, P) at coord (N, 3) Å: exp(−η (d − shift)², floored at
    ``exp_floor``) · fc(d), the terms of ``cpu_aev.RadialTerms`` (``shifts`` (16,) Å, η 1/Å²,
    cutoff Å)."""
    coord, pairs = coord.contiguous(), pairs.contiguous()
    g = _empty(pairs.shape[1], shifts.numel(), dtype=coord.dtype)
    _call("radial_terms" + _SUFFIX[coord.dtype], coord, pairs, pairs.shape[1], shifts, eta, cutoff,
          exp_floor, g)
    return g


def radial_terms_backward(coord: torch.Tensor, pairs: torch.Tensor, shifts: torch.Tensor,
                          eta: float, cutoff: float, exp_floor: float,
                          d_g: torch.Tensor) -> torch.Tensor:
    """d coord (N, 3) from d g (P, 16) of ``radial_terms`` (any strides)."""
    coord, pairs = coord.contiguous(), pairs.contiguous()
    d_coord = torch.zeros_like(coord)
    _call("radial_terms_backward" + _SUFFIX[coord.dtype], coord, coord.shape[0], pairs,
          pairs.shape[1], shifts, eta, cutoff, exp_floor, d_g, *d_g.stride(), d_coord)
    return d_coord


def angular_terms(coord: torch.Tensor, triplets: torch.Tensor, sectors: torch.Tensor,
                  shifts: torch.Tensor, eta: float, cutoff: float, cos_clamp: float,
                  scale: float) -> torch.Tensor:
    """g (T, 32) of the triplets (3, T) at coord (N, 3) Å, the terms of
    ``cpu_aev.AngularTerms``: ``sectors`` (8, 2) cos and sin of θ_z, ``shifts`` (4,) Å, η 1/Å²,
    cutoff Å, cos θ clamped to ±``cos_clamp``, ``scale`` 2^(1−ζ) with ζ = 8."""
    coord, triplets = coord.contiguous(), triplets.contiguous()
    g = _empty(triplets.shape[1], sectors.shape[0] * shifts.numel(), dtype=coord.dtype)
    _call("angular_terms" + _SUFFIX[coord.dtype], coord, triplets, triplets.shape[1], sectors,
          shifts, eta, cutoff, cos_clamp, scale, g)
    return g


def angular_terms_backward(coord: torch.Tensor, triplets: torch.Tensor, sectors: torch.Tensor,
                           shifts: torch.Tensor, eta: float, cutoff: float, cos_clamp: float,
                           scale: float, d_g: torch.Tensor) -> torch.Tensor:
    """d coord (N, 3) from d g (T, 32) of ``angular_terms`` (any strides)."""
    coord, triplets = coord.contiguous(), triplets.contiguous()
    d_coord = torch.zeros_like(coord)
    _call("angular_terms_backward" + _SUFFIX[coord.dtype], coord, coord.shape[0], triplets,
          triplets.shape[1], sectors, shifts, eta, cutoff, cos_clamp, scale, d_g, *d_g.stride(),
          d_coord)
    return d_coord


def csr_offsets(centre: torch.Tensor, n_atoms: int) -> torch.Tensor | None:
    """ptr (n_atoms + 1,) int64, where each atom's terms start, for terms with centre atoms
    ``centre`` (T,) int64; None where the centres are not sorted; ValueError where one lies
    outside [0, n_atoms)."""
    centre = centre.contiguous()
    ptr = _empty(n_atoms + 1, dtype=torch.int64)
    status = _call("csr_offsets", centre, centre.numel(), n_atoms, ptr)
    if status == 2:
        raise ValueError(f"term indices out of range: centres in [0, {n_atoms})")
    return ptr if status == 0 else None


def out_of_range(index: torch.Tensor, bound: int) -> bool:
    """Whether any int64 index lies outside [0, bound)."""
    index = index.contiguous()
    return bool(_call("out_of_range", index, index.numel(), bound))


def triplets_and_pairs(angular: torch.Tensor, n_atoms: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From pairs (2, P_a) int64 sorted by i then j (indices below n_atoms): ``triplets`` (3, T)
    (i; j < k) in the order (i, j, k), the unique (j, k) ``pairs`` (2, Q) sorted by j then k, and
    ``triplet_pair`` (T,): ``neighbors.triplets_from_pairs`` and ``neighbors.unique_pairs``."""
    angular = angular.contiguous()
    n_pairs = angular.shape[1]
    n = _call("triplet_count", angular, n_pairs)
    triplets = _empty(3, n, dtype=torch.int64)
    _call("triplets_from_pairs", angular, n_pairs, triplets, n)
    work = _empty(2 * n_atoms + 1 + n, dtype=torch.int64)
    out = _empty(2, n, dtype=torch.int64)
    triplet_pair = _empty(n, dtype=torch.int64)
    q = _call("unique_pairs", triplets, n, n_atoms, work, out, triplet_pair)
    return triplets, out[:, :q].contiguous(), triplet_pair


#: Columns per panel of ``pack_panels``.
PANEL = 32


def pack_panels(b: torch.Tensor) -> torch.Tensor:
    """B (K, N) float32, any strides, packed for ``matmul``: (ceil(N / 32), K, 32), zeros past
    column N."""
    K, N = b.shape
    packed = _empty(-(-N // PANEL), K, PANEL, dtype=torch.float32)
    _call("pack_panels_f32", b, K, N, *b.stride(), packed)
    return packed


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
           elu_alpha: float | None = None) -> torch.Tensor:
    """x (M, K) float32 (rows any distance apart) @ B (K, n) (+ bias (n,)) → (M, n), B as
    ``pack_panels(B)`` gave it; then the ELU with ``elu_alpha`` (as ``elu_``) where given."""
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    M, K = x.shape
    if packed.shape[1] != K or packed.shape[0] * PANEL < n or (bias is not None and (
            bias.shape != (n,) or not bias.is_contiguous())):
        raise ValueError(f"matmul: x {tuple(x.shape)}, packed {tuple(packed.shape)}, n {n}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    out = _empty(M, n, dtype=torch.float32)
    _call("matmul_f32", x, M, K, max(x.stride(0), 1), packed, n, bias, elu_alpha is not None,
          0.0 if elu_alpha is None else elu_alpha, out, n)
    return out


def elu_(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x = ELU(x) in place, float32 contiguous CPU x (else ``F.elu``'s in-place ELU); returns x.
    expm1 here is within 0.9 ulp of the exact value, torch's within 1.0 (tests/test_cpu_native.py)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() \
            or library() is None:
        return torch.nn.functional.elu(x, alpha, inplace=True)
    _call("elu_f32", x, x.numel(), alpha)
    return x
