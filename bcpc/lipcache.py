"""Layer Lipschitz constants: fast estimates for training, guaranteed bounds for certificates.

DESIGN.md §4. Every weight-dependent affine node of a compiled model gets one
:class:`LipschitzConstant` module. Called as ``lip(weight, sound)`` from the emitted graph it
returns

* ``sound=False`` – a power-iteration *estimate* of the operator norm, differentiable w.r.t. the
  weight. The iteration vector ``u`` is a buffer, warm-started across calls (the "Lipschitz
  cache"): ``n_iter`` steps per gradient-enabled call, ``init_iter`` on first use. An estimate is
  an under-estimate of the norm: fine for a loss, never used for a certificate.
* ``sound=True`` – a guaranteed *upper* bound (exact float64 SVD for dense layers; for
  convolutions the true norm certified by a Cholesky factorisation when the operator's smaller
  side has at most ``bcpc.lipschitz.EXACT_MAX_DIM`` coordinates, else Gram iteration on the FFT
  blocks of the kernel; a transposed convolution is bounded as the adjoint convolution on its
  output size, bcpc.lipschitz.conv_transpose_sigma_upper), cached against an exact copy of the weight it was
  computed from (bcpc.state), so certifying a data set computes it once and any change of the
  weight's values (an optimizer step, ``load_state_dict``, an edit through ``.data``) invalidates it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcpc import lipschitz
from bcpc.state import same_tensor_values

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}
_CONV_TRANSPOSE = {"conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
                   "conv_transpose3d": F.conv_transpose3d}
#: The linear maps a LipschitzConstant knows; conv kinds take ``stride, padding, dilation, groups``,
#: transposed ones also ``output_padding`` (bcpc.lipschitz.conv_transpose_sigma_upper).
KINDS = ("linear",) + tuple(_CONV) + tuple(_CONV_TRANSPOSE)


class LipschitzConstant(nn.Module):
    """Spectral norm of one linear map ``v -> op(v, weight)`` (no bias), estimate or bound."""

    def __init__(self, kind: str, in_shape: tuple, params: dict, n_iter: int = 1, init_iter: int = 50):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown linear map kind {kind!r}")
        self.kind = kind
        self.in_shape = tuple(int(s) for s in in_shape)
        self.params = dict(params)
        self.n_iter = int(n_iter)
        self.init_iter = int(init_iter)
        u = torch.randn((1,) + self.in_shape, generator=torch.Generator().manual_seed(0))
        self.register_buffer("u", u / u.norm())
        self._warm = False
        self._bound_weight: Optional[Tensor] = None  # the weight values the cached bound belongs to
        self._bound: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"{self.kind}, in_shape={self.in_shape}, n_iter={self.n_iter}"

    def linear_fn(self, weight: Tensor) -> Callable[[Tensor], Tensor]:
        p = self.params
        if self.kind == "linear":
            return lambda v: F.linear(v, weight)
        if self.kind in _CONV_TRANSPOSE:
            conv_t = _CONV_TRANSPOSE[self.kind]
            return lambda v: conv_t(v, weight, None, p["stride"], p["padding"], p["output_padding"], p["groups"],
                                    p["dilation"])
        conv = _CONV[self.kind]
        return lambda v: conv(v, weight, None, p["stride"], p["padding"], p["dilation"], p["groups"])

    def forward(self, weight: Tensor, sound: bool) -> Tensor:
        if sound:
            return self.upper(weight).to(weight.dtype)
        return self.estimate(weight)

    def estimate(self, weight: Tensor, n_iter: Optional[int] = None) -> Tensor:
        """Power-iteration estimate (under-estimate) of the norm; advances the cached vector."""
        fn = self.linear_fn(weight)
        if self.u.dtype != weight.dtype or self.u.device != weight.device:
            self.u = self.u.to(dtype=weight.dtype, device=weight.device)
        steps = n_iter
        if steps is None:
            if not self._warm:
                steps = self.init_iter
            elif torch.is_grad_enabled() and self.training:
                steps = self.n_iter
            else:
                steps = 0
        if steps:
            lipschitz.power_iteration_(fn, self.u, steps)
        self._warm = True
        return lipschitz.sigma_estimate(fn, self.u)

    def has_upper(self, weight: Tensor) -> bool:
        """Whether :meth:`upper` has its bound for these exact weight values already (a progress
        display counts the layers still to compute with it)."""
        return self._bound is not None and same_tensor_values(self._bound_weight, weight)

    def upper(self, weight: Tensor) -> Tensor:
        """Guaranteed upper bound on the norm (float64), cached for the weight's exact values."""
        if not self.has_upper(weight):
            with torch.no_grad():
                w = weight.detach()
                if self.kind == "linear":
                    value = lipschitz.dense_sigma_upper(w)
                elif self.kind in _CONV_TRANSPOSE:
                    p = self.params
                    value = lipschitz.conv_transpose_sigma_upper(
                        w, self.in_shape[1:], p["stride"], p["padding"], p["output_padding"], p["groups"],
                        p["dilation"], exact_max_dim=lipschitz.EXACT_MAX_DIM,
                    )
                else:
                    p = self.params
                    value = lipschitz.conv_sigma_upper(
                        w, self.in_shape[1:], p["stride"], p["padding"], p["dilation"], p["groups"],
                        exact_max_dim=lipschitz.EXACT_MAX_DIM,  # read now, so users can change it
                    )
            self._bound_weight, self._bound = weight.detach().clone(), value
        return self._bound

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._warm = True  # a loaded vector is already converged
