"""The fast CPU backend's ELU MLPs: the reference's ``nn.Sequential`` (Linear–ELU–…) run layer by
layer with the ELU in place on each matrix product's fresh output.

In place, the ELU writes over the product instead of allocating a second activation, and autograd
keeps only its output, from which the ELU's derivative follows (out + 1 where out ≤ 0): a
molecule's saved activations shrink by the ELU inputs (in the pair MLP 400 of ~860 floats per
unique pair and pass), which a large molecule otherwise pays for in fresh pages (bench/RESULTS.md).
Autograd differentiates every step, twice for force training, exactly as the reference's.

Inside ``first_order()`` (prediction: forces by one backward, frozen weights), an MLP whose input
needs a gradient and whose weights do not is one autograd Function instead (``FirstOrderMLP``):
it keeps the same ELU outputs, and its backward writes each ELU's derivative over the gradient its
own matrix product has just made, where autograd would allocate another activation-sized tensor;
a large molecule's backward then takes a third less memory. Its backward cannot be differentiated
again (it would need the input, which it does not keep): a double backward inside ``first_order``
raises an error instead.

Where no graph records the ELU (``FirstOrderMLP``'s forward, or gradients off), it is the native
one (``cpu_native.elu_``: expm1 ~4× cheaper per element than torch's, within 0.9 ulp).

Where no graph is kept (inside ``first_order()`` as above, or with gradients off), a float32
input goes through the layers in blocks of ``BLOCK_ROWS`` (then ``SMALL_BLOCKS``) rows, the
products of each block's large layers by oneDNN (torch's ``mkldnn._linear_pointwise``), which ran
them 10-20 % faster than ``addmm`` (MKL) on the 2-core AMD CPU. The rows left over (all of a
small molecule's) go to the native products (``cpu_native.matmul``, weights packed once,
``_packed``; the ELU in their epilogue), ~1.5× MKL's speed at 21 rows; small layers, float64 and
every graph autograd keeps use ``addmm``. Float32 sums in another order: against
the original's outputs the predict path stays within 1.6e-7 Ha and 7.2e-7 Ha/Å
(tests/test_reference_outputs.py; with ``addmm`` alone 1.4e-7 Ha and 7.1e-7 Ha/Å).

Shapes: x (M, in) → (M, out); ``elu_mlp_cat`` takes the first layer's input in two parts.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from typing import Iterator, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_native
from .index_memo import IndexMemo

_FIRST_ORDER = contextvars.ContextVar("aimnet_fast_first_order", default=False)


@contextlib.contextmanager
def first_order() -> Iterator[None]:
    """Within this block, gradients of the MLPs are taken once and never differentiated again
    (``torch.autograd.grad`` without ``create_graph``), e.g. forces for prediction."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


#: Rows of one oneDNN block (``FirstOrderMLP``): every block of every call has this shape, so
#: oneDNN builds each layer's primitive once per process. A primitive for a new row count took
#: ~1.6 ms to build on the 2-core CPU, more than a batch's products gained from it.
BLOCK_ROWS = 2048
#: Smaller blocks for what whole ``BLOCK_ROWS`` blocks leave, largest first (each one more
#: primitive per layer, built once); fewer rows than the smallest go to ``addmm``.
SMALL_BLOCKS = (512,)
#: Layers with fewer weights stay with ``addmm`` inside the blocks too: for 32→256, 128→128 and
#: 128→16 oneDNN was no faster (its ~20 µs a call weighs more than the product gains).
ONEDNN_MIN_WEIGHTS = 256 * 128


@functools.cache
def _onednn_linear():
    """torch's oneDNN linear, ``(x, weight, bias) -> x @ weight.T + bias`` in float32, where this
    build has it and it gives a known product; else None (the blocks then use ``addmm``).

    Why: on the 2-core AMD EPYC CPU the MLPs' products ran at ~135-150 GFLOP/s through ``addmm``
    (MKL) and ~160-185 through oneDNN's own kernels (bench/RESULTS.md)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
        got = op(x, w, torch.tensor([0.5, -1.0]), "none", [], "")
        if not torch.equal(got, torch.tensor([[0.5, 2.0], [3.5, 8.0]])):
            return None
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return lambda h, weight, bias: op(h, weight, bias, "none", [], "")


def in_first_order() -> bool:
    """Whether the caller is inside ``first_order()``."""
    return _FIRST_ORDER.get()


def refuse_double_backward(what: str) -> None:
    """For the backwards of the cpu backend's first-order Functions (``what``: which), whose
    results are not differentiable: an error where autograd is asked to differentiate them."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"a double backward through the cpu backend's {what} inside "
                           "aimnet_fast.ops.first_order(): take create_graph gradients outside "
                           "that block")


class Step(NamedTuple):
    """One Linear of an MLP (its parameters as they are now) and the ELU after it, if any."""
    linear: nn.Linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    elu: nn.ELU | None


#: An MLP's steps, per ``nn.Sequential``: working them out again at every call (module types,
#: parameters through ``nn.Module.__getattr__``) cost ~100 µs of a 21-row MLP's ~250 µs.
_STEPS: "weakref.WeakKeyDictionary[nn.Sequential, tuple[tuple, tuple[Step, ...] | None]]" = \
    weakref.WeakKeyDictionary()


def mlp_steps(layers: nn.Sequential) -> tuple[Step, ...] | None:
    """The layers as Linear steps, each with the ELU after it; None where they are anything else
    (then run as the ``nn.Sequential`` itself). Remembered per Sequential while its modules and
    their parameters are the same objects."""
    modules = tuple(layers._modules.values())
    cached = _STEPS.get(layers)
    if cached is not None and cached[0] == modules and (cached[1] is None or all(
            s.linear._parameters["weight"] is s.weight and s.linear._parameters["bias"] is s.bias
            for s in cached[1])):
        return cached[1]
    out: list[Step] | None = []
    for m in modules:
        if type(m) is nn.Linear:
            out.append(Step(m, m.weight, m.bias, None))
        elif type(m) is nn.ELU and out and out[-1].elu is None:
            out[-1] = out[-1]._replace(elu=m)
        else:
            out = None
            break
    steps = None if out is None else tuple(out)
    _STEPS[layers] = (modules, steps)
    return steps


def frozen(steps: tuple[Step, ...], dtype: torch.dtype | None = None) -> bool:
    """Whether no weight or bias of the steps needs a gradient (and, given ``dtype``, each is of
    that dtype)."""
    return all(p is None or not p.requires_grad and (dtype is None or p.dtype == dtype)
               for s in steps for p in (s.weight, s.bias))


class Tape(NamedTuple):
    """What an MLP's input gradient needs of its forward (``forward_kept``): the steps, the row
    blocks (``_blocks``) and the ELU outputs, block after block; where the first layer's are not
    kept (None), its input x, to make them again."""
    steps: tuple[Step, ...]
    blocks: list
    elu_outputs: tuple[torch.Tensor | None, ...]
    x: torch.Tensor | None = None


def forward_kept(x: torch.Tensor, steps: tuple[Step, ...],
                 recompute_first: bool = False) -> tuple[torch.Tensor, Tape]:
    """The MLP ``steps`` on x (M, in) → (M, out), with the ``Tape`` of its input gradient
    (``input_grad``). No graph is recorded: call it with gradients off or inside an autograd
    Function. A float32 input goes through the layers block by block (``_blocks``), the large
    layers' products by oneDNN (``_onednn_linear``); the rows left over, and every other input, by
    ``addmm``. Rows are independent in an MLP, so blocks change only the order of summation.

    ``recompute_first``: keep x instead of the first layer's ELU outputs, and make those again
    in ``input_grad`` (the same products on the same blocks: the same values). For a wide first
    layer on a narrow input, as the pair MLP's 32 → 256, that keeps an eighth of the floats."""
    kept: list[torch.Tensor] = []
    blocks, h = _in_blocks(x, steps, kept)
    if not recompute_first or steps[0].elu is None:
        return h, Tape(steps, blocks, tuple(kept))
    n_elu = len(kept) // len(blocks)
    for k in range(len(blocks)):
        kept[k * n_elu] = None
    return h, Tape(steps, blocks, tuple(kept), x)


def input_grad(tape: Tape, grad: torch.Tensor) -> torch.Tensor:
    """d x (M, in) of ``forward_kept`` from d out (M, out), the weights frozen: each ELU's
    derivative (out + 1 where out ≤ 0, from the kept output) written over the gradient its own
    product has just made."""
    n_elu = len(tape.elu_outputs) // len(tape.blocks)
    outs = []
    for k, (a, b, linear) in enumerate(tape.blocks):
        g = grad if len(tape.blocks) == 1 else grad[a:b]
        own = False  # whether g is a tensor made here (then safe to overwrite)
        elu_outputs = list(tape.elu_outputs[k * n_elu:(k + 1) * n_elu])
        for step in reversed(tape.steps):
            if step.elu is not None:
                out = elu_outputs.pop()
                if out is None:  # the first layer's, made again (``recompute_first``)
                    with torch.no_grad():
                        out = _layer_by_layer(tape.x[a:b], tape.steps[:1], None, linear)
                if own:
                    torch.ops.aten.elu_backward.grad_input(g, step.elu.alpha, 1, 1, True, out,
                                                          grad_input=g)
                else:
                    g = torch.ops.aten.elu_backward(g, step.elu.alpha, 1, 1, True, out)
            if linear is not None and step.weight.numel() >= ONEDNN_MIN_WEIGHTS:
                g = linear(g.contiguous(), _transposed(step.weight), None)
            elif _native_product(g, step.weight):
                g = cpu_native.matmul(g, _packed(step.weight, "d_input"), step.weight.shape[1])
            else:
                g = g.mm(step.weight)
            own = True
        outs.append(g)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class FirstOrderMLP(torch.autograd.Function):
    """The MLP ``steps`` on x with frozen weights (``forward_kept``); backward gives the input's
    gradient only (``input_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, steps: tuple[Step, ...]) -> torch.Tensor:
        h, tape = forward_kept(x, steps)
        ctx.save_for_backward(*tape.elu_outputs)
        ctx.steps, ctx.blocks = steps, tape.blocks
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        refuse_double_backward("MLPs")
        return input_grad(Tape(ctx.steps, ctx.blocks, ctx.saved_tensors), grad), None


#: Weights transposed for oneDNN's dX = dY @ W, which takes W as (in, out): made once per weight
#: (a fresh copy whenever it changes in place), not at every backward (a 768 × 512 weight took
#: ~0.8 ms a copy, ~30 ms of the S66x8 ×4 command).
_TRANSPOSED = IndexMemo()


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    got = _TRANSPOSED.get(weight)
    if got is None:
        with torch.no_grad():
            got = _TRANSPOSED.put(weight, weight.t().contiguous())
    return got


#: Weights packed for ``cpu_native.matmul``, made once per weight (a fresh copy whenever it
#: changes in place): tag "forward" packs Wᵀ (x @ Wᵀ), "d_input" packs W (dY @ W).
_PACKED = IndexMemo()


def _packed(weight: torch.Tensor, tag: str) -> torch.Tensor:
    got = _PACKED.get(weight, tag)
    if got is None:
        with torch.no_grad():
            got = _PACKED.put(weight, cpu_native.pack_panels(
                weight.t() if tag == "forward" else weight), tag)
    return got


def _native_product(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> bool:
    """Whether x's product with this weight is ``cpu_native.matmul``'s: no graph recorded,
    float32 CPU tensors, a weight with at least ``ONEDNN_MIN_WEIGHTS`` entries (for smaller ones
    the call's fixed cost outweighs the gain) that needs no gradient, and the kernels built. Where
    oneDNN takes the rows (whole blocks) it keeps them: ~1.5× MKL's speed at 21 rows, within
    ~10 % of both at 700.

    Frozen weights only, because their packed copy is kept (``_packed``) while the weight's
    version counter is unchanged: torch's fused Adam changes the weights it trains in place
    without counting a version (torch 2.13), so a trained weight's copy would go stale between
    the validations of a training run."""
    return (not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.dtype == torch.float32 and not weight.requires_grad
            and weight.numel() >= ONEDNN_MIN_WEIGHTS
            and (bias is None or bias.dtype == torch.float32)
            and cpu_native.library() is not None)


def _in_blocks(x: torch.Tensor, steps: tuple[Step, ...], kept: list[torch.Tensor] | None = None):
    """The steps on x block by block (see ``forward_kept``); ``kept`` collects the ELU outputs,
    block after block. Returns the blocks (``_blocks``) and the output."""
    n = x.shape[0]
    linear = (_onednn_linear() if n >= min(BLOCK_ROWS, *SMALL_BLOCKS) and x.dtype == torch.float32
              and x.device.type == "cpu" and torch.backends.mkldnn.enabled  # the user may switch
              else None)                                                     # oneDNN off
    blocks = _blocks(n, linear)
    if len(blocks) == 1:
        return blocks, _layer_by_layer(x, steps, kept, blocks[0][2])
    outs = [_layer_by_layer(x[a:b], steps, kept, block_linear) for a, b, block_linear in blocks]
    return blocks, torch.cat(outs)


def _blocks(n: int, linear) -> list[tuple[int, int, object]]:
    """Row ranges (a, b) with the linear of their products: whole blocks of ``BLOCK_ROWS``, then
    of each ``SMALL_BLOCKS`` size, with ``linear``; then the rows left over (if any), or all n rows
    where ``linear`` is None, with None (``addmm``)."""
    out: list[tuple[int, int, object]] = []
    a = 0
    if linear is not None:
        for size in (BLOCK_ROWS, *SMALL_BLOCKS):
            while n - a >= size:
                out.append((a, a + size, linear))
                a += size
    if a < n or not out:
        out.append((a, n, None))
    return out


def _layer_by_layer(h: torch.Tensor, steps: tuple[Step, ...], kept: list[torch.Tensor] | None = None,
                    linear=None) -> torch.Tensor:
    """The steps on h, each ELU in place on its product; ``kept`` collects the ELU outputs;
    ``linear`` (``_onednn_linear()``), if given, makes the products of layers with at least
    ``ONEDNN_MIN_WEIGHTS`` weights, ``addmm`` the others."""
    for step in steps:
        if linear is not None and step.weight.numel() >= ONEDNN_MIN_WEIGHTS:
            h = linear(h.contiguous(), step.weight, step.bias)
        elif _native_product(h, step.weight, step.bias):  # the ELU in its epilogue
            h = cpu_native.matmul(h, _packed(step.weight, "forward"), step.weight.shape[0],
                                  step.bias, None if step.elu is None else step.elu.alpha)
            if step.elu is not None and kept is not None:
                kept.append(h)
            continue
        else:  # addmm, one dispatched operation where .t() and addmm were two
            h = F.linear(h, step.weight, step.bias)
        if step.elu is not None:
            # The product's output is fresh and nothing else saved it: safe to overwrite. Where
            # no graph records it (no grad, or FirstOrderMLP's forward), the native ELU.
            h = F.elu(h, step.elu.alpha, inplace=True) if torch.is_grad_enabled() \
                else cpu_native.elu_(h, step.elu.alpha)
            if kept is not None:
                kept.append(h)
    return h


def _run(h: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    mlp = mlp_steps(layers)
    if mlp is None:
        return layers(h)
    if not torch.is_grad_enabled():  # e.g. energies alone: no graph to keep
        return _in_blocks(h, mlp)[1]
    if h.requires_grad and _FIRST_ORDER.get() and frozen(mlp):
        return FirstOrderMLP.apply(h, mlp)
    return _layer_by_layer(h, mlp)


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, precision: str = "ieee") -> torch.Tensor:
    """``layers(x)``; ``precision`` is the Triton kernels' and has no meaning here."""
    return _run(x, layers)


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential,
                precision: str = "ieee") -> torch.Tensor:
    """``layers(torch.cat([x1, x2], 1))``."""
    return _run(torch.cat([x1, x2], dim=1), layers)
