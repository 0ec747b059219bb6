"""The network, the losses (paper eq. 1-3) and AdaBelief, against hand-computed values."""
import math

import pytest
import torch
import torchvision

import hmtl
import hmtl_tiles


def count(module):
    return sum(p.numel() for p in module.parameters())


def bottleneck_params(c):  # three convs with BatchNorm, width c -> c/4 -> c/4 -> c, identity skip
    q = c // 4
    return c * q + 2 * q + 9 * q * q + 2 * q + q * c + 2 * c


def basic_block_params(c):  # two 3x3 convs with BatchNorm, identity skip
    return 2 * (9 * c * c + 2 * c)


@pytest.mark.parametrize("flag,task", [(1, "puzzle_rotation"), (2, "puzzle"), (3, "rotation"), (4, "puzzle_rotation")])
def test_resnet50_parameter_counts_per_flag_and_task(flag, task):
    grid = 3
    model = hmtl.HMTL("resnet50", angles=3, head="catreg", bin_width=3, task=task, flag=flag, grid=grid)
    backbone = count(torchvision.models.resnet50()) - (2048 * 1000 + 1000)
    heads = 3 * (2048 * 66 + 66)
    c = 256 * 2 ** (flag - 1)
    classes = {"puzzle": 9, "rotation": 4}
    branches = sum(bottleneck_params(c) + c * 9 * classes[t] + 9 * classes[t] for t in hmtl.SSL_TASKS[task])
    assert count(model) == backbone + heads + branches
    assert count(model.deployable()) == backbone + heads


@pytest.mark.parametrize("flag,task", [(1, "puzzle"), (2, "rotation"), (3, "none"), (4, "puzzle_rotation")])
def test_output_shapes_and_the_deployable_network(flag, task):
    torch.manual_seed(0)
    model = hmtl.HMTL("resnet18", angles=2, head="reg", task=task, flag=flag, grid=2).eval()
    c = 64 * 2 ** (flag - 1)
    assert count(model) - count(model.deployable()) == sum(
        basic_block_params(c) + c * 4 * k + 4 * k for k in [{"puzzle": 4, "rotation": 4}[t] for t in hmtl.SSL_TASKS[task]])
    x = torch.randn(3, 3, 32, 32)
    pose, ssl = model(x)
    assert pose.shape == (3, 2, 1)
    assert {t: v.shape for t, v in ssl.items()} == {t: (3, 4, 4) for t in hmtl.SSL_TASKS[task]}
    deployed = model.deployable()
    assert len(deployed.ssl_branches) == 0 and not any("ssl" in k for k in deployed.state_dict())
    assert torch.equal(deployed(x)[0], pose) and deployed(x)[1] == {}


def test_pretraining_network_puts_the_ss_heads_where_the_pose_heads_were():
    model = hmtl.HMTL("resnet18", angles=0, task="puzzle_rotation", flag=4, grid=3, ssl_block=False)
    pose, ssl = model(torch.randn(2, 3, 48, 48))
    assert pose is None and ssl["puzzle"].shape == (2, 9, 9) and ssl["rotation"].shape == (2, 9, 4)
    assert count(model) == count(torchvision.models.resnet18()) - (512 * 1000 + 1000) + 512 * 9 * 13 + 9 * 13


@pytest.mark.parametrize("width,bins", [(3, 66), (1, 198)])
def test_catreg_expectation_recovers_an_angle_from_a_one_hot_at_its_bin_centre(width, bins):
    centres = hmtl.bin_centres(width)
    assert len(centres) == bins and centres[0] == -99 + width / 2 and centres[-1] == 99 - width / 2
    for i in (0, 7, bins // 2, bins - 1):
        logits = torch.full((bins,), -1e4)
        logits[i] = 0
        assert hmtl.expected_angle(logits, centres).item() == pytest.approx(centres[i].item(), abs=1e-4)


def test_catreg_loss_by_hand():
    centres = hmtl.bin_centres(3)
    target = torch.tensor([[30.0, -15.0, 0.0], [-30.0, 45.0, 9.0]])
    # uniform logits: CE = ln 66 per angle, expected angle = mean of the centres = 0
    uniform = torch.zeros(2, 3, 66)
    rmse = [math.sqrt((30 ** 2 + 30 ** 2) / 2), math.sqrt((15 ** 2 + 45 ** 2) / 2), math.sqrt((0 + 9 ** 2) / 2)]
    assert hmtl.catreg_loss(uniform, target, centres, 2.0).item() == pytest.approx(3 * math.log(66) + 2 * sum(rmse), rel=1e-5)
    # one-hot on the right bins (30° is bin 43, centred at 31.5): CE ~ 0, angle = bin centre
    sure = torch.full((2, 3, 66), -1e4)
    bins = ((target + 99) / 3).floor().long()
    sure.scatter_(2, bins[..., None], 0.0)
    off = (centres[bins] - target) ** 2
    assert hmtl.catreg_loss(sure, target, centres, 2.0).item() == pytest.approx(2 * off.mean(0).sqrt().sum().item(), abs=1e-3)
    assert bins[0, 0] == 43 and centres[43] == 31.5


def test_catreg_bins_a_target_by_the_bin_it_lies_in():
    """Targets inside bins, not on their edges: 2.0° lies in [0°, 3°), bin 33 (rounding would say 34);
    -97.6° in bin 0, 98.9° in the last, 65."""
    centres = hmtl.bin_centres(3)
    target = torch.tensor([[2.0, -97.6, 98.9]])
    sure = torch.full((1, 3, 66), -1e4)
    sure[0, [0, 1, 2], [33, 0, 65]] = 0.0  # one-hot on the hand-picked bins: CE ~ 0
    off = [abs(1.5 - 2.0), abs(-97.5 + 97.6), abs(97.5 - 98.9)]  # the expected angle is the bin's centre
    assert hmtl.catreg_loss(sure, target, centres, 2.0).item() == pytest.approx(2 * sum(off), abs=1e-3)


def test_reg_ssl_and_total_losses_by_hand():
    assert hmtl.reg_loss(torch.tensor([[[1.0], [2.0]], [[3.0], [-2.0]]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])).item() \
        == pytest.approx(math.sqrt(5) + 2, rel=1e-6)
    labels = {"puzzle": torch.tensor([[2, 0, 3, 1]]), "rotation": torch.tensor([[0, 0, 3, 1]])}
    logits = {"puzzle": torch.zeros(1, 4, 4), "rotation": torch.zeros(1, 4, 4)}
    assert hmtl.ssl_loss(logits, labels).item() == pytest.approx(8 * math.log(4), rel=1e-6)  # 8 heads, 4 classes
    logits["puzzle"][0, torch.arange(4), labels["puzzle"][0]] = 1e4  # puzzle heads sure and right
    assert hmtl.ssl_loss(logits, labels).item() == pytest.approx(4 * math.log(4), rel=1e-6)
    assert hmtl.hmtl_loss(torch.tensor(2.0), torch.tensor(0.5), 50.0).item() == 27.0


def test_adabelief_without_rectification_follows_its_update_rule_by_hand():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = hmtl.AdaBelief([theta], lr=0.1, betas=(0.9, 0.999), eps=1e-16, rectify=False)
    b1, b2, eps, lr = 0.9, 0.999, 1e-16, 0.1
    m, s, want = [0.0, 0.0], [0.0, 0.0], [1.0, -2.0]
    for t, g in enumerate(([0.5, -1.0], [-0.2, 0.3], [0.4, 0.4]), start=1):
        theta.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            s[i] = b2 * s[i] + (1 - b2) * (g[i] - m[i]) ** 2 + eps
            want[i] -= lr * (m[i] / (1 - b1 ** t)) / (math.sqrt(s[i] / (1 - b2 ** t)) + eps)
        assert theta.tolist() == pytest.approx(want, rel=1e-12)
        if t == 1:  # m̂ = g and ŝ = (0.9 g)²: each weight moves by lr / 0.9 against its gradient
            assert theta.tolist() == pytest.approx([1.0 - lr / 0.9, -2.0 + lr / 0.9], rel=1e-12)
    assert opt.state[theta]["step"] == 3


def test_rectified_adabelief_by_hand_on_a_toy_problem():
    """f(θ) = θ²/2 from θ = 1 (gradient θ), with β2 = 0.9 so that the rectification starts within a few
    steps: ρ_∞ = 2/(1 - 0.9) - 1 = 19 and ρ_t = 19 - 2t·0.9^t/(1 - 0.9^t) = 1, 1.95, 2.86, 3.74, 4.58 for
    t = 1..5 (< 5: SGD with momentum, the package's degenerated_to_sgd), then 5.39, 6.17, 6.91
    (≥ 5: rectified adaptive steps)."""
    lr, b1, b2, eps = 0.1, 0.9, 0.9, 1e-16
    theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = hmtl.AdaBelief([theta], lr=lr, betas=(b1, b2), eps=eps)
    rho_inf = 2 / (1 - b2) - 1
    m = s = 0.0
    x = 1.0
    for t in range(1, 9):
        rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        assert hmtl.AdaBelief.rectification(t, b2)[0] == pytest.approx(rho)
        g = x
        theta.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        if rho < 5:
            assert t <= 5
            x -= lr * m / (1 - b1 ** t)
        else:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            x -= lr * r * (m / (1 - b1 ** t)) * math.sqrt(1 - b2 ** t) / (math.sqrt(s) + eps)
        assert theta.item() == pytest.approx(x, rel=1e-12), t
    # step 1 by hand: m = 0.1, an SGD step of lr·m/(1 - β1) = 0.1
    rectified = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = hmtl.AdaBelief([rectified], lr=lr, betas=(b1, b2))
    rectified.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert rectified.item() == pytest.approx(0.9, rel=1e-12)


def test_rectification_is_a_warm_up_over_thousands_of_steps():
    """With the paper's β2 = 0.999: no adaptive step before ρ_t reaches 5, then r_t rises towards 1."""
    r = {t: hmtl.AdaBelief.rectification(t, 0.999)[1] for t in (1, 4, 5, 6, 100, 1000, 3000, 20000)}
    assert r[1] is None and r[4] is None and r[5] is None and r[6] is not None
    assert r[6] < 0.05 and r[100] < 0.25 < r[1000] < r[3000] < r[20000] < 1
    assert r[1000] == pytest.approx(0.65, abs=0.01) and r[3000] == pytest.approx(0.92, abs=0.01)


def test_adabelief_weight_decay_is_decoupled():
    theta = torch.nn.Parameter(torch.tensor([2.0]))
    opt = hmtl.AdaBelief([theta], lr=0.1, weight_decay=0.5, rectify=False)
    theta.grad = torch.tensor([1.0])
    opt.step()
    assert theta.item() == pytest.approx(2.0 * (1 - 0.05) - 0.1 / 0.9, rel=1e-6)


def test_ss_loss_averages_over_the_shuffled_images_only():
    labels = {"puzzle": torch.tensor([[1, 0], [0, 1], [1, 0]])}
    logits = {"puzzle": torch.zeros(3, 2, 2)}
    logits["puzzle"][0] = torch.tensor([[0.0, 5.0], [5.0, 0.0]])  # image 0: sure and right
    right = 2 * math.log(1 + math.exp(-5))
    assert hmtl.ssl_loss(logits, labels).item() == pytest.approx((right + 2 * 2 * math.log(2)) / 3, rel=1e-6)
    shuffled = torch.tensor([True, False, True])
    assert hmtl.ssl_loss(logits, labels, shuffled).item() == pytest.approx((right + 2 * math.log(2)) / 2, rel=1e-6)
    assert hmtl.ssl_loss(logits, labels, torch.zeros(3, dtype=torch.bool)).item() == 0


class Recorder(torch.nn.Module):
    """A stand-in network that keeps what it was fed and answers zeros (one weight, so that a step runs)."""

    def __init__(self, grid=3):
        super().__init__()
        self.weight, self.grid, self.seen = torch.nn.Parameter(torch.zeros(())), grid, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        n, g2 = len(x), self.grid ** 2
        zeros = lambda *shape: self.weight * torch.zeros(*shape)
        return x.mean((2, 3))[:, :, None] + zeros(n, 3, 1), {"puzzle": zeros(n, g2, g2), "rotation": zeros(n, g2, 4)}


def test_the_ss_labels_describe_the_image_that_reaches_the_network(monkeypatch):
    """What train_step feeds the network and what it teaches the SS heads agree, tile by tile: with g = 3
    and puzzle-rotation, a label inverted (the permutation's inverse, or 4 - k for a turn) would name
    another tile or corner."""
    g, t = 3, 8
    # Tile q of each image holds 20·q + 10, with 1 added in its top-left pixel.
    tiles = (20 * torch.arange(9, dtype=torch.uint8) + 10).view(3, 3).repeat_interleave(t, 0).repeat_interleave(t, 1)
    tiles[::t, ::t] += 1
    images = tiles[None, :, :, None].expand(64, 24, 24, 3).contiguous()
    cfg = {"aug": "0", "grid": g, "flip": 0.0, "ss_fraction": 1.0, "data": "synthetic", "task": "puzzle_rotation",
           "head": "reg", "ssl_weight": 1.0}
    taught = []
    real = hmtl.ssl_loss
    monkeypatch.setattr(hmtl, "ssl_loss", lambda logits, labels, shuffled: taught.append(labels) or
                        real(logits, labels, shuffled))
    model, rt = Recorder(), hmtl.argparse.Namespace(device=torch.device("cpu"), rows=slice(None),
                                                    autocast=lambda: torch.autocast("cpu", enabled=False),
                                                    scaler=torch.amp.GradScaler("cpu", enabled=False))
    draw = hmtl.Draws(torch.Generator().manual_seed(1), 64, slice(None), torch.device("cpu"))
    hmtl.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), images, torch.zeros(64, 3), cfg, rt, draw)
    perm, rot = taught[0]["puzzle"], taught[0]["rotation"]
    assert (perm.gather(1, perm) != torch.arange(9)).any(1).all()  # no permutation is its own inverse
    assert (rot == 1).any() and (rot == 3).any()  # turns that are not their own inverse
    scale, shift = hmtl_tiles.normalize_affine(hmtl_tiles.IMAGENET_MEAN, hmtl_tiles.IMAGENET_STD)
    value = ((model.seen[0][:, 0] - shift[0]) / scale[0]).round()
    corner = {0: (0, 0), 1: (t - 1, 0), 2: (t - 1, t - 1), 3: (0, t - 1)}  # where a turn puts the top-left pixel
    for n in range(64):
        for p in range(9):
            tile = value[n, p // 3 * t:(p // 3 + 1) * t, p % 3 * t:(p % 3 + 1) * t]
            assert tile.min() == 20 * perm[n, p] + 10 and tile[corner[int(rot[n, p])]] == 20 * perm[n, p] + 11


def test_evaluation_never_augments_flips_or_shuffles(monkeypatch):
    """Under the heaviest augmentation, flips always on and HMTL's tiles, the pose heads are scored on
    the plain normalised image, and the loss it gives is what the MAE reports."""
    cfg = {"data": "synthetic", "task": "puzzle_rotation", "grid": 2, "aug": "2", "flip": 1.0, "ss_fraction": 1.0,
           "no_ssh": False, "batch_size": 4, "seed": 0, "head": "reg", "bin_width": 3.0, "stage": "train"}
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    angles = torch.zeros(6, 3)
    rt = hmtl.argparse.Namespace(device=torch.device("cpu"), rows=slice(None), world=1,
                                 autocast=lambda: torch.autocast("cpu", enabled=False))
    loader = [(images[:4], angles[:4]), (images[4:], angles[4:])]
    model = Recorder(grid=2)  # its "angles": the mean of each input channel
    metrics = hmtl.evaluate(model, loader, cfg, rt, 6)
    seen, plain = model.seen, hmtl_tiles.normalize(images)
    assert torch.equal(seen[0], plain[:4]) and torch.equal(seen[2], plain[4:])  # the pose's input: untouched
    assert not torch.equal(seen[1], seen[0])  # the SS heads' copies are shuffled
    assert metrics["val_mae_yaw"] == pytest.approx(plain.mean((2, 3))[:, 0].abs().mean().item(), rel=1e-6)
    per_image = plain.mean((2, 3)).abs().mean(1).double()  # the 6 images' mean |error|
    assert metrics["val_mae_mean_se"] == pytest.approx((per_image.std() / 6 ** 0.5).item(), rel=1e-5)


def test_a_training_step_minimises_l_sl_plus_the_configured_w_times_l_ss():
    cfg = {"aug": "0", "grid": 3, "flip": 0.0, "ss_fraction": 1.0, "data": "synthetic", "task": "puzzle_rotation",
           "head": "reg", "ssl_weight": 7.0}
    model, rt = Recorder(), hmtl.argparse.Namespace(device=torch.device("cpu"), rows=slice(None),
                                                    autocast=lambda: torch.autocast("cpu", enabled=False),
                                                    scaler=torch.amp.GradScaler("cpu", enabled=False))
    draw = hmtl.Draws(torch.Generator().manual_seed(0), 4, slice(None), torch.device("cpu"))
    images = torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8)
    loss, sl, ss = hmtl.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), images, torch.zeros(4, 3),
                                   cfg, rt, draw).tolist()
    assert ss == pytest.approx(9 * math.log(9) + 9 * math.log(4), rel=1e-5)  # zero logits: ln(classes) per head
    assert loss == pytest.approx(sl + 7.0 * ss, rel=1e-6) and sl > 0


class Constant:
    """A draw whose every per-sample number is `value` (a stand-in for hmtl.Draws)."""

    def __init__(self, value):
        self.value = value

    def uniform(self, low, high, *shape):
        return torch.full((2, *shape), float(self.value))

    def normal(self, *shape):
        return torch.randn(2, *shape)


def test_augmentation_levels_are_the_papers_and_each_op_is_the_identity_at_its_neutral_value():
    a = hmtl
    assert hmtl.AUGMENTATIONS == {"0": (), "1": (a.zoom, a.contrast), "2": (a.zoom, a.contrast, a.blur, a.downscale,
                                                                           a.cutout),
                                  "eth41": (a.zoom, a.hue), "eth52": (a.zoom, a.noise, a.cutout, a.hue, a.brightness,
                                                                      a.contrast), "shift": (a.translate,)}
    x = torch.rand(2, 3, 16, 16)
    for op, neutral in ((a.zoom, 1.0), (a.contrast, 1.0), (a.brightness, 0.0), (a.hue, 0.0), (a.noise, 0.0),
                        (a.blur, 0.01)):
        torch.testing.assert_close(op(x, Constant(neutral)), x, atol=1e-5, rtol=0, msg=op.__name__)
    for op, value in ((a.zoom, 0.8), (a.contrast, 1.4), (a.brightness, 0.15), (a.hue, 0.5), (a.noise, 0.05),
                      (a.blur, 1.5)):
        assert (op(x, Constant(value)) - x).abs().max() > 0.01, op.__name__  # and each does change the image
    contrasted = a.contrast(x, Constant(0.5))  # halfway to each image's mean
    torch.testing.assert_close(contrasted, (x + x.mean((1, 2, 3), keepdim=True)) / 2)
    # zoom 0.5: output pixel i samples input coordinate 3.75 + i / 2 (pixel centres), bilinearly
    where = 3.75 + torch.arange(16) / 2
    weights = torch.zeros(16, 16)
    weights[torch.arange(16), where.floor().long()] = 1 - where.frac()
    weights[torch.arange(16), where.floor().long() + 1] = where.frac()
    torch.testing.assert_close(a.zoom(x, Constant(0.5)), weights @ x @ weights.T)


def test_cutout_fills_its_square_with_the_mean_colour_and_leaves_the_rest():
    class Square:  # half side 0.25 of the image, centred: pixels 4..11 of 16
        def uniform(self, low, high, *shape):
            return torch.full((2, *shape), 0.25 if low == 0.05 else 0.5)

    x = torch.rand(2, 3, 16, 16)
    out = hmtl.cutout(x, Square())
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    mean = torch.tensor(hmtl_tiles.IMAGENET_MEAN)[:, None]
    assert torch.equal(out[:, :, inside], mean.expand(2, 3, 64)) and torch.equal(out[:, :, ~inside], x[:, :, ~inside])


@pytest.mark.parametrize("aug", ["2", "eth52"])
def test_a_training_step_never_makes_the_host_wait_for_the_device(monkeypatch, aug):
    """On a GPU, a host read of a device tensor (item, tolist, its truth value) or a blocking copy to the
    device makes the host wait for every kernel queued: a step under the heaviest recipes makes none. Here
    on the CPU they are refused; benchmarks/gpu_check.sh runs steps under torch.cuda.set_sync_debug_mode."""
    cfg = {**hmtl.config(["--arch", "resnet18", "--img-size", "32", "--task", "puzzle_rotation", "--ss-fraction",
                          "0.5", "--device", "cpu", "--amp", "off"]), "aug": aug, "flip": 0.5}
    rt, model = hmtl.runtime(cfg), hmtl.build_model(cfg)
    optimizer = hmtl.AdaBelief(model.parameters())
    images, angles = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), torch.zeros(8, 3)

    def refused(name):
        def read(*args, **kwargs):
            raise AssertionError(f"{name} in the training step")
        return read

    moved = torch.Tensor.to

    def to(self, *args, **kwargs):  # a copy to a device must not block
        if any(isinstance(a, (torch.device, str)) for a in args) and not kwargs.get("non_blocking"):
            raise AssertionError(f"a blocking .to{args} in the training step")
        return moved(self, *args, **kwargs)

    made = torch.tensor
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refused(f"Tensor.{name}()"))
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: refused("torch.tensor(..., device=...)")() if "device" in k
                        else made(*a, **k))
    draw = hmtl.Draws(torch.Generator().manual_seed(0), 8, slice(None), rt.device)
    losses = hmtl.train_step(model, optimizer, images, angles, cfg, rt, draw)
    monkeypatch.undo()
    assert torch.isfinite(losses).all()
