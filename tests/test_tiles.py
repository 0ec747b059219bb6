"""The tile op: the C++/CUDA extension against the PyTorch reference, and both against an
independent per-tile definition (docs/method.md, section 4)."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hmtl
import hmtl_tiles
from hmtl_tiles import invert_tiles, shuffle_tiles, shuffle_tiles_normalize

# One dtype per element size the kernels move (float16 and bfloat16 share the 2-byte code).
DTYPES = [torch.uint8, torch.bfloat16, torch.float32]
FORMATS = [torch.contiguous_format, torch.channels_last]
needs_ext = pytest.mark.skipif(hmtl_tiles.ext is None, reason="tile-op extension not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and hmtl_tiles.ext is not None and hmtl_tiles.ext.with_cuda),
    reason="needs a CUDA GPU and the extension built with CUDA")
BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def random_images(n, c, h, w, dtype, fmt=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=gen)
    x = x.to(dtype) if dtype == torch.uint8 else (x.to(torch.float32) / 7 - 11).to(dtype)
    return x.contiguous(memory_format=fmt)


def tile_by_tile(x, perm, rot):
    """docs/method.md's definition (section 4), one tile at a time."""
    g = math.isqrt(perm.shape[1])
    t = min(x.shape[2], x.shape[3]) // g
    out = x.clone()
    for n in range(x.shape[0]):
        for p in range(g * g):
            q, k = int(perm[n, p]), int(rot[n, p])
            src = x[n, :, q // g * t:(q // g + 1) * t, q % g * t:(q % g + 1) * t]
            out[n, :, p // g * t:(p // g + 1) * t, p % g * t:(p % g + 1) * t] = torch.rot90(src, k, (-2, -1))
    return out


def params(n, g, task, seed, turns=False):
    """perm, rot for n images; with turns, every tile turned at random too."""
    gen = torch.Generator().manual_seed(seed)
    perm, rot = hmtl.sample_tiles(n, g, task, gen)
    return perm, torch.randint(0, 4, rot.shape, generator=gen) if turns else rot


# Shapes with pixels off the grid on either side, odd tile sides, and one channel or four.
SHAPES = [(1, 1, 8, 8), (1, 3, 13, 17), (3, 3, 30, 22), (2, 4, 9, 31), (5, 1, 16, 16)]
CASES = [(shape, g, task) for shape in SHAPES for g in (1, 2, 3, 4) for task in hmtl.TASKS if g <= min(shape[2:])]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_tile_by_tile_definition(dtype):
    for k, (shape, g, task) in enumerate(CASES):
        x = random_images(*shape, dtype, seed=k)
        perm, rot = params(shape[0], g, task, k, turns=k % 2 == 1)
        assert torch.equal(shuffle_tiles(x, perm, rot, backend="torch"), tile_by_tile(x, perm, rot)), (shape, g, task)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_name_the_tile_that_moved_and_its_rotation(backend):
    g, t = 3, 5
    # Tile q holds the value q, with a marker 100 + q in its top-left corner.
    x = torch.arange(g * g, dtype=torch.float32).view(g, g).repeat_interleave(t, 0).repeat_interleave(t, 1)
    x[::t, ::t] += 100
    x = x.expand(4, 1, g * t, g * t).contiguous()
    perm, rot = params(4, g, "puzzle_rotation", 3)
    rot[:, 0] = torch.arange(4)  # every rotation appears at position 0
    assert (perm[:, perm[0]] != torch.arange(9)).any()  # not its own inverse: a label inverted would fail
    out = shuffle_tiles(x, perm, rot, backend=backend)
    # rot90 is counter-clockwise: the top-left corner goes to bottom-left (k=1), bottom-right (k=2),
    # top-right (k=3).
    corner = {0: (0, 0), 1: (t - 1, 0), 2: (t - 1, t - 1), 3: (0, t - 1)}
    for n in range(4):
        for p in range(g * g):
            tile = out[n, 0, p // g * t:(p // g + 1) * t, p % g * t:(p % g + 1) * t]
            q, k = int(perm[n, p]), int(rot[n, p])
            assert tile.min() == q, "puzzle label = the original position of the tile now at p"
            assert tile[corner[k]] == 100 + q, "rotation label = k quarter turns counter-clockwise"


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extension_is_bit_exact_with_the_reference(dtype, fmt):
    for k, (shape, g, task) in enumerate(CASES):
        x = random_images(*shape, dtype, fmt, seed=k)
        perm, rot = params(shape[0], g, task, k, turns=task == "puzzle")
        got, want = shuffle_tiles(x, perm, rot, "ext"), shuffle_tiles(x, perm, rot, "torch")
        assert torch.equal(got, want), (shape, g, task)
        assert got.stride() == want.stride() == x.stride()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_views_of_a_larger_batch_are_bit_exact(device):
    for dtype in DTYPES:
        base = random_images(3, 5, 50, 47, dtype)
        perm, rot = params(3, 3, "puzzle", 6, turns=True)
        for view in (lambda b: b[:, 1:4, 2:45, 3:41], lambda b: b[:, :, ::2, :], lambda b: b.transpose(2, 3)):
            got = shuffle_tiles(view(base.to(device)), perm.to(device), rot.to(device), "ext")
            assert torch.equal(got.cpu(), tile_by_tile(view(base), perm, rot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", ["puzzle", "rotation", "puzzle_rotation"])
def test_inverse_parameters_restore_the_input_exactly(backend, task):
    for dtype in DTYPES:
        x = random_images(4, 3, 23, 19, dtype, torch.channels_last)
        for g in (2, 3):
            perm, rot = params(4, g, task, g)
            shuffled = shuffle_tiles(x, perm, rot, backend=backend)
            assert not torch.equal(shuffled, x)
            assert torch.equal(shuffle_tiles(shuffled, *invert_tiles(perm, rot), backend=backend), x)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, **HYPOTHESIS)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 80), w=st.integers(1, 80),
       g=st.integers(1, 5), dtype=st.sampled_from(DTYPES), fmt=st.sampled_from(FORMATS),
       task=st.sampled_from(hmtl.TASKS), seed=st.integers(0, 2**31))
def test_property_extension_equals_the_definition_and_round_trips(device, n, c, h, w, g, dtype, fmt, task, seed):
    g = min(g, h, w)
    x = random_images(n, c, h, w, dtype, fmt, seed)
    perm, rot = params(n, g, task, seed)
    got = shuffle_tiles(x.to(device), perm.to(device), rot.to(device), "ext")
    assert torch.equal(got.cpu(), tile_by_tile(x, perm, rot))
    back = shuffle_tiles(got, *invert_tiles(perm.to(device), rot.to(device)), "ext")
    assert torch.equal(back.cpu(), x)


def outcome(fn):
    try:
        return fn()
    except (ValueError, TypeError) as e:
        return type(e)


@needs_ext
@settings(max_examples=200, **HYPOTHESIS)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=5),
       prows=st.integers(0, 4), pcols=st.integers(0, 17), values=st.lists(st.integers(-3, 20), min_size=1),
       rvalues=st.lists(st.integers(-2, 5), min_size=1), dtype=st.sampled_from(DTYPES + [torch.float64]),
       rot_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_fuzzed_inputs_give_a_result_or_a_clear_error_never_a_crash(shape, prows, pcols, values, rvalues, dtype,
                                                                    rot_dtype):
    x = torch.zeros(shape, dtype=dtype)
    perm = torch.tensor((values * (prows * pcols + 1))[:prows * pcols], dtype=torch.int64).view(prows, pcols)
    rot = torch.tensor((rvalues * (prows * pcols + 1))[:prows * pcols], dtype=rot_dtype).view(prows, pcols)
    got = outcome(lambda: shuffle_tiles(x, perm, rot, "ext"))
    want = outcome(lambda: shuffle_tiles(x, perm, rot, "torch"))
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    else:
        assert got is want  # the same kind of error from both backends


def bad_inputs():
    x = torch.zeros(2, 3, 8, 8)
    p, r = hmtl.sample_tiles(2, 2, "puzzle")
    return {
        "x must be N x C x H x W": (x[0], p, r),
        "perm must be N x g\\^2": (x, p[0], r[0]),
        "rot must have perm's shape": (x, p, r[:, :3]),
        "perm has 1 rows for 2 images": (x, p[:1], r[:1]),
        "not a square": (x, p[:, :3], r[:, :3]),
        "does not fit a 8x8 image": (x, *hmtl.sample_tiles(2, 9, "none")),
        "perm row 1 is not a permutation of 0..3: \\[0, 0, 1, 2\\]": (x, torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]), r),
        "perm row 0 is not a permutation of 0..3: \\[0, 1, 2, 4\\]": (x, torch.tensor([[0, 1, 2, 4], [0, 1, 2, 3]]), r),
        "rot\\[1, 2\\] = 4 is outside 0..3": (x, p, torch.tensor([[0, 0, 0, 0], [0, 0, 4, 0]])),
        "rot\\[0, 0\\] = -1 is outside 0..3": (x, p, torch.tensor([[-1, 0, 0, 0], [0, 0, 0, 0]])),
        "perm and rot must be int64": (x, p.int(), r),
        "x must be uint8, float16, bfloat16 or float32": (x.double(), p, r),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message", list(bad_inputs()))
def test_bad_input_raises_an_error_naming_the_problem(backend, message):
    x, perm, rot = bad_inputs()[message]
    with pytest.raises((ValueError, TypeError), match=message):
        shuffle_tiles(x, perm, rot, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_is_the_inverse_shuffle(backend):
    x = random_images(3, 2, 11, 13, torch.float32).requires_grad_()
    perm, rot = params(3, 3, "puzzle_rotation", 0)
    weight = random_images(3, 2, 11, 13, torch.float32, seed=5)
    (shuffle_tiles(x, perm, rot, backend=backend) * weight).sum().backward()
    assert torch.equal(x.grad, tile_by_tile(weight, *invert_tiles(perm, rot)))
    gen = torch.Generator().manual_seed(1)
    perm, rot = hmtl.sample_tiles(2, 2, "rotation", gen)
    x = torch.randn(2, 2, 6, 7, generator=gen, requires_grad=True)
    with warnings.catch_warnings():  # finite differences in float32 (the op takes no float64): a shuffle is
        warnings.simplefilter("ignore", UserWarning)  # linear, so they are exact up to rounding
        assert torch.autograd.gradcheck(lambda t: shuffle_tiles(t, perm, rot, backend=backend), (x,),
                                        eps=1e-2, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- fused op

@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_is_shuffle_then_normalise(backend):
    for c in (1, 3, 4):
        gen = torch.Generator().manual_seed(c)
        x = torch.randint(0, 256, (3, 21, 17, c), dtype=torch.uint8, generator=gen)
        mean, std = torch.rand(c, generator=gen).tolist(), (torch.rand(c, generator=gen) + 0.1).tolist()
        perm, rot = params(3, 3, "puzzle", c, turns=True)
        got = shuffle_tiles_normalize(x, perm, rot, mean, std, backend=backend)
        assert got.shape == (3, c, 21, 17) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        scale, shift = hmtl_tiles.normalize_affine(mean, std)
        shuffled = tile_by_tile(x.permute(0, 3, 1, 2), perm, rot).float()
        assert torch.equal(got, shuffled * scale[:, None, None] + shift[:, None, None])
        # ... which is (x / 255 - mean) / std up to float32 rounding
        textbook = (shuffled / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(got, textbook, rtol=1e-5, atol=1e-5)
    assert torch.equal(hmtl_tiles.normalize(x, mean, std, backend), shuffle_tiles_normalize(
        x, *hmtl.sample_tiles(3, 1, "none"), mean, std, backend))  # normalize: no tile moved


@needs_ext
def test_fused_extension_is_bit_exact_with_the_reference():
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (5, 37, 29, 3), dtype=torch.uint8, generator=gen)
    for g, task in [(1, "rotation"), (2, "puzzle"), (3, "puzzle_rotation"), (4, "rotation")]:
        perm, rot = hmtl.sample_tiles(5, g, task, gen)
        want = shuffle_tiles_normalize(x, perm, rot, backend="torch")
        got = shuffle_tiles_normalize(x, perm, rot, backend="ext")
        assert torch.equal(got, want) and got.stride() == want.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_refuses_bad_input(backend):
    x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.raises(TypeError, match="x must be uint8"):
        shuffle_tiles_normalize(x.float(), perm, rot, backend=backend)
    with pytest.raises(ValueError, match="one value per channel \\(3\\), got 2 and 3"):
        shuffle_tiles_normalize(x, perm, rot, mean=(0.5, 0.5), backend=backend)
    with pytest.raises(ValueError, match="std > 0"):
        shuffle_tiles_normalize(x, perm, rot, std=(0.2, 0.0, 0.2), backend=backend)
    with pytest.raises(ValueError, match="x must be N x H x W x C"):
        shuffle_tiles_normalize(x[0], perm, rot, backend=backend)
    with pytest.raises(ValueError, match="shuffle_tiles_normalize: rot\\[0, 1\\] = 9 is outside 0..3"):
        shuffle_tiles_normalize(x, perm, torch.tensor([[0, 9, 0, 0], [0, 0, 0, 0]]), backend=backend)


# ----------------------------------------------------------------------------- operator registration

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_passes_for_both_operators(device):
    """Schema, fake implementation (torch.compile) and, with a gradient, the autograd registration."""
    gen = torch.Generator().manual_seed(0)
    for dtype, fmt, (n, c, h, w), g in [(torch.float32, torch.contiguous_format, (2, 3, 12, 14), 3),
                                        (torch.uint8, torch.channels_last, (1, 3, 9, 9), 2),
                                        (torch.bfloat16, torch.contiguous_format, (3, 1, 7, 10), 1)]:
        x = random_images(n, c, h, w, dtype, fmt).to(device)
        perm, rot = (t.to(device) for t in hmtl.sample_tiles(n, g, "puzzle_rotation", gen))
        torch.library.opcheck(torch.ops.hmtl.shuffle_tiles.default, (x, perm, rot))
        if x.is_floating_point():
            torch.library.opcheck(torch.ops.hmtl.shuffle_tiles.default, (x.clone().requires_grad_(), perm, rot))
        u8 = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=gen).to(device)
        torch.library.opcheck(torch.ops.hmtl.shuffle_tiles_normalize.default, (u8, perm, rot, [0.5] * c, [0.25] * c))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_operators_in_one_graph(device):
    @torch.compile(backend="aot_eager", fullgraph=True)
    def shuffled_and_normalised(u8, perm, rot):
        y = shuffle_tiles_normalize(u8, perm, rot, backend="ext")
        return shuffle_tiles(y, perm, rot, backend="ext") * 2

    u8 = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8)
    perm, rot = hmtl.sample_tiles(2, 2, "rotation")
    want = shuffle_tiles(shuffle_tiles_normalize(u8, perm, rot, backend="torch"), perm, rot, "torch") * 2
    got = shuffled_and_normalised(u8.to(device), perm.to(device), rot.to(device))
    assert torch.equal(got.cpu(), want)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def squared(x, perm, rot):
        return (shuffle_tiles(x, perm, rot, backend="ext") ** 2).sum()

    x = torch.randn(2, 3, 12, 12, device=device, requires_grad=True)
    squared(x, perm.to(device), rot.to(device)).backward()
    assert torch.equal(x.grad, 2 * x.detach())  # the compiled graph differentiates through the op


# ----------------------------------------------------------------------------- sampling and backends

def test_sample_tiles_draws_what_each_task_promises():
    gen = torch.Generator().manual_seed(0)
    n, g = 4000, 3
    perm, rot = hmtl.sample_tiles(n, g, "puzzle", gen)
    assert torch.equal(perm.sort(1).values, torch.arange(9).expand(n, 9)) and not rot.any()
    assert (perm != torch.arange(9)).any(1).float().mean() > 0.99  # almost never the identity
    perm, rot = hmtl.sample_tiles(n, g, "rotation", gen)
    assert torch.equal(perm, torch.arange(9).expand(n, 9))
    assert torch.bincount(rot.flatten(), minlength=4).min() > 0.2 * n * 9
    perm, rot = hmtl.sample_tiles(n, g, "puzzle_rotation", gen)
    assert torch.equal(perm.sort(1).values, torch.arange(9).expand(n, 9)) and rot.max() == 3
    # two positions drawn, each turned by k in 0..3: 0, 1 or 2 tiles turned with odds 1:6:9 (of 16)
    turned = torch.bincount((rot != 0).sum(1), minlength=4) / n
    assert turned[3] == 0 and torch.allclose(turned[:3], torch.tensor([1, 6, 9]) / 16, atol=0.03), turned
    perm, rot = hmtl.sample_tiles(3, 2, "none")
    assert torch.equal(perm, torch.arange(4).expand(3, 4)) and not rot.any()
    a = hmtl.sample_tiles(5, 2, "puzzle_rotation", torch.Generator().manual_seed(9))
    b = hmtl.sample_tiles(5, 2, "puzzle_rotation", torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="unknown task 'jigsaw'"):
        hmtl.sample_tiles(1, 2, "jigsaw")


def test_auto_backend_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(hmtl_tiles, "ext", None)
    hmtl_tiles.warn_reference_backend.cache_clear()
    x = random_images(2, 3, 8, 8, torch.float32)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.warns(UserWarning, match="not built"):
        y = shuffle_tiles(x, perm, rot)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(shuffle_tiles(x, perm, rot), y)
    with pytest.raises(RuntimeError, match="extension is not built"):
        shuffle_tiles(x, perm, rot, backend="ext")
    with pytest.raises(ValueError, match="unknown tile-op backend 'fast'"):
        shuffle_tiles(x, perm, rot, backend="fast")
    hmtl_tiles.warn_reference_backend.cache_clear()


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_extension_is_bit_exact_with_cpu(fmt):
    for dtype in DTYPES:
        for shape, g, task in CASES:
            x = random_images(*shape, dtype, fmt, seed=g)
            perm, rot = params(shape[0], g, task, 3)
            want = shuffle_tiles(x, perm, rot, "ext")
            got = shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), "ext")
            assert torch.equal(got.cpu(), want) and got.stride() == want.stride()
            assert torch.equal(shuffle_tiles(got, *invert_tiles(perm.cuda(), rot.cuda()), "ext").cpu(), x)


@needs_cuda
def test_cuda_fused_op_is_bit_exact_with_cpu():
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (6, 45, 38, 3), dtype=torch.uint8, generator=gen)
    for g in (1, 2, 3, 4):
        perm, rot = hmtl.sample_tiles(6, g, "puzzle_rotation", gen)
        want = shuffle_tiles_normalize(x, perm, rot, backend="ext")
        got = shuffle_tiles_normalize(x.cuda(), perm.cuda(), rot.cuda(), backend="ext")
        assert torch.equal(got.cpu(), want)


VALUES = ("perm row", "rot\\[")  # the messages about values, which a GPU's tensors are not read back for


@needs_cuda
@pytest.mark.parametrize("message", [m for m in bad_inputs() if not m.startswith(VALUES)])
def test_cuda_bad_input_raises_the_same_errors(message):
    x, perm, rot = (t.cuda() for t in bad_inputs()[message])
    with pytest.raises((ValueError, TypeError), match=message):
        shuffle_tiles(x, perm, rot, backend="ext")


@needs_cuda
@pytest.mark.parametrize("message", [m for m in bad_inputs() if m.startswith(VALUES)])
def test_cuda_bad_values_stay_inside_the_image_as_the_reference_clamps_them(message):
    x, perm, rot = bad_inputs()[message]
    x = random_images(*x.shape, torch.float32)
    got = shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), backend="ext")
    torch.cuda.synchronize()  # no illegal access
    assert torch.equal(got.cpu(), shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), backend="torch").cpu())


@needs_cuda
def test_cuda_batches_past_the_grid_limit_are_bit_exact():
    """The kernel launches at most 2^16 blocks of 256 threads (one per pixel) and strides over the
    rest: 340 images of 224 x 224 px are 17.1M pixels, past 2^24."""
    for dtype in DTYPES:
        x = random_images(340, 3, 224, 224, dtype, torch.channels_last if dtype == torch.uint8 else
                          torch.contiguous_format)
        perm, rot = params(340, 3, "puzzle", 8, turns=True)
        got = shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), "ext")
        assert torch.equal(got.cpu(), shuffle_tiles(x, perm, rot, "ext"))
        if dtype == torch.uint8:
            u8 = x.permute(0, 2, 3, 1)  # N x H x W x C, contiguous
            got = shuffle_tiles_normalize(u8.cuda(), perm.cuda(), rot.cuda(), backend="ext")
            assert torch.equal(got.cpu(), shuffle_tiles_normalize(u8, perm, rot, backend="ext"))


@needs_cuda
def test_cuda_device_mismatch_is_refused():
    x = torch.zeros(2, 3, 8, 8, device="cuda")
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.raises(ValueError, match="one device"):
        shuffle_tiles(x, perm, rot, backend="ext")
    with pytest.raises(ValueError, match="one device"):
        shuffle_tiles(x.cpu(), perm.cuda(), rot.cuda(), backend="ext")
