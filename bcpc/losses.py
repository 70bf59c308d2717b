"""Certified training objectives, each a function of the clean logits and the certified margins.

Every loss reads the (B, C) margin lower bounds ``m[b, j] <= z_y - z_j`` (``+inf`` at ``j == y``)
that one forward of the certifying module gives, and the worst-translated logits built from them
(paper eq. 2: ``zw_y = z_y``, ``zw_j = z_y - m_j``), and mixes a clean term with a certified
term by ``lam``:

- ``"bcp"`` — the paper's eq. 13: ``(1 - lam) CE(z, y) + lam CE(zw, y)``.
- ``"trades"`` — GloRo's TRADES-style loss: ``CE(z, y) + lam KL(softmax(z) || softmax(zw))``; the
  clean term is never down-weighted, and ``lam`` may exceed 1 (GloRo uses 1.5-3).
- ``"gloro"`` — GloRo's TRADES loss exactly: the margins are taken against the *predicted* class
  ``k`` (not the label), the bottom logit is ``z_bot = z_k - min_j m_j`` (the largest
  worst-translated logit), and the KL between ``[softmax(z), 0]`` and ``softmax([z, z_bot])``
  reduces to ``softplus(z_bot - logsumexp(z))``: ``CE(z, y) + lam softplus(z_bot - LSE(z))``.
  Only the worst class gets gradient, and robustness is rewarded whatever the label.
- ``"emma"`` — EMMA (Hu et al. 2023, "Unlocking deterministic robustness certification on
  ImageNet"): every other class's logit is translated by its certified worst case, but no further
  than a tie with the label's: ``ze_j = z_j + t_j * sg(clip((z_y - z_j) / t_j, 0, 1))``, with
  ``t_j = z_y - z_j - m_j`` the translation the bound allows (``eps K_yj`` for the global bound)
  and ``sg`` a stop-gradient; the loss is ``(1 - lam) CE(z, y) + lam CE(ze, y)``. A class the
  model already confuses with the label pulls on the bound only as far as the boundary, so every
  class gets gradient, not only the worst one.
- ``"hinge"`` — a multi-class hinge on the certified margins (BCOP's margin loss):
  ``(1 - lam) CE(z, y) + lam * sum_{j != y} relu(kappa - m_j) / C``, zero once every margin is
  certified with room ``kappa``.
- ``"cll"`` — the Calibrated Lipschitz-Margin loss (Losch et al. 2023, "Certified robust models
  with slack control and large Lipschitz constants"): cross-entropy over each class's certified
  radius rather than its logit. With ``t_j = z_y - z_j - m_j`` the worst-case translation at eps
  (``eps K_yj`` for the global bound), ``r_j = eps (z_y - z_j) / t_j`` is the radius at which the
  pair's bound reaches a tie, and the calibrated logits are ``q_j = (r_target - r_j) / sigma`` with
  the target ``r_target = eps`` and the width ``sigma = 2 eps / Q``, ``Q = 2 log(2 / p - 1)``: the
  logistic of ``(r_j - eps) / sigma`` rises from ``p / 2`` at radius 0 to ``1 - p / 2`` at 2 eps,
  and ``p`` (``slack``) is how much of that is left to the data. So
  ``q_j = log(2 / p - 1) (1 - (z_y - z_j) / t_j)``, ``q_y = 0``, and the loss is
  ``(1 - lam) CE(z, y) + lam CE(q, y)``. It does not change when every logit is scaled (the
  radius does not): nothing in it rewards a small Lipschitz constant for its own sake.

``lam == 0`` is plain cross-entropy for every loss. ``temperature`` T scales the logits and the
margins (both in logit units) before any loss, ``CE(T z, y)`` and so on. Logits, margins and the
certified bounds all scale with the last layer, so T is the same as that layer's weights and bias
scaled by T: it reaches no other function, and changes only the starting point and the optimiser's
steps (Adam's step is a fraction of the learning rate, whatever the weight's scale). GloRo's and
the paper's losses use T = 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bcpc import margins as margins_mod

LOSSES = ("bcp", "trades", "gloro", "emma", "hinge", "cll")

#: losses whose margins are taken against the predicted class (the forward gets no labels)
PREDICTION_REFERENCED = ("gloro",)


def certified_loss(kind: str, logits: Tensor, margins: Tensor, y: Tensor, lam: float,
                   hinge_margin: float = 1.0, slack: float = 0.1, temperature: float = 1.0) -> Tensor:
    """The training objective ``kind`` (one of :data:`LOSSES`) from one certified forward."""
    if temperature != 1.0:
        logits, margins = temperature * logits, temperature * margins
    clean = F.cross_entropy(logits, y)
    if lam == 0:
        return clean
    if kind == "bcp":
        zw = margins_mod.worst_logits(logits, margins, y)
        return (1 - lam) * clean + lam * F.cross_entropy(zw, y)
    if kind == "trades":
        zw = margins_mod.worst_logits(logits, margins, y)
        log_p = F.log_softmax(logits, dim=1)
        kl = F.kl_div(F.log_softmax(zw, dim=1), log_p, reduction="batchmean", log_target=True)
        return clean + lam * kl
    if kind == "gloro":  # margins against the prediction (CertifiedModule.loss passes no labels)
        ref = logits.argmax(dim=1)
        z_bot = logits.gather(1, ref.unsqueeze(1)).squeeze(1) - margins.min(dim=1).values
        return clean + lam * F.softplus(z_bot - torch.logsumexp(logits, dim=1)).mean()
    if kind == "emma":
        ze = emma_logits(logits, margins, y)
        return (1 - lam) * clean + lam * F.cross_entropy(ze, y)
    if kind == "hinge":
        own = F.one_hot(y, margins.shape[1]).bool()
        gap = torch.relu(hinge_margin - margins).masked_fill(own, 0.0)
        return (1 - lam) * clean + lam * gap.sum(dim=1).mean() / margins.shape[1]
    if kind == "cll":
        return (1 - lam) * clean + lam * F.cross_entropy(cll_logits(logits, margins, y, slack), y)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def emma_logits(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """EMMA's translated logits: ``z_j`` moved up by its certified worst case ``t_j`` at most, and
    never past ``z_y`` (the scale factor carries no gradient); ``ze_y = z_y``."""
    z_y = logits.gather(1, y.unsqueeze(1))
    gap = z_y - logits                           # z_y - z_j
    own = F.one_hot(y, logits.shape[1]).bool()
    t = (gap - margins).masked_fill(own, 0.0)    # the translation the bound allows, >= 0
    scale = (gap / t.clamp_min(torch.finfo(t.dtype).tiny)).clamp(0.0, 1.0).detach()
    return torch.where(own, logits, logits + t * scale)


def cll_logits(logits: Tensor, margins: Tensor, y: Tensor, slack: float) -> Tensor:
    """CLL's calibrated logits ``q_j = log(2 / p - 1) (1 - (z_y - z_j) / t_j)``, ``q_y = 0``: minus each
    class's certified radius in units of the training eps, shifted by one and scaled by the slack."""
    if not 0 < slack < 1:
        raise ValueError(f"the CLL slack p must be in (0, 1), got {slack}")
    z_y = logits.gather(1, y.unsqueeze(1))
    gap = z_y - logits                           # z_y - z_j
    own = F.one_hot(y, logits.shape[1]).bool()
    # the translation the bound allows at eps (> 0 for eps > 0); floored so that a pair without
    # any translation gives a large finite logit, not inf * 0
    t = (gap - margins).masked_fill(own, 1.0).clamp_min(torch.finfo(logits.dtype).eps)
    scale = math.log(2.0 / slack - 1.0)
    return (scale * (1.0 - gap / t)).masked_fill(own, 0.0)
