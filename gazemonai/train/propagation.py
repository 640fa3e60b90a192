"""The feature propagation on a GPU: one fused Triton kernel per pass, or ``torch.compile``.

GazeSup's propagation (Zhong et al., MICCAI 2024; :func:`~gazemonai.train.networks.feature_propagation`
defines it) replaces each pixel's value by a weighted average of its ``kernel_size`` x ``kernel_size``
neighbours at ``dilation``, the weights ``softmax_q(max(<f_p, f_q>, 0))`` (neighbours beyond the
border have zero features: similarity 0, still in the softmax, value 0). The CPU implementation
(``"shifted"``, in :mod:`gazemonai.train.networks`) forms one full-size product per neighbour: on a
GPU that is 25 passes over the features forward and 50 backward, all memory traffic.

The implementations here, chosen with ``propagation`` (:class:`~gazemonai.train.networks.MultiLevelNet`):

* ``"fused"`` — :class:`FusedPropagation`, two Triton kernels written as attention is in
  FlashAttention (Dao et al., NeurIPS 2022): the forward pass reads each pixel's features and its
  neighbours' once per tile, keeps a running (online) softmax and writes the output and one
  log-sum-exp per pixel; the backward pass recomputes the similarities from the features and
  gathers every gradient at the pixel it belongs to (the neighbour ``q + d``'s share of ``q``'s
  gradient comes from its own similarity with ``q``, which is symmetric), so it needs no atomics, no
  25-fold tensor and no per-neighbour product in memory. Saved for backward: the inputs, the output
  and the log-sum-exp. 2-D maps; any strides (channels-last too); float32, bfloat16 and float16
  inputs, float32 arithmetic (float64 for float64 inputs). CUDA; on a CPU only under Triton's
  interpreter (``TRITON_INTERPRET=1``, slow: for tests).
* ``"compiled"`` — :func:`compiled_feature_propagation`, a functional formulation (zero padding,
  shifted slices, softmax, weighted sum) that ``torch.compile`` fuses, forward and backward
  (TorchInductor's generated Triton on a GPU, C++ on a CPU).
* ``"shifted"`` — the CPU implementation, unchanged.
* ``"auto"`` (the default) — ``"fused"`` for a 2-D map on a CUDA device when Triton is installed,
  otherwise ``"shifted"``: a CPU never gets a GPU trick, a GPU user gets the kernel without asking.

``benchmarks/propagation.py`` measures each against the others (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from ..errors import InvalidInputError

__all__ = [
    "PROPAGATIONS",
    "check_propagation",
    "FusedPropagation",
    "fused_feature_propagation",
    "compiled_feature_propagation",
    "propagation_by_shifts",
    "resolve_propagation",
    "triton_available",
]

#: the settings of ``propagation``
PROPAGATIONS = ("auto", "shifted", "fused", "compiled")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (CUDA builds of torch ship it; CPU builds do not)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_propagation(impl: str) -> str:
    """``impl`` if it is one of :data:`PROPAGATIONS` and can run here at all, else a clear error.

    ``"fused"`` needs Triton installed (checked here, so a config fails when the network is built, not
    at the first propagation); whether the tensors are on a CUDA device is checked when it runs.
    """
    if impl not in PROPAGATIONS:
        raise InvalidInputError(f"propagation must be one of {PROPAGATIONS}, got {impl!r}")
    if impl == "fused" and not triton_available():
        raise InvalidInputError(
            "propagation 'fused' needs Triton (a CUDA build of torch ships it; `pip install triton`), "
            "which is not installed: use propagation 'auto' or 'shifted'"
        )
    return impl


def resolve_propagation(impl: str, feat: torch.Tensor) -> str:
    """The implementation that runs for ``feat``: ``"shifted"``, ``"fused"`` or ``"compiled"``.

    ``"auto"`` is ``"fused"`` for a 2-D map on a CUDA device with Triton installed, else ``"shifted"``.

    Raises:
        InvalidInputError: an unknown setting, or ``"fused"`` where it cannot run (no Triton, a 3-D
            map, a tensor not on a CUDA device outside Triton's interpreter).
    """
    check_propagation(impl)
    if impl == "auto":
        return "fused" if feat.is_cuda and feat.dim() == 4 and triton_available() else "shifted"
    if impl == "fused":
        if feat.dim() != 4:
            raise InvalidInputError(
                f"propagation 'fused' propagates 2-D maps (B, C, H, W), got shape {tuple(feat.shape)}: "
                f"use propagation 'auto' or 'shifted' for 3-D"
            )
        if not feat.is_cuda and not _interpreting():
            raise InvalidInputError(
                f"propagation 'fused' runs on a CUDA device (the tensors are on {feat.device}); on a CPU "
                f"only under Triton's interpreter (TRITON_INTERPRET=1, for tests): use 'auto' or 'shifted'"
            )
    return impl


# ----------------------------------------------------------------------------------------------------
# the Triton kernels


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The two kernels, built on first use (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates).

    Cached per interpreter mode, so a test process that sets ``TRITON_INTERPRET=1`` gets interpreted
    kernels. On a GPU each kernel is autotuned over four pixel-block sizes per shape; in
    the interpreter one configuration is used (tiles of 128 pixels).
    """
    import triton
    import triton.language as tl

    def tuned(fn):
        if interpret:
            return fn
        configs = [  # few: each is compiled once per shape and dtype
            triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in ((16, 4), (32, 4), (64, 8), (128, 8))
        ]
        return triton.autotune(configs, key=["C", "CV", "H", "W", "K", "DIL"])(fn)

    @tuned
    @triton.jit
    def forward_kernel(
        F, V, OUT, LSE,
        sfb, sfc, sfh, sfw, svb, svc, svh, svw, sob, soc, soh, sow,
        C, CV, H, W,
        K: tl.constexpr, DIL: tl.constexpr, SAME: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs < H * W
        h = offs // W
        w = offs % W
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        cv = tl.arange(0, BLOCK_CV)
        cvmask = cv < CV
        fbase = F + b * sfb + c[:, None] * sfc
        vbase = V + b * svb + cv[:, None] * svc
        fq = tl.load(
            fbase + h[None, :] * sfh + w[None, :] * sfw, mask=cmask[:, None] & pmask[None, :], other=0.0
        )
        fq = fq.to(ACC)
        # online softmax: the similarities are >= 0 (clamped), so 0 is a valid starting maximum
        m = tl.zeros([BLOCK_P], dtype=ACC)
        den = tl.zeros([BLOCK_P], dtype=ACC)
        acc = tl.zeros([BLOCK_CV, BLOCK_P], dtype=ACC)
        for k in range(K * K):  # a loop, not unrolled: 25 unrolled neighbours took minutes to compile
            hn = h + ((k // K) * DIL - (K // 2) * DIL)
            wn = w + ((k % K) * DIL - (K // 2) * DIL)
            nmask = pmask & (hn >= 0) & (hn < H) & (wn >= 0) & (wn < W)
            fn = tl.load(
                fbase + hn[None, :] * sfh + wn[None, :] * sfw,
                mask=cmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(ACC)
            s = tl.maximum(tl.sum(fq * fn, axis=0), 0.0)  # beyond the border: 0, still in the softmax
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            if SAME:
                vn = fn
            else:
                vn = tl.load(
                    vbase + hn[None, :] * svh + wn[None, :] * svw,
                    mask=cvmask[:, None] & nmask[None, :],
                    other=0.0,
                ).to(ACC)
            acc = acc * alpha[None, :] + e[None, :] * vn
            den = den * alpha + e
            m = m_new
        out = acc / den[None, :]
        obase = OUT + b * sob + cv[:, None] * soc
        tl.store(
            obase + h[None, :] * soh + w[None, :] * sow,
            out.to(OUT.dtype.element_ty),
            mask=cvmask[:, None] & pmask[None, :],
        )
        tl.store(LSE + b * H * W + offs, m + tl.log(den), mask=pmask)

    @tuned
    @triton.jit
    def backward_kernel(
        F, V, G, LSE, D, GF, GV,
        sfb, sfc, sfh, sfw, svb, svc, svh, svw, sgb, sgc, sgh, sgw,
        C, CV, H, W,
        K: tl.constexpr, DIL: tl.constexpr, SAME: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        # For pixel q and each displacement d, with n = q + d and s = <f_q, f_n> (the same number is
        # n's similarity with its neighbour q at -d):
        #   q as centre:     w = exp(max(s,0) - lse_q), ds = w (<g_q, v_n> - D_q) [s > 0]; df_q += ds f_n
        #   n as centre:     w' = exp(max(s,0) - lse_n), ds' = w' (<g_n, v_q> - D_n) [s > 0];
        #                    df_q += ds' f_n, dv_q += w' g_n
        # where D_p = <g_p, out_p> = sum_k w_k <g_p, v_k> (the softmax's backward).
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs < H * W
        h = offs // W
        w = offs % W
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        cv = tl.arange(0, BLOCK_CV)
        cvmask = cv < CV
        fbase = F + b * sfb + c[:, None] * sfc
        vbase = V + b * svb + cv[:, None] * svc
        gbase = G + b * sgb + cv[:, None] * sgc
        qmask = cmask[:, None] & pmask[None, :]
        qvmask = cvmask[:, None] & pmask[None, :]
        fq = tl.load(fbase + h[None, :] * sfh + w[None, :] * sfw, mask=qmask, other=0.0).to(ACC)
        if SAME:
            vq = fq
        else:
            vq = tl.load(vbase + h[None, :] * svh + w[None, :] * svw, mask=qvmask, other=0.0).to(ACC)
        gq = tl.load(gbase + h[None, :] * sgh + w[None, :] * sgw, mask=qvmask, other=0.0).to(ACC)
        lse_q = tl.load(LSE + b * H * W + offs, mask=pmask, other=0.0)
        d_q = tl.load(D + b * H * W + offs, mask=pmask, other=0.0)
        gf = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        gv = tl.zeros([BLOCK_CV, BLOCK_P], dtype=ACC)
        for k in range(K * K):  # a loop, not unrolled: 25 unrolled neighbours took minutes to compile
            hn = h + ((k // K) * DIL - (K // 2) * DIL)
            wn = w + ((k % K) * DIL - (K // 2) * DIL)
            nmask = pmask & (hn >= 0) & (hn < H) & (wn >= 0) & (wn < W)
            fn = tl.load(
                fbase + hn[None, :] * sfh + wn[None, :] * sfw,
                mask=cmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(ACC)
            if SAME:
                vn = fn
            else:
                vn = tl.load(
                    vbase + hn[None, :] * svh + wn[None, :] * svw,
                    mask=cvmask[:, None] & nmask[None, :],
                    other=0.0,
                ).to(ACC)
            gn = tl.load(
                gbase + hn[None, :] * sgh + wn[None, :] * sgw,
                mask=cvmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(ACC)
            noff = hn * W + wn
            lse_n = tl.load(LSE + b * H * W + noff, mask=nmask, other=0.0)
            d_n = tl.load(D + b * H * W + noff, mask=nmask, other=0.0)
            s = tl.sum(fq * fn, axis=0)
            pos = s > 0.0
            sc = tl.maximum(s, 0.0)
            w_c = tl.exp(sc - lse_q)
            ds_c = tl.where(pos, w_c * (tl.sum(gq * vn, axis=0) - d_q), 0.0)
            w_n = tl.where(nmask, tl.exp(sc - lse_n), 0.0)
            ds_n = tl.where(pos & nmask, w_n * (tl.sum(gn * vq, axis=0) - d_n), 0.0)
            gf += (ds_c + ds_n)[None, :] * fn
            gv += w_n[None, :] * gn
        if SAME:
            gf += gv
        else:
            tl.store(
                GV + b * svb + cv[:, None] * svc + h[None, :] * svh + w[None, :] * svw,
                gv.to(GV.dtype.element_ty),
                mask=qvmask,
            )
        tl.store(
            GF + b * sfb + c[:, None] * sfc + h[None, :] * sfh + w[None, :] * sfw,
            gf.to(GF.dtype.element_ty),
            mask=qmask,
        )

    return forward_kernel, backward_kernel, triton.next_power_of_2, triton.cdiv, tl.float32, tl.float64


def _launch(kernel, args, b: int, h: int, w: int, interpret: bool, cdiv, **meta):
    if interpret:  # NumPy runs one program at a time: few programs, large tiles
        meta["BLOCK_P"] = 128
        kernel[(cdiv(h * w, 128), b)](*args, **meta)
    else:
        kernel[lambda m: (cdiv(h * w, m["BLOCK_P"]), b)](*args, **meta)


class FusedPropagation(torch.autograd.Function):
    """The propagation in two Triton kernels, forward and backward (see the module).

    ``apply(feat, values, kernel_size, dilation)``; ``values`` None averages the features themselves.
    """

    @staticmethod
    def forward(ctx, feat: torch.Tensor, values: torch.Tensor | None, kernel_size: int, dilation: int):
        interpret = _interpreting()
        fwd, _, pow2, cdiv, f32, f64 = _kernels(interpret)
        same = values is None
        v = feat if same else values
        b, c, h, w = feat.shape
        cv = v.shape[1]
        out = torch.empty_like(v)  # keeps v's memory format: no copy of a channels-last map
        # float32 arithmetic (float64 for float64 inputs: gradcheck)
        wide = feat.dtype == torch.float64
        lse = torch.empty((b, h, w), dtype=torch.float64 if wide else torch.float32, device=feat.device)
        args = (feat, v, out, lse, *feat.stride(), *v.stride(), *out.stride(), c, cv, h, w)
        meta = dict(K=kernel_size, DIL=dilation, SAME=same, ACC=f64 if wide else f32)
        meta.update(BLOCK_C=pow2(c), BLOCK_CV=pow2(cv))
        _launch(fwd, args, b, h, w, interpret, cdiv, **meta)
        ctx.save_for_backward(feat, values, out, lse)
        ctx.conf = (kernel_size, dilation)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        feat, values, out, lse = ctx.saved_tensors
        kernel_size, dilation = ctx.conf
        interpret = _interpreting()
        _, bwd, pow2, cdiv, f32, f64 = _kernels(interpret)
        same = values is None
        v = feat if same else values
        b, c, h, w = feat.shape
        cv = v.shape[1]
        # D_p = <g_p, out_p>: the softmax's backward needs sum_k w_k <g_p, v_k>, which is this
        d = torch.einsum("bchw,bchw->bhw", grad_out.to(lse.dtype), out.to(lse.dtype)).contiguous()
        grad_feat = torch.empty_like(feat)
        grad_v = grad_feat if same else torch.empty_like(values)
        if grad_v.stride() != v.stride() or grad_feat.stride() != feat.stride():
            raise RuntimeError("empty_like did not keep the inputs' strides (non-dense input)")
        args = (feat, v, grad_out, lse, d, grad_feat, grad_v, *feat.stride(), *v.stride(), *grad_out.stride())
        meta = dict(K=kernel_size, DIL=dilation, SAME=same, ACC=f64 if lse.dtype == torch.float64 else f32)
        meta.update(BLOCK_C=pow2(c), BLOCK_CV=pow2(cv))
        _launch(bwd, args + (c, cv, h, w), b, h, w, interpret, cdiv, **meta)
        return grad_feat, None if same else grad_v, None, None


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its strides are those of a dense layout (NCHW or channels-last), else a copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def fused_feature_propagation(
    feat: torch.Tensor, kernel_size: int = 5, dilation: int = 2, values: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`~gazemonai.train.networks.feature_propagation` by :class:`FusedPropagation` (2-D maps).

    Arguments as there. Raises :class:`~gazemonai.errors.InvalidInputError` where the kernel cannot run.
    In a compiled network (``torch.compile``) the kernels run as they are, behind a graph break.
    """
    resolve_propagation("fused", feat)
    return _not_compiled()(feat, kernel_size, dilation, values)


@functools.lru_cache(maxsize=1)
def _not_compiled():
    # built on first use: torch.compiler.disable imports torch._dynamo, which imports triton where it is
    # installed (~100 MB resident), and a CPU process that never propagates on a GPU needs neither
    return torch.compiler.disable(_apply_fused)


def _apply_fused(feat, kernel_size, dilation, values):
    return FusedPropagation.apply(
        _dense(feat), None if values is None else _dense(values), kernel_size, dilation
    )


# ----------------------------------------------------------------------------------------------------
# the formulation for torch.compile


def propagation_by_shifts(
    feat: torch.Tensor, kernel_size: int = 5, dilation: int = 2, values: torch.Tensor | None = None
) -> torch.Tensor:
    """The propagation as plain tensor operations on shifted slices of the zero-padded map (2-D or 3-D).

    Run eagerly it materialises every product (the slowest form; a test reference); compiled
    (:func:`compiled_feature_propagation`), TorchInductor fuses each product into its reduction and
    derives the backward pass. Arguments as :func:`~gazemonai.train.networks.feature_propagation`.
    """
    v = feat if values is None else values
    spatial = feat.shape[2:]
    r = (kernel_size // 2) * dilation
    fp = nn.functional.pad(feat, (r, r) * len(spatial))
    vp = fp if values is None else nn.functional.pad(v, (r, r) * len(spatial))
    offsets = [()]
    for _ in spatial:
        offsets = [o + (s,) for o in offsets for s in range(0, 2 * r + 1, dilation)]

    def window(x, off):
        return x[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, spatial))]

    sim = torch.stack([(feat * window(fp, off)).sum(1) for off in offsets], dim=1)
    weight = torch.softmax(sim.clamp(min=0), dim=1)
    out = weight[:, :1] * window(vp, offsets[0])
    for k in range(1, len(offsets)):
        out = out + weight[:, k : k + 1] * window(vp, offsets[k])
    return out


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(propagation_by_shifts, fullgraph=True, dynamic=False)


def compiled_feature_propagation(
    feat: torch.Tensor, kernel_size: int = 5, dilation: int = 2, values: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`propagation_by_shifts` through ``torch.compile`` (compiled once per shape and setting)."""
    return _compiled()(feat, kernel_size, dilation, values)
