"""Spectral norms of linear layers: guaranteed upper bounds for certificates, estimates for training.

Two families, kept apart by name (STYLE.md, "sound by name"):

* ``*_sigma_upper`` -- proven upper bounds on the l2 operator norm ``sigma(A)``, computed in
  float64 / complex128 and multiplied by ``1 + SAFETY``. These may feed a certificate.

  - dense (``Linear``): exact SVD (:func:`dense_sigma_upper`);
  - convolution, up to ``EXACT_MAX_DIM`` coordinates on the operator's smaller side: the
    true norm, certified (:func:`exact_sigma_upper`: float64 Gram matrix, then a Cholesky
    factorisation of ``s I - G`` proves ``sigma^2 <= s`` with rounding errors bounded);
  - larger convolutions (:func:`conv_sigma_upper`): the zero-padded (and strided, dilated, grouped)
    convolution is a compression of a stride-1 circular convolution on a grid large enough
    that no kept output wraps; the circular operator is block-diagonal in the Fourier
    basis, and each Fourier block is bounded from above by Gram iteration (Delattre et al.,
    ICML 2023; :func:`gram_sigma_upper`). Layers whose matrix has at most ``2**20``
    entries (small feature maps, where the circular embedding is loosest) are materialised
    and get the exact SVD instead.

* ``power_iteration_`` / ``sigma_estimate`` -- warm-started power iteration on ``A^T A`` for
  any linear callable. The value ``||A u|| / ||u||`` never exceeds ``sigma(A)``: it is an
  *under*-estimate, good for a training loss, never for a certificate.

:func:`explicit_matrix` materialises small linear maps for tests.

Floating point budget behind ``SAFETY``: every guaranteed bound is computed in float64 from
weights that are exactly representable in float64. The rounding of the kernel FFT (relative
error about ``u * log2(M) * sqrt(M * min(Cout, Cin'))`` of the top singular value, with
``u = 2**-53``), of the Gram products (each squaring perturbs ``sigma^(2^t)`` by a relative
``~ m^1.5 * u``, which enters the final bound divided by ``2^t``) and of LAPACK's backward
stable SVD (relative ``~ max(m, n) * u``) are all below ``1e-10`` for any layer that fits in
memory; ``SAFETY = 1e-6`` covers them with four orders of magnitude to spare.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "SAFETY",
    "EXACT_MAX_DIM",
    "conv_sigma_upper",
    "conv_transpose_output_size",
    "conv_transpose_sigma_upper",
    "dense_sigma_upper",
    "exact_sigma_upper",
    "explicit_matrix",
    "gram_sigma_upper",
    "power_iteration_",
    "sigma_estimate",
]

SAFETY: float = 1e-6
"""Relative safety factor: every guaranteed bound is multiplied by ``1 + SAFETY`` exactly once."""

EXACT_MAX_DIM: int = 8192
"""Convolutions whose smaller side (input or output size) has at most this many coordinates get
:func:`exact_sigma_upper` (the true norm to about 1e-5, certified) instead of the circular bound."""

LinearFn = Callable[[torch.Tensor], torch.Tensor]

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_CONV_T = {
    1: torch.nn.functional.conv_transpose1d,
    2: torch.nn.functional.conv_transpose2d,
    3: torch.nn.functional.conv_transpose3d,
}


# --------------------------------------------------------------------------------------------
# Guaranteed upper bounds
# --------------------------------------------------------------------------------------------


def dense_sigma_upper(weight: torch.Tensor) -> torch.Tensor:
    """Guaranteed upper bound on ``||W||_2`` for a 2-D weight ``(out, in)``: float64 SVD times ``1 + SAFETY``.

    LAPACK's SVD is backward stable, so the computed top singular value is within a relative
    ``O(max(out, in) * 2**-53)`` of the true one; ``SAFETY`` dominates that by orders of
    magnitude. Returns a 0-dim float64 tensor on ``weight.device``; no gradient flows.
    """
    if weight.dim() != 2:
        raise ValueError(f"dense_sigma_upper expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    with torch.no_grad():
        w = weight.detach().to(torch.float64)
        if w.numel() == 0:
            return w.new_zeros(())
        return torch.linalg.matrix_norm(w, ord=2) * (1.0 + SAFETY)


def gram_sigma_upper(mats: torch.Tensor, n_iter: int = 12) -> torch.Tensor:
    """Guaranteed upper bound on the spectral norm of every matrix in a batch ``(..., m, n)``, real or complex.

    Gram iteration (Delattre et al., ICML 2023). With ``X_0 = A`` and ``X_{t+1} = X_t^H X_t``,
    ``sigma(X_t) = sigma(A)^(2^t)`` and ``sigma <= ||.||_F``, so for every t

        sigma(A) <= ||X_t||_F^(1 / 2^t) = (sum_i sigma_i^(2^(t+1)))^(1 / 2^(t+1)),

    which decreases to ``sigma(A)`` as ``t`` grows: after ``T`` squarings the ratio to the
    truth is at most ``rank^(1 / 2^(T+1))`` (``1.0005`` for rank 64 and ``T = 12``) and much
    smaller when ``sigma_1`` is well separated. The first squaring is taken on the smaller
    side (``A A^H`` if ``m <= n``), which has the same non-zero spectrum.

    To avoid overflow each iterate is rescaled to unit Frobenius norm, ``H_t = X_t / c_t``,
    and ``r_t = log(c_t) / 2^t`` is tracked: ``r_{t+1} = r_t + log(||H_t^H H_t||_F) / 2^(t+1)``.
    ``||H_t^H H_t||_F >= 1 / sqrt(m)`` for a unit-Frobenius matrix, so nothing underflows either.

    Computed in float64 / complex128; the result (shape ``...``, float64) already includes
    the factor ``1 + SAFETY``, so callers must not apply it again. All-zero matrices give 0.
    No gradient flows.
    """
    if mats.dim() < 2:
        raise ValueError(f"gram_sigma_upper expects (..., m, n), got shape {tuple(mats.shape)}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    with torch.no_grad():
        x = mats.detach()
        x = x.to(torch.complex128 if x.is_complex() else torch.float64)
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            return torch.zeros(x.shape[:-2], dtype=torch.float64, device=x.device)
        if x.shape[-2] > x.shape[-1]:
            x = x.mH  # same singular values; makes the first Gram product the small one
        fro = torch.linalg.matrix_norm(x, ord="fro")
        is_zero = fro == 0
        fro = torch.where(is_zero, torch.ones_like(fro), fro)
        h = x / fro[..., None, None]
        log_bound = torch.log(fro)  # r_0: sigma(A) <= ||A||_F
        for t in range(n_iter):
            # First product on the small side (A A^H), then X^H X of a Hermitian matrix.
            h = h @ h.mH if t == 0 else h.mH @ h
            f = torch.linalg.matrix_norm(h, ord="fro")
            h = h / f[..., None, None]
            log_bound = log_bound + torch.log(f) / 2.0 ** (t + 1)
        bound = torch.exp(log_bound) * (1.0 + SAFETY)
        return torch.where(is_zero, torch.zeros_like(bound), bound)


_UNIT_ROUNDOFF = 2.0**-53


def _gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: the relative error bound of a k-term float64 dot product."""
    ku = k * _UNIT_ROUNDOFF
    if ku >= 0.5:
        raise ValueError(f"gamma_{k} is not small: dimension too large for the float64 error analysis")
    return ku / (1.0 - ku)


def _gram_matrix(linear_fn: LinearFn, in_shape: Sequence[int], dtype, device, chunk: int,
                 reach: Sequence[int] | None = None) -> tuple:
    """``(G, in, out)``: ``A^T A`` or ``A A^T`` (the smaller one) of a linear map.

    Columns of ``G`` are images of impulses: ``A^T (A e)`` (input side) or ``A (A^T e)``
    (output side, the adjoint taken as a vector-Jacobian product). Shapes are ``(C, *spatial)``
    on either side. ``reach`` (per spatial dim of the smaller side, optional) states that
    ``G`` is *structurally* zero between positions further apart than that (no product of
    two non-zero entries of ``A`` connects them: e.g. ``kernel extent - 1`` on the input side
    of a convolution). Impulses of one channel ``2 reach + 1`` apart then have disjoint
    columns, so one probe carries a whole lattice of them and each output position belongs to
    the one impulse within ``reach`` of it. Without ``reach``, one impulse per probe.
    """
    x0 = torch.zeros(1, *in_shape, dtype=dtype, device=device)
    out_shape = tuple(linear_fn(x0).shape[1:])
    n_in, n_out = x0.numel(), math.prod(out_shape)
    side = tuple(in_shape) if n_in <= n_out else out_shape
    channels, spatial = side[0], side[1:]
    d, per_channel = math.prod(side), math.prod(spatial)
    if reach is None:
        reach = spatial  # never reached: one impulse per probe
    if len(reach) != len(spatial):
        raise ValueError(f"reach {tuple(reach)} does not match the spatial shape {spatial}")
    spacing = tuple(min(2 * r + 1, n) for r, n in zip(reach, spatial))

    # owner[o][q]: flat spatial index of the impulse (lattice offset o) within reach of q, or -1
    owners = []
    for offset in itertools.product(*(range(sp) for sp in spacing)):
        per_dim = []
        for o, sp, n, r in zip(offset, spacing, spatial, reach):
            q = torch.arange(n, device=device)
            a = o + sp * torch.div(q - o + sp // 2, sp, rounding_mode="floor")  # nearest lattice point
            a = a.clamp(min=o, max=o + sp * ((n - 1 - o) // sp))  # ... among those inside [0, n)
            ok = (q - a).abs() <= r
            per_dim.append(torch.where(ok, a, torch.full_like(a, -1)))
        if not per_dim:  # no spatial dims (a dense layer): one position
            owners.append(torch.zeros(1, dtype=torch.long, device=device))
            continue
        grids = torch.meshgrid(*per_dim, indexing="ij")
        valid = torch.stack([g >= 0 for g in grids]).all(0)
        flat = torch.zeros(spatial, dtype=torch.long, device=device)
        for g, n in zip(grids, spatial):
            flat = flat * n + g.clamp(min=0)
        owners.append(torch.where(valid, flat, torch.full_like(flat, -1)).reshape(-1))
    heads = [torch.unique(owner[owner >= 0]) for owner in owners]  # the impulses of each lattice
    probes = [(c, k) for c in range(channels) for k in range(len(owners))]

    gram = torch.zeros(d, d, dtype=dtype, device=device)
    rows_all = torch.arange(d, device=device).reshape(channels, per_channel)
    for start in range(0, len(probes), chunk):
        batch = probes[start:start + chunk]
        basis = torch.zeros(len(batch), channels, per_channel, dtype=dtype, device=device)
        for b, (c, k) in enumerate(batch):
            basis[b, c, heads[k]] = 1.0
        basis = basis.reshape(len(batch), *side)
        if n_in <= n_out:  # A^T (A e)
            image, vjp_fn = torch.func.vjp(linear_fn, basis)
            (cols,) = vjp_fn(image)
        else:  # A (A^T e); the vjp of a linear map is A^T at any point
            _, vjp_fn = torch.func.vjp(linear_fn, torch.zeros(len(batch), *in_shape, dtype=dtype, device=device))
            (pre,) = vjp_fn(basis)
            cols = linear_fn(pre)
        cols = cols.reshape(len(batch), channels, per_channel)
        for b, (c, k) in enumerate(batch):
            owner = owners[k]
            keep = owner >= 0
            # G[row (c', q), column (c, owner(q))] = image[c', q]
            gram[rows_all[:, keep], (c * per_channel + owner[keep]).expand(channels, -1)] = cols[b][:, keep]
    return gram, n_in, n_out


def _lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], dtype, device,
                 max_steps: int = 600, check_every: int = 24, rtol: float = 1e-10) -> float:
    """Largest Ritz value of a symmetric positive semi-definite map: a lower estimate of its top eigenvalue.

    Lanczos with full reorthogonalisation from a fixed pseudo-random start (reproducible), stopped
    when the top Ritz value moves by less than ``rtol`` (relative) over ``check_every`` steps, when
    the Krylov space is exhausted, or after ``max_steps``. ``matvec`` maps ``(1, *shape)`` to
    ``(1, *shape)``. Each step costs one product with the map (a convolution and its adjoint:
    far cheaper than a product with the dense Gram matrix) and ``O(steps * n)`` for the
    reorthogonalisation. The operators here have clustered top singular values (neighbouring
    frequencies), so convergence takes ~100-200 steps; an estimate is all it is: the caller's
    Cholesky certificate does not rest on it.
    """
    n = math.prod(shape)
    steps = min(max_steps, n)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, generator=gen, dtype=dtype).to(device)
    q /= q.norm()
    basis = torch.zeros(steps, n, dtype=dtype, device=device)
    alpha = torch.zeros(steps, dtype=dtype, device=device)
    beta = torch.zeros(steps, dtype=dtype, device=device)
    previous = -math.inf
    top = 0.0
    for j in range(steps):
        basis[j] = q
        w = matvec(q.reshape(1, *shape)).reshape(n)
        alpha[j] = q @ w
        for _ in range(2):  # twice is enough (Kahan's rule)
            w -= basis[:j + 1].mT @ (basis[:j + 1] @ w)
        b = float(w.norm())
        last = j + 1 == steps or b <= 1e-13 * float(alpha[:j + 1].abs().max())
        if last or (j + 1) % check_every == 0:
            m = j + 1
            t = torch.diag(alpha[:m]) + torch.diag(beta[:m - 1], 1) + torch.diag(beta[:m - 1], -1)
            top = float(torch.linalg.eigvalsh(t)[-1])
            if last or top - previous <= rtol * abs(top):
                return top
            previous = top
        beta[j] = b
        q = w / b
    return top


def exact_sigma_upper(
    linear_fn: LinearFn,
    in_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    chunk: int = 256,
    reach: Sequence[int] | None = None,
    deltas: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2),
) -> torch.Tensor | None:
    """Certified upper bound on ``sigma(A)`` of a linear map, within a relative ~1e-5 of the true norm.

    ``linear_fn`` maps float64 inputs ``(batch, *in_shape)`` linearly (no bias) and is built
    from sums of products (dense or convolution layers computed as dot products, as torch's
    float64 CPU convolutions and cuDNN with ``torch.backends.cudnn`` disabled are); the
    caller's parameters must be float64 on ``device``. Returns a 0-dim float64 tensor that
    includes ``1 + SAFETY``, or None if no certificate was found (the caller falls back to a
    looser bound). Memory ``8 d^2`` bytes and time ``O(d^3)``, ``d = min(in, out)``.
    ``reach``: see ``_gram_matrix`` (a structural sparsity of ``G`` that makes step 1 cheap).

    Method, all in float64:

    1. ``G``, the smaller Gram matrix (``A^T A`` or ``A A^T``, same largest eigenvalue
       ``sigma^2``), from the map and its adjoint (``torch.func.vjp``) on basis vectors. Every
       entry is a sum of products, computed twice over with at most ``k = max(in, out)`` terms,
       so ``|G_hat - G| <= 2.01 gamma_k |A|^T |A|`` entrywise and
       ``||G_hat - G||_2 <= 2.01 gamma_k ||A||_F^2 = 2.01 gamma_k tr(G)`` =: ``e_G``.
    2. A guess ``lam`` for ``lambda_max(G)``: Lanczos on the map itself (``A^T A`` or ``A A^T``
       applied by ``linear_fn`` and its adjoint, never the dense ``G``), within ~1e-10. It used to
       be a float32 ``eigvalsh`` of ``G``, which took 10 s of the 11 s at ``d`` = 6272.
    3. The certificate: for ``s = lam (1 + delta) + c`` form ``M = fl(s I - G_hat)`` and run
       LAPACK's Cholesky. If it completes, ``M + dM = R^T R`` with
       ``|dM| <= gamma_{d+1} |R^T| |R|`` (Demmel 1989), so ``M`` has no eigenvalue below
       ``-gamma_{d+1} ||R||_F^2 >= -gamma_{d+1} tr(M) / (1 - gamma_{d+1})`` =: ``-e_C``
       (Rump 2006); forming ``M`` moves each diagonal entry by at most ``e_D = 2u (s + max
       G_hat_ii)``. Hence ``lambda_max(G) <= s + e_D + e_C + e_G``, and ``c = e_D + e_C +
       e_G`` (a few 1e-8 relative at ``d`` = 8192) makes the bound ``s + c``. ``delta`` starts
       at 1e-5 and grows tenfold while the Cholesky fails (a guess below the true top
       eigenvalue makes ``M`` indefinite, so a wrong guess can only fail, never pass).

    Unlike :func:`dense_sigma_upper`, nothing here rests on the accuracy of an eigensolver:
    the guess may be anything, the Cholesky decides.
    """
    x_shape = tuple(int(s) for s in in_shape)
    with torch.no_grad():
        cudnn = torch.backends.cudnn.flags(enabled=False)  # no FFT / Winograd convolution algorithms
        with cudnn:
            gram, n_in, n_out = _gram_matrix(linear_fn, x_shape, torch.float64, device, chunk, reach)
        d = gram.shape[0]
        if d == 0:
            return torch.zeros((), dtype=torch.float64, device=gram.device)
        gram = torch.tril(gram) + torch.tril(gram, -1).mT  # the symmetric matrix the analysis is about
        trace = float(gram.diagonal().sum())
        if not math.isfinite(trace):
            return None
        if trace <= 0.0:  # all-zero map (a float64 trace of squares is 0 only if every entry is 0)
            return torch.zeros((), dtype=torch.float64, device=gram.device)
        # ||A||_F^2 = tr(G) <= tr(G_hat) (1 + 2.01 gamma_k + gamma_d); 1.01 covers that factor
        e_g = 2.01 * _gamma(max(n_in, n_out)) * trace * 1.01
        max_diag = float(gram.diagonal().max())
        x0 = torch.zeros(1, *x_shape, dtype=torch.float64, device=gram.device)
        _, adjoint = torch.func.vjp(linear_fn, x0)  # the vjp of a linear map is A^T at any point
        if n_in <= n_out:
            side, gram_apply = x_shape, lambda v: adjoint(linear_fn(v))[0]
        else:
            side, gram_apply = tuple(linear_fn(x0).shape[1:]), lambda v: linear_fn(adjoint(v)[0])
        guess = _lanczos_top(gram_apply, side, torch.float64, gram.device)
        guess = max(guess, max_diag, trace / d)  # lambda_max >= every diagonal entry and the mean
        for delta in deltas:
            base = guess * (1.0 + delta)
            e_d = 2.0 * _UNIT_ROUNDOFF * (2.0 * base + max_diag)
            e_c = 1.01 * _gamma(d + 1) * d * (2.0 * base + e_d)  # tr(M) <= d (s + e_D), s < 2 base
            c = e_d + e_c + e_g
            shift = base + c
            m = -gram
            m.diagonal().add_(shift)
            _, info = torch.linalg.cholesky_ex(m)
            del m
            if int(info) == 0:
                return torch.tensor(math.sqrt(shift + c) * (1.0 + SAFETY), dtype=torch.float64,
                                    device=gram.device)
        return None


def _as_tuple(value: int | Sequence[int], d: int, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: only numeric (zero) padding is supported")
    if isinstance(value, int):
        return (value,) * d
    out = tuple(int(v) for v in value)
    if len(out) == 1 and d > 1:
        out = out * d
    if len(out) != d:
        raise ValueError(f"{name}={value!r} does not match {d} spatial dims")
    return out


def _circular_geometry(
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int, int], ...] | None:
    """Per dimension ``(t_lo, t_hi, N)``: the dilated taps that ever touch the input, and a safe circular grid size.

    Returns None when some dimension has no tap that touches the input (the conv is the zero
    map). Derivation in :func:`conv_sigma_upper`, steps 1-2.
    """
    geometry = []
    for n, k, s, p, dl in zip(input_size, kernel_size, stride, padding, dilation):
        ext = dl * (k - 1) + 1
        out = (n + 2 * p - ext) // s + 1
        t_lo = max(0, p - (out - 1) * s)
        t_hi = min(ext - 1, p + n - 1)
        if t_lo > t_hi:
            return None
        k_crop = t_hi - t_lo + 1
        left = max(0, p - t_lo)
        right = max(0, (out - 1) * s - p + t_hi - (n - 1))
        gap = min(max(left, right), k_crop - 1)
        need = max(n + gap, k_crop)
        geometry.append((t_lo, t_hi, -(-need // s) * s))
    return tuple(geometry)


def conv_sigma_upper(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    n_iter: int = 12,
    explicit_max_entries: int = 2**20,
    exact_max_dim: int = EXACT_MAX_DIM,
) -> torch.Tensor:
    """Guaranteed upper bound on the l2 operator norm of ``x -> conv_nd(x, weight, None, stride, padding, dilation, groups)``.

    Valid for inputs with spatial size ``input_size`` (1-D, 2-D or 3-D), zero padding. The
    result is a 0-dim float64 tensor on ``weight.device`` including ``1 + SAFETY`` (applied
    once, inside :func:`gram_sigma_upper` or :func:`dense_sigma_upper`); no gradient flows.

    Small layers (at most ``explicit_max_entries`` entries in the operator's matrix, e.g. 64
    channels on a 4x4 map; 0 disables) are materialised in float64 and bounded exactly by
    :func:`dense_sigma_upper` (each entry of the matrix is a single weight, so the matrix
    is exact up to rounding far below ``SAFETY``): there the circular embedding below can
    be 10-15% loose (several-fold on toy inputs no larger than the kernel) and an SVD of at
    most a 1024-square matrix costs ~0.1 s on a CPU.

    Otherwise the circular bound, at the cost of one FFT of the kernel plus ``n_iter``
    batched ``min(Cout, Cin')``-square matmuls per frequency, ``Cin' = Cin / groups *
    prod(stride)``; it is 0.3-1.6% above the true norm on the 28x28 and 14x14 maps of a
    trained MNIST 4C3F. When the operator's smaller side has at most ``exact_max_dim``
    coordinates (0 disables) the result is the smaller of that and :func:`exact_sigma_upper`,
    the true norm certified to about 1e-5 (a Gram matrix, an eigenvalue guess and a Cholesky
    certificate: about 3.4 s for a 6272-square Gram matrix on 2 CPU threads, most of it the Cholesky).

    Derivation, per spatial dimension (dimensions are independent; ``k, s, p, dl, n`` are the
    kernel size, stride, padding, dilation and input size):

    1. *Dilation and cropping.* Insert ``dl - 1`` zeros between taps: a dense kernel of
       extent ``K = dl (k - 1) + 1``. Output ``j`` (``0 <= j < out``) reads input position
       ``j s - p + t`` with tap ``t in [0, K)``; positions outside ``[0, n)`` are padding
       zeros. Tap ``t`` touches the input for some output iff
       ``t in [p - (out - 1) s, p + n - 1]``, so the taps outside
       ``[t_lo, t_hi] = [max(0, p - (out-1) s), min(K - 1, p + n - 1)]`` only ever multiply
       zeros: cropping them away leaves the operator unchanged (an empty range means the
       operator is 0). This matters when the kernel is large next to the input. Below,
       ``K`` is the cropped extent and windows start at ``j s - p'``, ``p' = p - t_lo``.

    2. *Circular embedding.* Put ``x`` on a circle of ``N`` points at ``[0, n)`` (zeros
       elsewhere) and let the circular conv ``C`` have outputs ``j in [0, N / s)`` reading
       ``(j s - p' + t) mod N``. Only outputs whose window meets ``[0, n)`` in every
       dimension are non-zero rows of the true operator ``T``; call them kept. A kept
       window hangs out of ``[0, n)`` by at most ``L = min(p', K - 1)`` on the left and
       ``R = min(last window end - (n - 1), K - 1)`` on the right. Choose ``N`` a multiple
       of ``s`` with ``N >= K`` and ``N >= n + max(L, R)``: the overhang then lands in the
       zero gap ``[n, N)`` of the circle and never wraps onto ``x``, so each kept row of
       ``T`` equals row ``j mod (N / s)`` of ``C E`` (``E`` embeds x). Two kept outputs
       ``j != j'`` with the same ``j mod (N / s)`` would have window starts ``N`` apart, but
       kept starts lie in ``[-L, n - 1]``, a span ``n - 1 + L < N``. Hence ``T = P C E``
       with ``E`` an isometric embedding and ``P`` a row selection (plus zero rows), so
       ``||T|| <= ||C||``.

    3. *Stride (polyphase / space-to-depth).* With ``N = s M`` and ``t = a s + r``,
       ``X[(j s + a s + r) mod N] = X_r[(j + a) mod M]`` where ``X_r[i] = X[i s + r]`` (the
       shift ``p'`` is a circular shift of ``X``, an isometry). Splitting the input into
       its ``s`` phases is a permutation of coordinates, so the stride-``s`` circular conv
       on ``N`` points *is* (same norm, exactly) a stride-1 circular conv on ``M`` points
       with ``Cin * s`` input channels and kernel ``ceil(K / s) <= M``. This is exact,
       unlike bounding by the stride-1 norm.

    4. *Groups.* The operator is block-diagonal over groups (after permuting channels), so
       its norm is the maximum over groups; groups are a batch dimension.

    5. *Fourier.* A stride-1 circular conv is block-diagonalised by the unitary DFT: its
       norm is ``max_w ||V(w)||_2`` over the ``prod(M)`` frequencies, ``V(w)`` the
       ``Cout/g x Cin'`` DFT of the (zero-padded) kernel. A real kernel has
       ``V(-w) = conj(V(w))`` with equal singular values, so ``rfftn`` (half spectrum)
       suffices. Each ``||V(w)||_2`` is bounded by :func:`gram_sigma_upper`.
    """
    if weight.dim() < 3:
        raise ValueError(f"conv weight must be (Cout, Cin/groups, *kernel), got shape {tuple(weight.shape)}")
    d = weight.dim() - 2
    n = _as_tuple(input_size, d, "input_size")
    s = _as_tuple(stride, d, "stride")
    p = _as_tuple(padding, d, "padding")
    dl = _as_tuple(dilation, d, "dilation")
    k = tuple(weight.shape[2:])
    cout, cin_g = weight.shape[0], weight.shape[1]
    if groups < 1 or cout % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide Cout={cout}")
    if min(s) < 1 or min(dl) < 1 or min(p) < 0 or min(n) < 1 or min(k) < 1:
        raise ValueError(f"invalid conv geometry: input={n} kernel={k} stride={s} padding={p} dilation={dl}")
    ext = tuple(dli * (ki - 1) + 1 for dli, ki in zip(dl, k))
    if any(ni + 2 * pi < ei for ni, pi, ei in zip(n, p, ext)):
        raise ValueError(f"kernel extent {ext} exceeds padded input {n} + 2 * {p}: empty output")

    with torch.no_grad():
        w = weight.detach().to(torch.float64)
        geometry = _circular_geometry(n, k, s, p, dl)
        if w.numel() == 0 or geometry is None:
            return w.new_zeros(())
        out = tuple((ni + 2 * pi - ei) // si + 1 for ni, pi, ei, si in zip(n, p, ext, s))
        in_numel, out_numel = cin_g * groups * math.prod(n), cout * math.prod(out)
        if in_numel * out_numel <= explicit_max_entries:
            # Materialise from the smaller side (memory min(in, out)^2 <= in * out): rows of
            # T^T are the images of the input basis; rows of T are the adjoint (transposed
            # conv) images of the output basis, output_padding restoring the input size.
            if in_numel <= out_numel:
                basis = torch.eye(in_numel, dtype=w.dtype, device=w.device).reshape(in_numel, -1, *n)
                matrix = _CONV[d](basis, w, None, s, p, dl, groups).reshape(in_numel, out_numel)
            else:
                basis = torch.eye(out_numel, dtype=w.dtype, device=w.device).reshape(out_numel, cout, *out)
                extra = tuple(ni + 2 * pi - ((oi - 1) * si + ei) for ni, pi, oi, si, ei in zip(n, p, out, s, ext))
                matrix = _CONV_T[d](basis, w, None, s, p, extra, groups, dl).reshape(out_numel, in_numel)
            return dense_sigma_upper(matrix)
        m = tuple(grid // si for (_, _, grid), si in zip(geometry, s))
        taps = tuple(-(-(hi - lo + 1) // si) for (lo, hi, _), si in zip(geometry, s))  # ceil(K / s) <= M

        # Step 1: dilate, crop to [t_lo, t_hi], zero-pad to taps * stride (room for step 3).
        dilated = w.new_zeros(cout, cin_g, *ext)
        dilated[(slice(None), slice(None), *(slice(None, None, dli) for dli in dl))] = w
        cropped = dilated[(slice(None), slice(None), *(slice(lo, hi + 1) for lo, hi, _ in geometry))]
        wd = w.new_zeros(cout, cin_g, *(a * si for a, si in zip(taps, s)))
        wd[(slice(None), slice(None), *(slice(0, size) for size in cropped.shape[2:]))] = cropped

        # Groups as a batch dim (step 4), then polyphase: (g, co, ci, A1, s1, ..., Ad, sd)
        # -> (g, co, ci, s1, ..., sd, A1, ..., Ad) -> (g, co, ci * prod(s), A...) (step 3).
        co = cout // groups
        wd = wd.reshape(groups, co, cin_g, *(x for a, si in zip(taps, s) for x in (a, si)))
        perm = (0, 1, 2, *(4 + 2 * i for i in range(d)), *(3 + 2 * i for i in range(d)))
        wd = wd.permute(perm).reshape(groups, co, cin_g * math.prod(s), *taps)

        # Step 5: one (co x ci') matrix per group and frequency.
        spec = torch.fft.rfftn(wd, s=m, dim=tuple(range(3, 3 + d)))
        mats = spec.movedim((1, 2), (-2, -1))
        circular = gram_sigma_upper(mats, n_iter=n_iter).amax()
        if min(in_numel, out_numel) <= exact_max_dim:
            conv = _CONV[d]
            # G is structurally zero between inputs further apart than the kernel extent, and
            # between outputs whose windows (extent e, stride s) cannot overlap
            reach = (tuple(e - 1 for e in ext) if in_numel <= out_numel
                     else tuple(-(-e // si) - 1 for e, si in zip(ext, s)))
            exact = exact_sigma_upper(lambda v: conv(v, w, None, s, p, dl, groups), (cin_g * groups, *n),
                                      device=w.device, reach=reach)
            if exact is not None:
                return torch.minimum(exact, circular)
        return circular


def conv_transpose_output_size(
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Spatial output size of a transposed convolution: ``(n - 1) s - 2 p + dl (k - 1) + op + 1`` per dim."""
    return tuple((n - 1) * s - 2 * p + dl * (k - 1) + op + 1
                 for n, k, s, p, op, dl in zip(input_size, kernel_size, stride, padding, output_padding, dilation))


def conv_transpose_sigma_upper(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
    *,
    n_iter: int = 12,
    explicit_max_entries: int = 2**20,
    exact_max_dim: int = EXACT_MAX_DIM,
) -> torch.Tensor:
    """Guaranteed upper bound on the l2 norm of ``x -> conv_transpose_nd(x, weight, None, stride, ...)``.

    Valid for inputs with spatial size ``input_size`` (1-D, 2-D or 3-D); arguments in
    ``F.conv_transpose*d`` order. ``weight`` is ``(Cin, Cout / groups, *k)``. The result is a
    0-dim float64 tensor including ``1 + SAFETY`` once; no gradient flows.

    Derivation, per spatial dimension (``k, s, p, op, dl, n`` the kernel size, stride,
    padding, output padding, dilation and input size of the transposed conv; channels as in
    the conv, where the same weight tensor reads as ``(out = Cin, in / groups = Cout / groups,
    *k)``):

    1. The transposed conv ``T`` sends input ``j`` through tap ``t`` to output position
       ``o = j s - p + t dl`` and drops ``o`` outside ``[0, N)``,
       ``N = (n - 1) s - 2 p + dl (k - 1) + op + 1``. The last ``op`` positions are the part
       of the far border that the padding would otherwise crop: they receive every tap that
       lands there (zero rows where none does), so they are ordinary output positions.
    2. The conv ``C = conv_nd(., weight, None, s, p, dl, groups)`` on inputs of size ``N``
       (zero padding ``p``) has ``n' = (N + 2 p - dl (k - 1) - 1) // s + 1 = n + op // s``
       outputs, and its output ``j`` reads input ``o = j s - p + t dl`` through tap ``t``
       exactly where ``0 <= o < N``. So for ``j < n`` the entry ``(j, o)`` of ``C`` is the
       entry ``(o, j)`` of ``T``: ``T^T = P C`` with ``P`` keeping the first ``n`` outputs.
    3. torch requires ``op < max(s, dl)``. When ``op < s`` in every dimension, ``n' = n``,
       ``P = I`` and ``T = C^T``: ``sigma(T) = sigma(C)``, bounded by :func:`conv_sigma_upper`
       on input size ``N`` with the same tightness as a conv. Otherwise (``s <= op < dl``)
       ``sigma(T) = sigma(P C) <= sigma(C)`` (``P`` is a row selection), still a guaranteed
       bound; the result is then the smaller of it and a bound on ``T`` itself (its explicit
       matrix and an exact SVD up to ``explicit_max_entries`` entries, else
       :func:`exact_sigma_upper` up to ``exact_max_dim`` coordinates on the smaller side).
    """
    if weight.dim() < 3:
        raise ValueError(f"conv_transpose weight must be (Cin, Cout/groups, *kernel), got shape {tuple(weight.shape)}")
    d = weight.dim() - 2
    n = _as_tuple(input_size, d, "input_size")
    s = _as_tuple(stride, d, "stride")
    p = _as_tuple(padding, d, "padding")
    op = _as_tuple(output_padding, d, "output_padding")
    dl = _as_tuple(dilation, d, "dilation")
    k = tuple(weight.shape[2:])
    if min(s) < 1 or min(dl) < 1 or min(p) < 0 or min(op) < 0 or min(n) < 1:
        raise ValueError(f"invalid conv_transpose geometry: input={n} stride={s} padding={p} "
                         f"output_padding={op} dilation={dl}")
    if any(o >= max(si, di) for o, si, di in zip(op, s, dl)):
        raise ValueError(f"output_padding {op} must be smaller than stride {s} or dilation {dl}")
    size = conv_transpose_output_size(n, k, s, p, op, dl)
    if min(size) < 1:
        raise ValueError(f"conv_transpose output size {size} is empty (input={n} kernel={k} stride={s} padding={p})")
    if all(o < si for o, si in zip(op, s)):  # step 3: T = C^T exactly
        return conv_sigma_upper(weight, size, s, p, dl, groups, n_iter=n_iter,
                                explicit_max_entries=explicit_max_entries, exact_max_dim=exact_max_dim)
    with torch.no_grad():
        w = weight.detach().to(torch.float64)
        bound = conv_sigma_upper(w, size, s, p, dl, groups, n_iter=n_iter, explicit_max_entries=0, exact_max_dim=0)
        cin, cout = w.shape[0], w.shape[1] * groups
        in_numel, out_numel = cin * math.prod(n), cout * math.prod(size)
        fn = lambda v: _CONV_T[d](v, w, None, s, p, op, groups, dl)  # noqa: E731
        if in_numel * out_numel <= explicit_max_entries:
            basis = torch.eye(in_numel, dtype=w.dtype, device=w.device).reshape(in_numel, cin, *n)
            return torch.minimum(bound, dense_sigma_upper(fn(basis).reshape(in_numel, out_numel)))
        if min(in_numel, out_numel) <= exact_max_dim:
            ext = tuple(di * (ki - 1) + 1 for di, ki in zip(dl, k))
            # inputs j, j' share an output only if |j - j'| s <= ext - 1; outputs share an input only
            # if they are at most ext - 1 apart
            reach = (tuple(-(-e // si) - 1 for e, si in zip(ext, s)) if in_numel <= out_numel
                     else tuple(e - 1 for e in ext))
            exact = exact_sigma_upper(fn, (cin, *n), device=w.device, reach=reach)
            if exact is not None:
                return torch.minimum(bound, exact)
        return bound


# --------------------------------------------------------------------------------------------
# Power-iteration estimates (training) and explicit matrices (tests)
# --------------------------------------------------------------------------------------------


def _normalize_(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Overwrite ``u`` with ``w / ||w||``; keep ``u`` when ``w == 0`` (then ``u`` is in the kernel of ``A``)."""
    norm = torch.linalg.vector_norm(w)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    u.copy_(torch.where(norm > 0, w / safe, u))
    return u


def power_iteration_(linear_fn: LinearFn, u: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    """In place: ``u <- A^T A u / ||A^T A u||``, ``n_iter`` times; ``u`` stays unit-norm (an estimate's state, no bound).

    ``linear_fn`` must be linear (no bias): ``A^T`` is taken generically as the vector-Jacobian
    product of ``linear_fn`` (``torch.func.vjp``), so any linear callable works (Linear,
    conv with any stride/padding/dilation/groups, average pooling, compositions). ``u`` is
    a buffer of shape ``(1, *in_shape)``, updated in place under ``torch.no_grad`` so it can be
    warm-started across calls (the "Lipschitz cache"). ``u`` is normalised even for
    ``n_iter = 0``; if ``A^T A u = 0`` it is left where it is. Returns ``u``.
    """
    with torch.no_grad():
        _normalize_(u, u.detach().clone())
        for _ in range(n_iter):
            v, vjp_fn = torch.func.vjp(linear_fn, u.detach().clone())
            (w,) = vjp_fn(v.detach())
            _normalize_(u, w.detach())
    return u


def sigma_estimate(linear_fn: LinearFn, u: torch.Tensor) -> torch.Tensor:
    """Power-iteration *estimate* ``||A u|| / ||u|| <= sigma(A)``: an under-estimate, never a bound.

    Differentiable with respect to the parameters inside ``linear_fn``; ``u`` is treated as a
    constant (detached). Returns a 0-dim tensor in the dtype of ``linear_fn``'s output.
    """
    u = u.detach()
    out = linear_fn(u)
    return torch.linalg.vector_norm(out) / torch.linalg.vector_norm(u).to(out.dtype)


def explicit_matrix(
    linear_fn: LinearFn,
    in_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The dense float64 matrix ``(out_numel, in_numel)`` of a linear map on inputs ``(1, *in_shape)`` (exact up to rounding).

    Built with ``torch.func.jacrev`` at zero (the Jacobian of a linear map is the map). Inputs
    are created with ``dtype``/``device`` (default float64, CPU); ``linear_fn``'s parameters
    must match them. For tests and small layers only: memory is ``out_numel * in_numel``.
    """
    x = torch.zeros(1, *in_shape, dtype=dtype, device=device)
    with torch.no_grad():
        jac = torch.func.jacrev(linear_fn)(x)
    in_numel = x.numel()
    return jac.detach().reshape(-1, in_numel).to(torch.float64)
