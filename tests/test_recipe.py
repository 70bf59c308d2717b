"""The training recipe beyond the paper (issue 15): MinMax 4C3F, TRADES and hinge losses, lam and
eps ramp shapes, exponential lr decay, the evaluation certificate and a late method switch."""
import math

import pytest
import torch
import torch.nn.functional as F

import bcpc
from bcpc import checkpoint, config, losses, margins, train
from bcpc.errors import ConfigError
from bcpc.models import ARCHITECTURES
from bcpc.train import fit, load_trained, lr_at, method_at, schedule
from tests.fixtures import tiny_mnist
from tests.test_train import small_cfg


def test_minmax_4c3f_has_the_4c3f_parameters_and_maxmin_activations():
    relu, minmax = ARCHITECTURES["mnist_4c3f"](), ARCHITECTURES["mnist_4c3f_minmax"]()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(relu) == count(minmax) == 1_974_762
    assert sum(isinstance(m, bcpc.nn.MaxMin) for m in minmax.modules()) == 6
    assert not any(isinstance(m, torch.nn.ReLU) for m in minmax.modules())
    wide = ARCHITECTURES["mnist_4c3f_minmax_w2"]()  # every hidden width doubled
    widths = [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
              for m in wide.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert widths == [64, 64, 128, 128, 1024, 1024, 10] and wide[9].in_features == 128 * 7 * 7
    dense = ARCHITECTURES["mnist_4c3f_minmax_fc1024"]()  # the dense layers alone doubled
    widths = [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
              for m in dense.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert widths == [32, 32, 64, 64, 1024, 1024, 10] and count(dense) == 4_372_970
    with pytest.raises(ValueError, match="dense_width must be an even number"):
        bcpc.models.conv_4c3f(1, 28, 10, activation="maxmin", dense_width=511)


def test_log_ramp_is_geometric_from_eps_start_and_lam_constant():
    cfg = config.TrainConfig(eps=2.0, warmup_epochs=0, ramp_epochs=4, eps_schedule="log", eps_start=0.01,
                             lam=1.5, lam_schedule="constant")
    spe = 10
    assert schedule(cfg, 0, spe) == pytest.approx((0.02, 1.5))
    assert schedule(cfg, 20, spe) == pytest.approx((0.2, 1.5))  # half-way: the geometric mean
    assert schedule(cfg, 40, spe) == pytest.approx((2.0, 1.5))
    assert schedule(cfg, 400, spe) == pytest.approx((2.0, 1.5))
    eps = [schedule(cfg, s, spe)[0] for s in range(50)]
    assert eps == sorted(eps)
    ramp = config.TrainConfig(eps=2.0, warmup_epochs=1, ramp_epochs=2, lam=0.5)
    assert schedule(ramp, 20, spe) == pytest.approx((1.0, 0.25))  # lam ramps to cfg.lam


def test_gloro_ramp_is_the_log_of_a_linear_ramp_of_exp_eps():
    """GloRo's "log" schedule: exp(eps) rises linearly from exp(eps_start * eps) to exp(eps); eps
    is above the linear ramp all along (concave), unlike the geometric ramp (below it)."""
    cfg = config.TrainConfig(eps=1.738, warmup_epochs=0, ramp_epochs=4, eps_schedule="gloro", eps_start=0.01)
    spe = 10
    assert schedule(cfg, 0, spe)[0] == pytest.approx(0.01738)
    assert schedule(cfg, 20, spe)[0] == pytest.approx(math.log((math.exp(0.01738) + math.exp(1.738)) / 2))
    assert schedule(cfg, 40, spe)[0] == pytest.approx(1.738) and schedule(cfg, 99, spe)[0] == pytest.approx(1.738)
    geometric = config.TrainConfig(eps=1.738, warmup_epochs=0, ramp_epochs=4, eps_schedule="log", eps_start=0.01)
    for step in range(1, 40):
        eps = schedule(cfg, step, spe)[0]
        assert schedule(geometric, step, spe)[0] < 1.738 * step / 40 < eps
    assert schedule(cfg, 12, spe)[0] > 1.738 / 2  # half the radius after 30% of the ramp (geometric: 85%)


def test_exponential_lr_decay_over_the_second_half():
    cfg = config.TrainConfig(epochs=11, lr=1e-3, lr_schedule="exp", lr_final=1e-6)
    rates = [lr_at(cfg, e) for e in range(11)]
    assert rates[:6] == [1e-3] * 6  # constant until epoch 5.5
    assert rates[-1] == pytest.approx(1e-6)
    assert all(a > b for a, b in zip(rates[5:], rates[6:]))
    ratios = [b / a for a, b in zip(rates[6:], rates[7:])]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric
    late = config.TrainConfig(epochs=10, lr=1e-3, lr_schedule="exp", lr_final=1e-5, lr_decay_start=7)
    assert [lr_at(late, e) for e in (6, 7, 8, 9)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def _random_margins(seed: int):
    """Logits, labels and margin bounds of a batch of 6 with 4 classes (+inf at the label)."""
    torch.manual_seed(seed)
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    m = torch.rand(6, 4, dtype=torch.float64) * 2 - 0.5
    m[torch.arange(6), y] = math.inf
    return logits, y, m


def test_losses_match_their_formulas():
    logits, y, m = _random_margins(0)
    zw = margins.worst_logits(logits, m, y)
    ce = F.cross_entropy(logits, y)
    bcp = losses.certified_loss("bcp", logits, m, y, 0.3)
    assert bcp == pytest.approx(float(0.7 * ce + 0.3 * F.cross_entropy(zw, y)))
    p = logits.softmax(1)
    kl = (p * (p.log() - zw.log_softmax(1))).sum(1).mean()
    assert losses.certified_loss("trades", logits, m, y, 1.5) == pytest.approx(float(ce + 1.5 * kl))
    finite = m.masked_fill(torch.isinf(m), 0)
    hinge = (torch.relu(0.7 - finite) * (~torch.isinf(m))).sum(1).mean() / 4
    assert losses.certified_loss("hinge", logits, m, y, 1.0, hinge_margin=0.7) == pytest.approx(float(hinge))
    for kind in losses.LOSSES:
        assert losses.certified_loss(kind, logits, m, y, 0.0) == pytest.approx(float(ce))
    # all margins certified with room: the hinge term vanishes, TRADES' KL stays >= 0
    big = torch.full_like(m, 10.0)
    assert losses.certified_loss("hinge", logits, big, y, 1.0) == 0
    assert losses.certified_loss("trades", logits, m, y, 1.0) >= ce
    with pytest.raises(ValueError, match="unknown loss"):
        losses.certified_loss("focal", logits, m, y, 1.0)


def test_cll_is_cross_entropy_over_calibrated_radii():
    """CLL in its paper's own terms: q_j = ((z_j - z_y) / K_yj + eps) / sigma, sigma = 2 eps / Q,
    Q = logit(1 - p/2) - logit(p/2), with the global bound's K_yj = t_j / eps."""
    torch.manual_seed(1)
    eps, p = 1.3, 0.2
    logits = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    k = torch.rand(8, 5, dtype=torch.float64) + 0.1          # each pair's Lipschitz constant
    gap = logits.gather(1, y.unsqueeze(1)) - logits
    m = gap - eps * k                                       # the global bound's margins at eps
    m[torch.arange(8), y] = math.inf
    logit = lambda v: math.log(v / (1 - v))
    sigma = 2 * eps / (logit(1 - p / 2) - logit(p / 2))
    q = ((-gap) / k + eps) / sigma
    q[torch.arange(8), y] = 0.0
    expected = F.cross_entropy(q, y)
    assert losses.certified_loss("cll", logits, m, y, 1.0, slack=p) == pytest.approx(float(expected))
    ce = F.cross_entropy(logits, y)
    assert losses.certified_loss("cll", logits, m, y, 0.25, slack=p) == pytest.approx(
        float(0.75 * ce + 0.25 * expected))
    # the radius does not change when the network's output is scaled, nor does the loss
    assert losses.cll_logits(7 * logits, 7 * m, y, p) == pytest.approx(losses.cll_logits(logits, m, y, p))
    # a larger clean margin at the same translation (a larger radius): less loss
    up = logits + 0.1 * F.one_hot(y, 5)
    assert losses.certified_loss("cll", up, m + 0.1, y, 1.0, slack=p) < expected
    # a pair with no translation gives a finite loss
    assert torch.isfinite(losses.certified_loss("cll", logits, gap.masked_fill(torch.isinf(m), math.inf), y, 1.0))
    with pytest.raises(ValueError, match="slack"):
        losses.certified_loss("cll", logits, m, y, 1.0, slack=1.0)


def test_gloro_loss_is_the_kl_with_a_bottom_class_against_the_prediction():
    """GloRo's form: margins against the predicted class k, an 11th "bottom" logit
    z_bot = max_j (z_j + eps K_kj) = z_k - min_j m_j, and KL([softmax(z), 0] || softmax([z, z_bot]))."""
    torch.manual_seed(1)
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    k = logits.argmax(1)
    m = torch.rand(6, 4, dtype=torch.float64) * 2 - 0.5
    m[torch.arange(6), k] = math.inf
    z_bot = (logits.gather(1, k[:, None]) - m).masked_fill(torch.isinf(m), -math.inf).max(1, keepdim=True).values
    q = torch.cat([logits, z_bot], 1).log_softmax(1)[:, :4]
    p = logits.softmax(1)
    kl = (p * (p.log() - q)).sum(1).mean()  # the target's 11th entry is 0: no term
    expected = F.cross_entropy(logits, y) + 1.5 * kl
    assert losses.certified_loss("gloro", logits, m, y, 1.5) == pytest.approx(float(expected))
    # through the certifying module: the margins are the prediction's, whatever the labels
    torch.manual_seed(0)
    model = ARCHITECTURES["mnist_small_minmax"]().double()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), method="lipschitz")
    labels = torch.tensor([3, 1, 4, 1, 5])
    cert.eval()  # the power iteration stands still: both calls see the same estimates
    with torch.no_grad():
        out = cert.forward(x, 0.5, None, sound=False)
        direct = losses.certified_loss("gloro", out.logits, out.margins, labels, 1.5)
        via_module = cert.loss(x, labels, 0.5, lam=1.5, kind="gloro")
    assert float(via_module) == pytest.approx(float(direct))
    with torch.no_grad():  # with the labels' margins it would be another number
        out_y = cert.forward(x, 0.5, labels, sound=False)
    assert float(losses.certified_loss("gloro", out_y.logits, out_y.margins, labels, 1.5)) != pytest.approx(float(direct))


def test_emma_translates_each_class_up_to_a_tie_at_most_with_the_factor_held_fixed():
    """EMMA: ze_j = z_j + t_j * sg(clip((z_y - z_j) / t_j, 0, 1)), t_j = z_y - z_j - m_j, written
    out by hand per entry; with every margin certified (m_j >= 0) it is the paper's worst-case
    logits, and the clipped factor carries no gradient."""
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 1.0, 3.0, -2.0]], dtype=torch.float64,
                          requires_grad=True)
    y = torch.tensor([0, 1])
    m = torch.tensor([[math.inf, 0.5, -1.0, -0.5], [-2.0, math.inf, -3.0, 1.0]], dtype=torch.float64)
    expected = torch.empty(2, 4, dtype=torch.float64)
    for b in range(2):
        zy = float(logits[b, y[b]])
        for j in range(4):
            z = float(logits[b, j])
            if j == int(y[b]):
                expected[b, j] = z
                continue
            t = zy - z - float(m[b, j])
            expected[b, j] = z + t * min(max((zy - z) / t, 0.0), 1.0)
    ze = losses.emma_logits(logits, m, y)
    assert torch.allclose(ze.detach(), expected)
    # row 0: class 1 (gap 1, t 0.5) is translated fully, classes 2 and 3 (t 4 and 2) to a tie;
    # row 1: class 0 (gap 1, t 3) to a tie, class 2 (beats the label) not at all
    assert torch.allclose(ze.detach(), torch.tensor([[2.0, 1.5, 2.0, 2.0], [1.0, 1.0, 3.0, 0.0]], dtype=torch.float64))
    loss = losses.certified_loss("emma", logits, m, y, 0.6)
    assert float(loss) == pytest.approx(float(0.4 * F.cross_entropy(logits, y) + 0.6 * F.cross_entropy(expected, y)))
    certified = torch.tensor([[math.inf, 0.25, 0.5, 1.0]], dtype=torch.float64)  # row 0: each m_j <= z_y - z_j
    assert torch.equal(losses.emma_logits(logits[:1], certified, y[:1]), margins.worst_logits(logits[:1], certified, y[:1]))
    # the clip factor is held fixed: a class translated to a tie moves with z_j + t_j * const, whose
    # derivative in z_j is 1 - const (t_j = z_y - z_j - m_j), not 0 as a clipped tie's would be
    (grad,) = torch.autograd.grad(ze[0, 2], logits)
    assert grad[0, 2] == pytest.approx(1 - 3.0 / 4.0) and grad[0, 0] == pytest.approx(3.0 / 4.0)


def test_orthogonal_init_gives_orthogonal_flattened_weights_and_zero_biases(tmp_path):
    from bcpc.train import build

    cfg = config.TrainConfig(model="mnist_4c3f_minmax", init="orthogonal")
    model, _ = build(cfg, torch.zeros(1, 1, 28, 28))
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 7
    for layer in layers:
        w = layer.weight.detach().flatten(1).double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-5)
        assert (layer.bias == 0).all()
    default, _ = build(config.TrainConfig(model="mnist_4c3f_minmax"), torch.zeros(1, 1, 28, 28))
    assert not torch.equal(default[0].weight, model[0].weight)


def test_config_accepts_yaml_exponents_and_suggests_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: mnist_small\nlr: 3e-4\nlr_final: 1E-6\n")
    cfg = config.load(p)
    assert cfg.lr == 3e-4 and cfg.lr_final == 1e-6
    p.write_text("model: mnist_small\nlearning_rate: 3e-4\nramp_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"'ramp_epoch' \(did you mean 'ramp_epochs'\?\)"):
        config.load(p)
    p.write_text("model: mnist_small\nlr: fast\n")
    with pytest.raises(ConfigError, match="'lr' must be float"):
        config.load(p)
    for bad, msg in [("loss: focal", "unknown loss 'focal'"), ("init: xavier", "unknown init 'xavier'"), ("eps_schedule: cosine", "unknown eps_schedule"),
                     ("late_method: bcp", "late_method and late_method_epoch go together"),
                     ("eval_method: crown", "unknown eval_method"), ("eps_start: 0", "eps_start must be in"),
                     ("lr_schedule: exp\nlr_final: 1.0", "lr_final must be in")]:
        p.write_text(f"model: mnist_small\n{bad}\n")
        with pytest.raises(ConfigError, match=msg):
            config.load(p)


def test_recipe_keys_enter_the_fingerprint_only_when_set():
    base = config.TrainConfig()
    assert config.TrainConfig(val_every=5, eval_method="bcp").fingerprint() == base.fingerprint()
    for key, value in [("init", "orthogonal"), ("loss", "gloro"), ("loss", "trades"), ("lam", 1.5), ("eps_schedule", "log"), ("eps_schedule", "gloro"),
                       ("lr_schedule", "exp")]:
        assert config.TrainConfig(**{key: value}).fingerprint() != base.fingerprint(), key


def test_training_with_the_global_bound_certifies_with_bcp_and_switches_late(tmp_path):
    """method lipschitz trains on the ball alone; validation, best.pt and load_trained certify with
    BCP (eval_method); late_method switches the loss's bound for the last epoch, continuing the
    same power iteration; the run resumes across the switch."""
    tiny_mnist(tmp_path / "d")
    kw = dict(model="mnist_small_minmax", method="lipschitz", late_method="bcp", late_method_epoch=1, loss="trades",
              lam=1.5, lam_schedule="constant", eps_schedule="log", lr_schedule="exp", lr_final=1e-5)
    assert method_at(small_cfg(tmp_path, **kw), 0) == "lipschitz" and method_at(small_cfg(tmp_path, **kw), 1) == "bcp"
    full = fit(small_cfg(tmp_path, name="full", **kw), progress=False, log=lambda *_: None)
    part = small_cfg(tmp_path, name="part", **kw)
    fit(part, progress=False, max_steps=13, log=lambda *_: None)  # stops after the switch (10 steps/epoch)
    second = fit(part, resume=True, progress=False, log=lambda *_: None)
    a = checkpoint.load(full.run_dir / "last.pt")
    b = checkpoint.load(second.run_dir / "last.pt")
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    for k in a["lip_state"]:
        assert torch.equal(a["lip_state"][k], b["lip_state"][k]), k
    model, cert, cfg, _ = load_trained(full.run_dir / "best.pt")
    assert cert.method == "bcp" and cfg.method == "lipschitz"
    x = torch.rand(8, 1, 28, 28)
    y = model(x).argmax(1)
    glob = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), method="lipschitz")
    # BCP's margins are never below the global bound's (the box can only tighten the ball)
    assert (cert.margins(x, y, 0.3) >= glob.margins(x, y, 0.3) - 1e-9).all()


def test_apgd_finds_what_pgd_finds_and_never_breaks_a_certificate():
    """APGD-CE + APGD-T (torchattacks) on a small model: the points it leaves robust are a subset of
    the clean-correct ones, it is at least about as strong as bcpc's PGD, and no input certified at
    eps is broken by it (a broken certificate would be a soundness bug)."""
    pytest.importorskip("torchattacks")
    from bcpc.testing import apgd_robust, margin_of, pgd_margin

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 32), bcpc.nn.MaxMin(),
                                torch.nn.Linear(32, 4))
    x = torch.rand(64, 1, 6, 6)
    y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % 4  # some misclassified inputs: never robust
    robust = apgd_robust(model, x, y, 0.5, steps=30)
    assert not robust[:8].any()
    clean = model(x).argmax(1) == y
    assert (robust <= clean).all() and robust.sum() < clean.sum()
    pgd = margin_of(model(pgd_margin(model, x, y, 0.5, steps=30, domain=(0.0, 1.0))), y) > 0
    assert robust.sum() <= (pgd & clean).sum() + 2
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    for eps in (0.05, 0.1, 0.2):
        certified = cert.certify(x, y, eps)
        assert certified.any()
        assert apgd_robust(model, x[certified], y[certified], eps, steps=30).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apgd_robust(model, x + 2, y, 0.5)


def test_bfloat16_step_precision_keeps_linear_layers_and_matrix_products_in_float32():
    """Under precision bfloat16 a convolution computes in bfloat16, every spelling of a linear
    layer or matrix product in float32 (the long recipe diverged with them in bfloat16), and the
    gradients reach float32 weights; under float32 nothing changes; autocast is off after it."""
    conv, lin = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(2, 1, 5, 5)
    with train.step_precision("bfloat16", torch.device("cpu")):
        h = conv(x)
        f = h.mean((2, 3))
        b = lin.bias
        products = [lin(f), F.linear(f, lin.weight, bias=b), f @ lin.weight.T + b, torch.matmul(f, lin.weight.T) + b,
                    f.mm(lin.weight.t()) + b, torch.addmm(b, f, lin.weight.t()), torch.einsum("bi,ji->bj", f, lin.weight) + b,
                    torch.einsum("bi,ji->bj", [f, lin.weight]) + b, torch.bmm(f[None], lin.weight.t()[None])[0] + b]
    assert h.dtype == torch.bfloat16
    assert [p.dtype for p in products] == [torch.float32] * len(products)
    expected = F.linear(f.float(), lin.weight, lin.bias)  # float32 products of the bfloat16-rounded input
    for p in products:
        torch.testing.assert_close(p, expected)
    sum(p.sum() for p in products).backward()
    assert conv.weight.grad.dtype == lin.weight.grad.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    with train.step_precision("float32", torch.device("cpu")):
        assert conv(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_bfloat16_precision_trains_the_step_under_autocast_and_validates_soundly(tmp_path):
    """precision: bfloat16 runs each step's forward and backward with the convolutions under CPU
    autocast (the fused float kernels step aside), with float32 weights: the losses move by
    bfloat16 rounding, not more; validation certifies in float64 as always; other precisions are
    refused."""
    tiny_mnist(tmp_path / "d")
    runs = {}
    for precision in ("float32", "bfloat16"):
        cfg = small_cfg(tmp_path, name=precision, model="mnist_small_minmax", method="lipschitz", loss="emma",
                        precision=precision, epochs=1, warmup_epochs=0)
        runs[precision] = fit(cfg, progress=False, log=lambda *_: None)
    lo, hi = runs["bfloat16"].history[-1], runs["float32"].history[-1]
    assert math.isfinite(lo["loss"]) and lo["loss"] != hi["loss"]
    assert lo["loss"] == pytest.approx(hi["loss"], rel=0.05)
    model, _cert, saved_cfg, _ = load_trained(runs["bfloat16"].run_dir / "best.pt")
    assert saved_cfg.precision == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="precision"):
        small_cfg(tmp_path, precision="float16")


def test_loss_temperature_scales_logits_and_margins_before_every_loss():
    logits, y, m = _random_margins(2)
    for kind in losses.LOSSES:
        hot = losses.certified_loss(kind, logits, m, y, 0.7, temperature=3.0)
        assert hot == pytest.approx(float(losses.certified_loss(kind, 3.0 * logits, 3.0 * m, y, 0.7)))
    # a sharper loss at the same radii: GloRo's loss of a correct, certified batch falls
    ok = logits + 4 * F.one_hot(y, 4)
    margins_ok = ok.gather(1, y[:, None]) - ok - 0.5
    margins_ok[torch.arange(6), y] = math.inf
    assert losses.certified_loss("gloro", ok, margins_ok, y, 1.5, temperature=2.0) < \
        losses.certified_loss("gloro", ok, margins_ok, y, 1.5)
    with pytest.raises(bcpc.errors.ConfigError, match="loss_temperature"):
        config.from_dict({"loss_temperature": 0.0}, "test")
