"""Random models written the way people write PyTorch, for the differential fuzzer.

Not bcpc's vocabulary: every step is drawn with one of its *user spellings* — module, functional,
method and in-place forms (assigned or not), tuple-returning ops, views and reshapes, skips that
alias, masks built from comparisons, dropout spelled several ways. A model is a list of steps that
``Program.forward`` interprets (torch.fx traces through the loop: the steps are static data).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import bcpc.nn

# (family, spelling) pairs; each is implemented in Program.step.
ACTIVATION_SPELLINGS = [
    "nn.ReLU", "nn.ReLU(inplace)", "nn.ReLU(inplace) unassigned", "F.relu", "F.relu(inplace)", "torch.relu",
    "h.relu()", "h.relu_() unassigned", "h = h.relu_()", "torch.relu_(h) unassigned", "F.relu_(h)",
    "nn.Tanh", "torch.tanh", "h.tanh_() unassigned", "h.sigmoid()", "torch.sigmoid_(h) unassigned",
    "nn.LeakyReLU(0.1, inplace)", "F.leaky_relu(h, 0.2)", "F.elu(h)", "nn.ELU(inplace)",
    "nn.Softplus(threshold=1)", "F.softplus(h, beta=2)", "nn.Softplus",
    "h.clamp(min=0)", "h.clamp_(min=0) unassigned",
    "nn.GELU", "F.gelu(h, approximate='tanh')", "nn.SiLU(inplace)", "h * torch.sigmoid(h)", "F.mish", "nn.Hardswish",
    "nn.ReLU6(inplace)", "F.hardtanh(h, -0.5, 0.5)", "h.clip(-1, 1)", "F.hardsigmoid", "bcpc.nn.MaxMin",
    "bcpc.nn.GroupSort(2)", "nn.PReLU", "F.prelu(h, -0.5)",
    "torch.selu", "nn.SELU", "torch.celu(h, 0.5)", "nn.CELU(0.5, inplace)", "torch.selu_(h) unassigned", "F.logsigmoid",
    "F.softsign", "F.tanhshrink",
]
LAYOUT_SPELLINGS = ["transpose round trip", "h.flip(1)", "torch.roll(h, 1, 1)", "slices cat", "pad crop",
                    "expand mean", "stack amax", "cast round trip", "upsample stride", "movedim round trip",
                    "unsqueeze squeeze", "narrow cat", "h + h.sum(1, keepdim=True)", "h.view(B, -1, 2).sort(2)",
                    "h - h.mean(1, keepdim=True)", "torch.where(const mask, h, -h)", "h.masked_fill(const mask, 0.5)"]
SCALE_SPELLINGS = ["h * 2", "2 * h", "h.mul(0.5)", "h.mul_(3) unassigned", "h *= 3", "h / 4", "h.div_(2) unassigned",
                   "h + 1", "h.add_(1) unassigned", "h += 1", "h - 0.5", "h.sub_(1) unassigned", "-h", "h.neg_()"]
TUPLE_SPELLINGS = ["chunk maxmin", "split maxmin", "h.max(1) keepdim", "h.sort(1)[0]", "h.topk(2)", "unbind cat",
                   "h.min(1).values"]
VIEW_SPELLINGS = ["h.view(h.size(0), -1)", "h.reshape(h.shape[0], -1)", "h.flatten(1)", "h.contiguous()",
                  "h.unsqueeze(1).flatten(1)", "h.view(-1, w)", "h[:, :]", "h.detach()", "h.clone()",
                  "view then relu_ (alias)", "h.data relu_ (alias)"]
MASK_SPELLINGS = ["h * (h > 0).float()", "h * (h > 0)", "torch.where(h > 0, h, 0 * h)", "h.masked_fill(h < 0, 0)",
                  "h * h.sign()", "h.argmax(1) one-hot"]
DROPOUT_SPELLINGS = ["nn.Dropout", "F.dropout(h, 0.3, self.training)", "F.dropout(h, 0.3)", "nn.Dropout(inplace)"]
SKIP_SPELLINGS = ["h = h + f(h)", "h = f(h) + h", "h += f(h) (aliased skip)", "torch.add(h, f(h))", "h.add(f(h))",
                  "skip = h; h.relu_(); h + skip"]
# einsum with a weight (the one constant operand: lowered to F.linear), other einsums (refused), 1-D pools
CONTRACT_SPELLINGS = ["einsum('bi,ji->bj', h, W)", "einsum('ij,bj->bi', W, h)", "einsum('bi,ij', h, W) implicit",
                      "einsum('bi,ji->bj', [h, W])", "einsum('bgi,ji->bgj') on h.view(B, 2, -1)",
                      "einsum('bi,i->bi', h, v)", "einsum('bi,ij->bij') summed back", "h + einsum('bi,bi->b', h, h)", "max_pool1d cat avg_pool1d",
                      "F.max_pool1d(h[:, None], 3, 1, 1)", "torch.max_pool1d(h[:, None], 2, 2) twice"]
WEIGHT_EDITS = ["p.data.mul_", "p.data.copy_", "no_grad p.mul_", "load_state_dict", "p.data = new", "p.data.clamp_",
                "optimizer step"]


class Program(nn.Module):
    """Input (B, d) -> Linear(d, w) -> the drawn steps (each keeps width w) -> Linear(w, classes)."""

    def __init__(self, d: int, w: int, classes: int, steps: list, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.steps = list(steps)
        self.w = w
        self.inp = nn.Linear(d, w)
        self.out = nn.Linear(w, classes)
        self.fcs = nn.ModuleList(nn.Linear(w, w) for _ in steps)
        mods = []
        for family, spelling in steps:
            mods.append(self._module(family, spelling))
        self.mods = nn.ModuleList(mods)

    @staticmethod
    def _module(family, spelling) -> nn.Module:
        table = {
            "nn.ReLU": nn.ReLU(), "nn.ReLU(inplace)": nn.ReLU(inplace=True),
            "nn.ReLU(inplace) unassigned": nn.ReLU(inplace=True), "nn.Tanh": nn.Tanh(),
            "nn.LeakyReLU(0.1, inplace)": nn.LeakyReLU(0.1, inplace=True), "nn.ELU(inplace)": nn.ELU(inplace=True),
            "nn.Softplus(threshold=1)": nn.Softplus(threshold=1.0), "nn.Softplus": nn.Softplus(),
            "nn.Dropout": nn.Dropout(0.3), "nn.Dropout(inplace)": nn.Dropout(0.3, inplace=True),
            "nn.GELU": nn.GELU(), "nn.SiLU(inplace)": nn.SiLU(inplace=True), "nn.Hardswish": nn.Hardswish(),
            "nn.ReLU6(inplace)": nn.ReLU6(inplace=True), "bcpc.nn.MaxMin": bcpc.nn.MaxMin(),
            "bcpc.nn.GroupSort(2)": bcpc.nn.GroupSort(2), "nn.PReLU": nn.PReLU(),
            "nn.SELU": nn.SELU(), "nn.CELU(0.5, inplace)": nn.CELU(0.5, inplace=True),
        }
        return table.get(spelling, nn.Identity())

    def activation(self, i, s, h):
        m = self.mods[i]
        if s in ("nn.ReLU", "nn.ReLU(inplace)", "nn.Tanh", "nn.LeakyReLU(0.1, inplace)", "nn.ELU(inplace)",
                 "nn.Softplus(threshold=1)", "nn.Softplus", "nn.GELU", "nn.SiLU(inplace)", "nn.Hardswish",
                 "nn.ReLU6(inplace)", "bcpc.nn.MaxMin", "bcpc.nn.GroupSort(2)", "nn.PReLU", "nn.SELU",
                 "nn.CELU(0.5, inplace)"):
            return m(h)
        if s == "torch.selu":
            return torch.selu(h)
        if s == "torch.celu(h, 0.5)":
            return torch.celu(h, 0.5)
        if s == "torch.selu_(h) unassigned":
            torch.selu_(h)
            return h
        if s == "F.logsigmoid":
            return F.logsigmoid(h)
        if s == "F.softsign":
            return F.softsign(h)
        if s == "F.tanhshrink":
            return F.tanhshrink(h)
        if s == "F.prelu(h, -0.5)":
            return F.prelu(h, torch.tensor([-0.5], dtype=h.dtype))
        if s == "F.gelu(h, approximate='tanh')":
            return F.gelu(h, approximate="tanh")
        if s == "h * torch.sigmoid(h)":
            return h * torch.sigmoid(h)
        if s == "F.mish":
            return F.mish(h)
        if s == "F.hardtanh(h, -0.5, 0.5)":
            return F.hardtanh(h, -0.5, 0.5)
        if s == "h.clip(-1, 1)":
            return h.clip(-1, 1)
        if s == "F.hardsigmoid":
            return F.hardsigmoid(h)
        if s == "nn.ReLU(inplace) unassigned":
            m(h)
            return h
        if s == "F.relu":
            return F.relu(h)
        if s == "F.relu(inplace)":
            return F.relu(h, inplace=True)
        if s == "torch.relu":
            return torch.relu(h)
        if s == "h.relu()":
            return h.relu()
        if s == "h.relu_() unassigned":
            h.relu_()
            return h
        if s == "h = h.relu_()":
            h = h.relu_()
            return h
        if s == "torch.relu_(h) unassigned":
            torch.relu_(h)
            return h
        if s == "F.relu_(h)":
            return F.relu_(h)
        if s == "torch.tanh":
            return torch.tanh(h)
        if s == "h.tanh_() unassigned":
            h.tanh_()
            return h
        if s == "h.sigmoid()":
            return h.sigmoid()
        if s == "torch.sigmoid_(h) unassigned":
            torch.sigmoid_(h)
            return h
        if s == "F.leaky_relu(h, 0.2)":
            return F.leaky_relu(h, 0.2)
        if s == "F.elu(h)":
            return F.elu(h)
        if s == "F.softplus(h, beta=2)":
            return F.softplus(h, beta=2)
        if s == "h.clamp(min=0)":
            return h.clamp(min=0)
        if s == "h.clamp_(min=0) unassigned":
            h.clamp_(min=0)
            return h
        raise AssertionError(s)

    def scale(self, s, h):
        if s == "h * 2":
            return h * 2
        if s == "2 * h":
            return 2 * h
        if s == "h.mul(0.5)":
            return h.mul(0.5)
        if s == "h.mul_(3) unassigned":
            h.mul_(3)
            return h
        if s == "h *= 3":
            h *= 3
            return h
        if s == "h / 4":
            return h / 4
        if s == "h.div_(2) unassigned":
            h.div_(2)
            return h
        if s == "h + 1":
            return h + 1
        if s == "h.add_(1) unassigned":
            h.add_(1)
            return h
        if s == "h += 1":
            h += 1
            return h
        if s == "h - 0.5":
            return h - 0.5
        if s == "h.sub_(1) unassigned":
            h.sub_(1)
            return h
        if s == "-h":
            return -h
        if s == "h.neg_()":
            return h.neg_()
        raise AssertionError(s)

    def tuple_op(self, s, h):
        if s == "chunk maxmin":
            a, b = h.chunk(2, 1)
            return torch.cat([torch.max(a, b), torch.min(a, b)], 1)
        if s == "split maxmin":
            a, b = torch.split(h, self.w // 2, dim=1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
        if s == "h.max(1) keepdim":
            return h + h.max(1, keepdim=True)[0]
        if s == "h.sort(1)[0]":
            return h.sort(1)[0]
        if s == "h.topk(2)":
            return h + h.topk(2, dim=1).values.sum(1, keepdim=True)
        if s == "unbind cat":
            return torch.stack(h.unbind(1), 1)
        if s == "h.min(1).values":
            return h - h.min(1).values[:, None]
        raise AssertionError(s)

    def view(self, s, h):
        if s == "h.view(h.size(0), -1)":
            return h.view(h.size(0), -1)
        if s == "h.reshape(h.shape[0], -1)":
            return h.reshape(h.shape[0], -1)
        if s == "h.flatten(1)":
            return h.flatten(1)
        if s == "h.contiguous()":
            return h.contiguous()
        if s == "h.unsqueeze(1).flatten(1)":
            return h.unsqueeze(1).flatten(1)
        if s == "h.view(-1, w)":
            return h.view(-1, self.w)
        if s == "h[:, :]":
            return h[:, :]
        if s == "h.detach()":
            return h.detach()
        if s == "h.clone()":
            return h.clone()
        if s == "view then relu_ (alias)":
            v = h.view(h.size(0), -1)
            h.relu_()
            return v
        if s == "h.data relu_ (alias)":
            h.data.relu_()
            return h
        raise AssertionError(s)

    def layout(self, s, h):
        w = self.w
        if s == "transpose round trip":
            return h.view(-1, 2, w // 2).transpose(1, 2).reshape(h.size(0), -1)
        if s == "h.flip(1)":
            return h.flip(1)
        if s == "torch.roll(h, 1, 1)":
            return torch.roll(h, 1, 1)
        if s == "slices cat":
            return torch.cat([h[:, 1:], h[:, :1]], 1)
        if s == "pad crop":
            return F.pad(h, (1, 2))[:, 1:-2]
        if s == "expand mean":
            return h.unsqueeze(2).expand(-1, -1, 3).mean(2)
        if s == "stack amax":
            return torch.stack([h, 0.5 * h], 2).amax(2)
        if s == "cast round trip":
            return h.float().double()
        if s == "upsample stride":
            return F.interpolate(h.unsqueeze(1), scale_factor=2).view(h.size(0), 2 * w)[:, ::2]
        if s == "movedim round trip":
            return h.view(-1, 2, w // 2).movedim(1, 2).flatten(1)
        if s == "unsqueeze squeeze":
            return h.unsqueeze(-1).squeeze(-1)
        if s == "narrow cat":
            return torch.cat([h.narrow(1, 0, 2), h.narrow(1, 2, w - 2)], 1)
        if s == "h + h.sum(1, keepdim=True)":
            return h + h.sum(1, keepdim=True)
        if s == "h.view(B, -1, 2).sort(2)":
            return h.view(h.size(0), -1, 2).sort(2, descending=True)[0].view(h.size(0), -1)
        if s == "h - h.mean(1, keepdim=True)":
            return h - h.mean(1, keepdim=True)
        if s == "torch.where(const mask, h, -h)":
            return torch.where(torch.arange(w, device=h.device) % 2 == 0, h, -h)
        if s == "h.masked_fill(const mask, 0.5)":
            return h.masked_fill(torch.arange(w, device=h.device) < w // 2, 0.5)
        raise AssertionError(s)

    def mask(self, s, h):
        if s == "h * (h > 0).float()":
            return h * (h > 0).float()
        if s == "h * (h > 0)":
            return h * (h > 0)
        if s == "torch.where(h > 0, h, 0 * h)":
            return torch.where(h > 0, h, 0 * h)
        if s == "h.masked_fill(h < 0, 0)":
            return h.masked_fill(h < 0, 0)
        if s == "h * h.sign()":
            return h * h.sign()
        if s == "h.argmax(1) one-hot":
            return h + F.one_hot(h.argmax(1), self.w).to(h.dtype)
        raise AssertionError(s)

    def dropout(self, i, s, h):
        if s in ("nn.Dropout", "nn.Dropout(inplace)"):
            return self.mods[i](h)
        if s == "F.dropout(h, 0.3, self.training)":
            return F.dropout(h, 0.3, self.training)
        if s == "F.dropout(h, 0.3)":
            return F.dropout(h, 0.3)
        raise AssertionError(s)

    def skip(self, i, s, h):
        f = self.fcs[i]
        if s == "h = h + f(h)":
            return h + torch.tanh(f(h))
        if s == "h = f(h) + h":
            return torch.relu(f(h)) + h
        if s == "h += f(h) (aliased skip)":
            skip = h
            h += torch.relu(f(h))
            return h + skip
        if s == "torch.add(h, f(h))":
            return torch.add(h, f(h))
        if s == "h.add(f(h))":
            return h.add(torch.sigmoid(f(h)))
        if s == "h = h + f(maxmin(h))":  # the MaxMin (GroupSort-2) residual block of Lipschitz networks
            a, b = h.chunk(2, 1)
            return h + f(torch.cat([torch.max(a, b), torch.min(a, b)], 1))
        if s == "skip = h; h.relu_(); h + skip":
            h = f(h)
            skip = h
            h.relu_()
            return h + skip
        raise AssertionError(s)

    def contract(self, i, s, h):
        weight = self.fcs[i].weight
        if s == "einsum('bi,ji->bj', h, W)":
            return torch.einsum("bi,ji->bj", h, weight)
        if s == "einsum('ij,bj->bi', W, h)":
            return torch.einsum("ij,bj->bi", weight, h)
        if s == "einsum('bi,ij', h, W) implicit":
            return torch.einsum("bi,ij", h, weight)
        if s == "einsum('bi,ji->bj', [h, W])":
            return torch.einsum("bi,ji->bj", [h, weight])
        if s == "einsum('bgi,ji->bgj') on h.view(B, 2, -1)":
            half = self.w // 2
            return torch.einsum("bgi,ji->bgj", h.view(h.size(0), 2, half), weight[:half, :half]).reshape(h.size(0), -1)
        if s == "einsum('bi,i->bi', h, v)":
            return torch.einsum("bi,i->bi", h, weight[0])
        if s == "einsum('bi,ij->bij') summed back":
            return torch.einsum("bi,ij->bij", h, weight[:, :3]).sum(2)
        if s == "h + einsum('bi,bi->b', h, h)":
            return h + torch.einsum("bi,bi->b", h, h)[:, None]
        if s == "max_pool1d cat avg_pool1d":
            g = h[:, None]
            return torch.cat([F.max_pool1d(g, 2, 2), F.avg_pool1d(g, 2, 2)], 2).flatten(1)
        if s == "F.max_pool1d(h[:, None], 3, 1, 1)":
            return F.max_pool1d(h[:, None], 3, 1, 1).flatten(1)
        if s == "torch.max_pool1d(h[:, None], 2, 2) twice":
            g = torch.max_pool1d(h[:, None], 2, 2)
            return torch.cat([g, -g], 2).flatten(1)
        raise AssertionError(s)

    def forward(self, x):
        h = self.inp(x)
        for i, (family, s) in enumerate(self.steps):
            if family == "linear":
                h = self.fcs[i](h)
            elif family == "activation":
                h = self.activation(i, s, h)
            elif family == "scale":
                h = self.scale(s, h)
            elif family == "tuple":
                h = self.tuple_op(s, h)
            elif family == "view":
                h = self.view(s, h)
            elif family == "mask":
                h = self.mask(s, h)
            elif family == "layout":
                h = self.layout(s, h)
            elif family == "dropout":
                h = self.dropout(i, s, h)
            elif family == "skip":
                h = self.skip(i, s, h)
            elif family == "contract":
                h = self.contract(i, s, h)
        return self.out(h)


FAMILIES = {
    "linear": ["Linear"], "activation": ACTIVATION_SPELLINGS, "scale": SCALE_SPELLINGS, "tuple": TUPLE_SPELLINGS,
    "view": VIEW_SPELLINGS, "mask": MASK_SPELLINGS, "dropout": DROPOUT_SPELLINGS, "skip": SKIP_SPELLINGS,
    "layout": LAYOUT_SPELLINGS, "contract": CONTRACT_SPELLINGS,
}
# weights of the families in a draw: mostly what compiles, enough of the rest to test refusals
_FAMILY_DRAW = (["linear"] * 3 + ["activation"] * 4 + ["scale"] * 2 + ["skip"] * 2 + ["view"] * 2 + ["layout"] * 2
                + ["tuple", "mask", "dropout", "contract"])


@st.composite
def steps(draw):
    family = draw(st.sampled_from(_FAMILY_DRAW))
    return family, draw(st.sampled_from(FAMILIES[family]))


@st.composite
def user_models(draw):
    """``(model, d)``: a float64 Program in eval mode and its input width."""
    d = draw(st.integers(2, 6))
    w = draw(st.sampled_from([4, 6, 8]))
    classes = draw(st.integers(2, 4))
    prog = draw(st.lists(steps(), min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**16))
    model = Program(d, w, classes, prog, seed).double().eval()
    return model, d


def edit_weights(model: nn.Module, how: str, gen: torch.Generator) -> None:
    """Change the model's weights the way user code does, behind bcpc's back."""
    params = [p for p in model.parameters()]
    p = params[int(torch.randint(len(params), (1,), generator=gen))]
    noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if how == "p.data.mul_":
        p.data.mul_(1.7)
    elif how == "p.data.copy_":
        p.data.copy_(noise)
    elif how == "no_grad p.mul_":
        with torch.no_grad():
            p.mul_(-1.3)
    elif how == "load_state_dict":
        sd = {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
    elif how == "p.data = new":
        p.data = noise
    elif how == "p.data.clamp_":
        p.data.clamp_(-0.05, 0.05)
    elif how == "optimizer step":
        # random gradients: the user's own in-place ops may make its forward non-differentiable
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for q in model.parameters():
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
        opt.step()
        opt.zero_grad()
    else:
        raise AssertionError(how)
