"""State a model's forward reads besides its input, each found by the twenty-second session's new-user
review as a false certificate (``certify`` True at eps 0.5, the float64 model in the other class at a
point 0.5 away): values computed from buffers, parameters reached outside attributes, the process's
settings (grad mode, threads, environment), the batch size, and Python containers the change check
compared by identity. Each is now followed by the graph, refused at compile time, or seen as a
change after compile."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc.errors import BcpcError, GraphMismatchError, TraceError, UnsupportedOpError

X = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
Y = torch.tensor([0])
XP = torch.tensor([[3.5, 0.0, 0.0, 0.0]])  # ||XP - X|| = 0.5


class _Kinked(nn.Module):
    """z0 = h - 100 relu(h - cap(...)) against z1 = 2, with h = x0: class 0 at X (h = 3), class 1
    at XP when the kink at ``cap`` is below 3.5; ``cap`` is what each test makes of the model's state."""

    def __init__(self, cap):
        super().__init__()
        self.l = nn.Linear(4, 1)
        with torch.no_grad():
            self.l.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
            self.l.bias.zero_()
        self.cap = cap

    def forward(self, x):
        h = self.l(x)
        h = h - 100 * F.relu(h - self.cap(self, x))
        return torch.cat([h, torch.full_like(h, 2.0)], 1)


def _radii_alone_equal_radii_together(cert, xs, ys) -> bool:
    """The certified radii of a batch are those of each input certified alone, and all positive."""
    together = cert.certified_radius(xs, ys)
    alone = torch.cat([cert.certified_radius(xs[i:i + 1], ys[i:i + 1]) for i in range(len(xs))])
    return bool(torch.equal(together, alone) and (together > 0).all())


def _misclassifies_xp(model) -> bool:
    with torch.no_grad():
        return bool(model.double()(XP.double()).argmax(1).item() != 0)


def test_a_value_forward_computes_from_buffers_follows_the_buffers():
    """``(h - mean) / sqrt(var + eps)`` of buffers: fx used to compute the divisor once, at trace time,
    and keep it after ``load_state_dict`` changed ``var``."""

    class Standardize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(2))
            self.register_buffer("var", torch.ones(2))

        def forward(self, h):
            return (h - self.mean) / torch.sqrt(self.var + 1e-5)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.norm = nn.Linear(4, 2), Standardize()
            with torch.no_grad():
                self.l.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
                self.l.bias.copy_(torch.tensor([0.0, -3.2]))

        def forward(self, x):
            h = F.relu(self.norm(self.l(x)))  # unit 1 is 0 at X and active near XP
            z0 = h[:, :1] - h[:, 1:]
            return torch.cat([z0, torch.full_like(z0, 2.0)], 1)

    model = M().eval()
    cert = bcpc.compile(model, example_input=X)
    assert cert.certify(X, Y, 0.5).tolist() == [True]
    model.load_state_dict({**model.state_dict(), "norm.var": torch.tensor([1.0, 1e-4])})
    assert cert.certify(X, Y, 0.5).tolist() == [False]
    assert _misclassifies_xp(model)


def test_a_branch_on_a_buffer_is_refused_with_advice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("use_aux", torch.tensor(False))

        def forward(self, x):
            return x[:, :2] * 2 if self.use_aux else x[:, :2]

    with pytest.raises(TraceError, match="buffers"):
        bcpc.compile(M().eval(), example_input=X)


def test_a_buffer_item_is_read_at_every_call():
    class M(_Kinked):
        def __init__(self):
            super().__init__(lambda s, x: s.limit.item())
            self.register_buffer("limit", torch.tensor(5.0))

    model = M().eval()
    cert = bcpc.compile(model, example_input=X)
    assert cert.certify(X, Y, 0.5).tolist() == [True]
    model.limit.fill_(3.3)
    assert _misclassifies_xp(model.float()) and cert.certify(X, Y, 0.5).tolist() == [False]


@pytest.mark.parametrize("reach", [
    lambda m: next(m.aux.parameters()).abs(), lambda m: dict(m.aux.named_parameters())["w"] * 1,
    lambda m: m.aux._parameters["w"].detach() * 1, lambda m: next(m.aux.parameters()).data * 1,
    lambda m: m.aux._buffers["b"] * 1, lambda m: dict(m.aux.named_buffers())["b"] + 0,
    lambda m: m.aux.state_dict()["w"] * 1,
], ids=["parameters", "named_parameters", "_parameters_detach", "data", "_buffers", "named_buffers", "state_dict"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_state_reached_outside_its_attribute_is_refused(reach, grad):
    """fx follows ``self.aux.w``, not ``next(self.aux.parameters())`` or ``self._buffers["b"]``:
    what forward computed from the latter was kept as a constant of compile time while training or
    ``load_state_dict`` changed the state (with or without an autograd history: compiled under
    ``torch.no_grad()`` too)."""
    aux = nn.Module()
    aux.w = nn.Parameter(torch.tensor(5.0))
    aux.register_buffer("b", torch.tensor(5.0))
    model = _Kinked(lambda s, x: reach(s))
    model.aux = aux
    with torch.set_grad_enabled(grad), pytest.raises(UnsupportedOpError, match="parameter or buffer"):
        bcpc.compile(model.eval(), example_input=X)


def test_a_buffer_shape_is_a_number_at_trace_time_and_watched_after():
    """Buffers are traced as values, their shapes are the tensor's: ``range(self.pe.shape[0])``,
    ``len(self.pe)``, ``for row in self.pe``, ``self.pe.dim()`` compile (they were refused while the
    buffer was a Proxy); a buffer of another shape after compile is a change of the model."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("pe", torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]]))

        def forward(self, x):
            h = x
            for i in range(self.pe.shape[0]):
                h = h + self.pe[i]
            for row in self.pe:
                h = h - row * (len(self.pe) if self.pe.dim() == 2 else 0)
            return F.pad(h, (0, self.pe.shape[0] - 2))

    torch.manual_seed(0)
    model = M().double().eval()
    cert = bcpc.compile(model, example_input=X.double())
    xs = torch.randn(3, 4, dtype=torch.float64)
    ys = model(xs).argmax(1)
    assert (cert.certified_radius(xs, ys) > 0).all()
    model.pe = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(GraphMismatchError, match="shapes of the parameters and buffers"):
        cert.certify(xs, ys, 0.1)


@pytest.mark.parametrize("query", [
    lambda: not torch.is_grad_enabled(),
    lambda: torch.is_inference_mode_enabled(),
    lambda: torch.get_num_threads() > 64,
    lambda: torch.are_deterministic_algorithms_enabled(),
    lambda: os.environ.get("BCPC_TEST_KINK") == "1",
    lambda: "BCPC_TEST_KINK" in os.environ,
    lambda: os.getenv("BCPC_TEST_KINK") == "1",
    lambda: "BCPC_TEST_KINK" in list(os.environ),
    lambda: torch.initial_seed() == 1234,
    lambda: torch.zeros(1).is_inference(),
    lambda: torch.is_anomaly_enabled(),
], ids=["no_grad", "inference_mode", "threads", "deterministic", "environ_get", "environ_in", "getenv",
        "environ_list", "initial_seed", "is_inference", "anomaly"])
def test_forward_asking_the_process_for_a_setting_is_refused(query):
    """``if not torch.is_grad_enabled(): kink`` traced with gradients on certified a graph without
    the kink that ``model(x)`` under ``torch.no_grad()`` has."""
    model = _Kinked(lambda s, x: 3.3 if query() else 5.0).eval()
    with pytest.raises(TraceError, match="asks the process for a setting"):
        bcpc.compile(model, example_input=X)


def test_library_code_asking_for_grad_mode_is_not_refused_for_asking():
    """nn.MultiheadAttention asks for grad mode to choose its fused path, which computes the same."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            q = x.unsqueeze(1)
            return self.fc(self.attn(q, q, q, need_weights=False)[0][:, 0])

    with pytest.raises(UnsupportedOpError, match="product"):  # refused for what it computes, not for asking
        bcpc.compile(M().eval(), example_input=X)


@pytest.mark.parametrize("cap", [lambda s, x: 3.3 * x.size(0), lambda s, x: 3.3 * x.shape[0],
                                 lambda s, x: 0.825 * x.numel(), lambda s, x: 3.3 * x.size()[0],
                                 lambda s, x: x.new_full((1, 1), x.size(0)) * 3.3,
                                 lambda s, x: torch.arange(x.size(0)).view(-1, 1) + 3.3,
                                 lambda s, x: 96.8 * x.new_zeros(x.shape[0], 4).shape[0] - 93.6,
                                 lambda s, x: torch.zeros_like(x).size(0) * 3.3,
                                 lambda s, x: torch.ones_like(x)[:, :1].sum() * 3.3,
                                 lambda s, x: x.new_ones(x.size(0), 1).cumsum(0) * 3.3,
                                 lambda s, x: (torch.full_like(x, 1.0) * 2).sum() * 0.4125],
                         ids=["size0", "shape0", "numel", "size_tuple", "new_full_value", "arange", "new_zeros_shape",
                              "zeros_like_size", "ones_like_sum", "new_ones_cumsum", "full_like_times_sum"])
def test_a_value_computed_from_the_batch_size_is_refused(cap):
    """With ``cap = 3.3 * x.shape[0]`` the input X was certified in a batch of two and misclassified
    at XP alone."""
    with pytest.raises(UnsupportedOpError, match="batch size"):
        bcpc.compile(_Kinked(cap).eval(), example_input=X)


def test_the_batch_size_may_shape_tensors():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 6)
            self.token = nn.Parameter(torch.randn(1, 2))

        def forward(self, x):
            b, c = x.shape
            h = self.l(x).view(x.size(0), -1).reshape(b, 2, 3).flatten(1)
            extra = h.new_zeros(b, 2) + self.token.expand(x.shape[0], -1) + h.new_full((b, 1), 2.0)
            extra = extra + self.token.repeat(b, 1) + self.token.tile((b, 1)) + torch.ones_like(h[:, :2]) * 0.5
            return torch.cat([h, extra], 1) / x.shape[-1] * x.shape[1:].numel()

    torch.manual_seed(0)
    model = M().double().eval()
    cert = bcpc.compile(model, example_input=X.double())
    xs = torch.randn(5, 4, dtype=torch.float64)
    ys = model(xs).argmax(1)
    assert _radii_alone_equal_radii_together(cert, xs, ys)


class _Clipper:
    def __init__(self, cap):
        self.cap = cap

    def apply(self, s, x):
        return self.cap


@pytest.mark.parametrize("setup", ["set", "bytearray", "bound_method", "builtin_bound_method"])
def test_sets_bytearrays_and_bound_methods_are_compared_by_contents(setup):
    """The change check compared these by identity: a set or bytearray edited in place, or the
    object behind a bound method changed, left the old graph certified."""
    if setup == "bound_method":
        clipper = _Clipper(5.0)
        model = _Kinked(clipper.apply)
        change = lambda: setattr(clipper, "cap", 3.3)  # noqa: E731
    elif setup == "builtin_bound_method":
        table = {"cap": 5.0}
        model = _Kinked(lambda s, x: s.lookup("cap"))
        model.lookup = table.get
        change = lambda: table.__setitem__("cap", 3.3)  # noqa: E731
    else:
        flags = set() if setup == "set" else bytearray(b"\x00")
        model = _Kinked(lambda s, x: 3.3 if (1 in s.flags if setup == "set" else s.flags[0]) else 5.0)
        model.flags = flags
        change = (lambda: flags.add(1)) if setup == "set" else (lambda: flags.__setitem__(0, 1))
    model.eval()
    cert = bcpc.compile(model, example_input=X)
    assert cert.certify(X, Y, 0.5).tolist() == [True]
    change()
    assert _misclassifies_xp(model)
    model.float()
    with pytest.raises(GraphMismatchError, match="changed after bcpc.compile"):
        cert.certify(X, Y, 0.5)


def test_attention_without_dropout_is_refused_for_its_product_not_as_random():
    """``F.scaled_dot_product_attention(..., dropout_p=0.0)`` draws nothing; the review's message
    said it did."""

    class M(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            q = x.view(x.size(0), 1, 2, 2)
            return F.scaled_dot_product_attention(q, q, q, dropout_p=self.p).flatten(1)

    with pytest.raises(UnsupportedOpError, match="product of two values"):
        bcpc.compile(M(0.0).eval(), example_input=X)
    with pytest.raises(UnsupportedOpError, match="draws random numbers"):
        bcpc.compile(M(0.1).eval(), example_input=X)


def test_new_tensor_of_the_input_is_a_constant():
    """``x.new_tensor(0.5)`` reads x's dtype and device only (it was refused as an op without a rule)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x):
            return self.l(x) * x.new_tensor(0.5) + x.new_tensor([1.0, 2.0, 3.0])

    torch.manual_seed(0)
    model = M().double().eval()
    xs = torch.randn(4, 4, dtype=torch.float64)
    radius = bcpc.compile(model, example_input=xs).certified_radius(xs, model(xs).argmax(1))
    assert (radius > 0).all()


@pytest.mark.parametrize("mix", [
    lambda x: torch.cat([x, x.new_ones(x.size(0), x.size(0))], 1)[:, :4],
    lambda x: F.linear(x, x.new_ones(x.size(0), 4)),
    lambda x: x.reshape(2, -1).flip(1).reshape(-1, 4),
    lambda x: x.view(-1, x.size(0)).flip(1).reshape(x.size(0), -1),
], ids=["cat_BxB", "linear_Bx4", "literal_2", "view_minus1_B"])
def test_a_shape_that_depends_on_the_batch_beyond_its_first_dimension_is_refused(mix):
    """At a batch of two these look like per-sample re-layouts; at four they mix samples (the third
    review certified inputs in a batch of four that each misclassified alone). Shapes are now run at
    two batch sizes."""

    class M(nn.Module):
        def forward(self, x):
            return mix(x)[:, :2]

    with pytest.raises(BcpcError, match="batch"):
        bcpc.compile(M().eval(), example_input=torch.rand(1, 4))


def test_masks_built_from_ones_like_are_rows_and_compile():
    """Re-layouts of a tensor with equal rows keep its rows equal (the review's false refusals)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(12, 3)

        def forward(self, x):
            mask = torch.cat([torch.ones_like(x[:, :6]), torch.zeros_like(x[:, 6:])], dim=1)
            h = x * mask * torch.ones_like(x[:, 0]).unsqueeze(1) + torch.ones_like(x).view(x.size(0), 3, 4).flatten(1)
            return self.l(h * torch.ones_like(x)[:, :])

    torch.manual_seed(0)
    model = M().double().eval()
    xs = torch.randn(4, 12, dtype=torch.float64)
    ys = model(xs).argmax(1)
    cert = bcpc.compile(model, example_input=xs[:1])
    assert _radii_alone_equal_radii_together(cert, xs, ys)


@pytest.mark.parametrize("read", [lambda s: list(s.parameters())[1].item(), lambda s: s._buffers["b"].view(1).tolist()[0],
                                  lambda s: float(s.state_dict()["b"])], ids=["item", "tolist", "float"])
def test_a_number_read_from_state_outside_attributes_is_refused(read):
    """``next(self.parameters()).item()`` is a Python number fx keeps from compile time."""
    model = _Kinked(lambda s, x: read(s))
    model.register_buffer("b", torch.tensor(5.0))
    with pytest.raises(UnsupportedOpError, match="parameter or buffer"):
        bcpc.compile(model.eval(), example_input=X)


def test_a_size_computed_from_the_batch_size_is_a_value():
    """``B - 2 * (B // 4)`` is B at the batch sizes the shapes are run at (2, 3) and 2 at 4: used as a
    size in reshapes of a tensor with equal rows, it interleaved rows at batch 4 (a fourth review's
    false certificate). Only the batch size itself (or a shape holding it) may size a tensor."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("r", torch.tensor([0.0, 3.2, 0.0, 100.0, 0.0, 0.0]))

        def forward(self, x):
            b = x.size(0)
            f = b - 2 * (b // 4)
            t = (x.new_zeros(b, 6) + self.r).reshape(f, -1)
            t = t.view(f, -1, 6).transpose(1, 2).reshape(f, -1).reshape(b, -1)
            h = x[:, :1]
            return torch.cat([h - 100 * F.relu(h - t[:, 3:4]), 0 * h + 2], 1)

    with pytest.raises(UnsupportedOpError, match="batch size"):
        bcpc.compile(M().eval(), example_input=X)
