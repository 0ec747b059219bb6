"""The tile op: the C++/CUDA extension against the PyTorch reference, and both against
an independent per-tile definition (docs/method.md, section 4)."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hmtl

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]
FORMATS = [torch.contiguous_format, torch.channels_last]
needs_ext = pytest.mark.skipif(hmtl.tiles_ext is None, reason="tile-op extension not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and hmtl.tiles_ext is not None and hmtl.tiles_ext.with_cuda),
    reason="needs a CUDA GPU and the extension built with CUDA")
BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# The CPU kernel's instruction sets (csrc/tiles_simd.h); a test runs on each this CPU has.
ISAS = ["avx2", "portable"]


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test with the CPU kernel compiled for one instruction set, where this CPU has it."""
    if hmtl.tiles_ext is None:
        pytest.skip("tile-op extension not built")
    if request.param not in hmtl.tiles_ext.available_cpu_kernel_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    default = hmtl.tiles_ext.cpu_kernel_isa()
    hmtl.tiles_ext.set_cpu_kernel_isa(request.param)
    yield request.param
    hmtl.tiles_ext.set_cpu_kernel_isa(default)


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


SHAPES = [(1, 1, 8, 8), (1, 3, 13, 17), (3, 3, 30, 22), (2, 4, 9, 31), (5, 1, 16, 16)]
CASES = [(shape, g, task) for shape in SHAPES for g in (1, 2, 3, 4) for task in hmtl.TASKS if g <= min(shape[2:])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,g,task", CASES[::3])
def test_reference_is_the_tile_by_tile_definition(shape, g, task, dtype):
    x = random_images(*shape, dtype)
    perm, rot = hmtl.sample_tiles(shape[0], g, task, torch.Generator().manual_seed(1))
    assert torch.equal(hmtl.shuffle_tiles(x, perm, rot, backend="torch"), tile_by_tile(x, perm, rot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_name_the_tile_that_moved_and_its_rotation(backend):
    g, t = 3, 5
    # Tile q holds the value q, with a marker 100 + q in its top-left corner.
    x = torch.arange(g * g, dtype=torch.float32).view(g, g).repeat_interleave(t, 0).repeat_interleave(t, 1)
    x[::t, ::t] += 100
    x = x.expand(4, 1, g * t, g * t).contiguous()
    perm, rot = hmtl.sample_tiles(4, g, "puzzle_rotation", torch.Generator().manual_seed(3))
    rot[:, 0] = torch.arange(4)  # every rotation appears at position 0
    out = hmtl.shuffle_tiles(x, perm, rot, backend=backend)
    # rot90 is counter-clockwise: the top-left corner goes to bottom-left (k=1),
    # bottom-right (k=2), top-right (k=3).
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
@pytest.mark.parametrize("shape,g,task", CASES)
def test_extension_is_bit_exact_with_the_reference(shape, g, task, dtype, fmt, cpu_isa):
    x = random_images(*shape, dtype, fmt, seed=g)
    perm, rot = hmtl.sample_tiles(shape[0], g, task, torch.Generator().manual_seed(2))
    if task == "puzzle":  # rotations on everywhere too
        rot = torch.randint(0, 4, rot.shape, generator=torch.Generator().manual_seed(4))
    got, want = hmtl.shuffle_tiles(x, perm, rot, "ext"), hmtl.shuffle_tiles(x, perm, rot, "torch")
    assert torch.equal(got, want)
    assert got.stride() == want.stride() == x.stride()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 74, 96, 97, 112, 128, 129])
def test_every_turn_of_tiles_around_the_simd_block_sizes_is_bit_exact(t, dtype, device, cpu_isa):
    """The CPU kernel transposes turned tiles in 8 x 8 or 16 x 16 blocks and moves rows 32 bytes at
    a time (rows of 32-128 bytes as 1-4 unrolled vectors), the last block or vector overlapping the
    one before: tile sides on, below and above those sizes (and a 224 px image's 74 and 112), one
    turn for all tiles, margins on two sides."""
    x = random_images(2, 3, 2 * t + 1, 2 * t + 5, dtype, seed=t)
    perm = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0]])
    for k in range(4):
        rot = torch.full_like(perm, k)
        got = hmtl.shuffle_tiles(x.to(device), perm.to(device), rot.to(device), "ext")
        assert torch.equal(got.cpu(), tile_by_tile(x, perm, rot)), k


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_a_larger_batch_are_bit_exact(dtype, device, cpu_isa):
    base = random_images(3, 5, 50, 47, dtype)
    perm, _ = hmtl.sample_tiles(3, 3, "puzzle", torch.Generator().manual_seed(6))
    rot = torch.randint(0, 4, perm.shape, generator=torch.Generator().manual_seed(7))
    for view in (lambda b: b[:, 1:4, 2:45, 3:41], lambda b: b[:, :, ::2, :], lambda b: b.transpose(2, 3)):
        x = view(base.to(device))
        out = torch.full_like(x, 7)
        hmtl.shuffle_tiles(x, perm.to(device), rot.to(device), "ext", out=out)
        assert torch.equal(out.cpu(), tile_by_tile(view(base), perm, rot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_out_receives_the_result_in_its_own_layout(backend, out_fmt):
    x = random_images(3, 3, 20, 26, torch.float32)
    perm, rot = hmtl.sample_tiles(3, 3, "rotation", torch.Generator().manual_seed(5))
    out = torch.full_like(x, float("nan")).contiguous(memory_format=out_fmt)
    res = hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, tile_by_tile(x, perm, rot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", hmtl.TASKS)
def test_inverse_parameters_restore_the_input_exactly(backend, dtype, task):
    x = random_images(4, 3, 23, 19, dtype, torch.channels_last)
    for g in (2, 3):
        perm, rot = hmtl.sample_tiles(4, g, task, torch.Generator().manual_seed(g))
        shuffled = hmtl.shuffle_tiles(x, perm, rot, backend=backend)
        if task != "none":
            assert not torch.equal(shuffled, x)
        assert torch.equal(hmtl.shuffle_tiles(shuffled, *hmtl.invert_tiles(perm, rot), backend=backend), x)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 80), w=st.integers(1, 80),
       g=st.integers(1, 5), dtype=st.sampled_from(DTYPES), fmt=st.sampled_from(FORMATS),
       task=st.sampled_from(hmtl.TASKS), seed=st.integers(0, 2**31))
def test_property_extension_equals_reference_and_round_trips(device, n, c, h, w, g, dtype, fmt, task, seed):
    g = min(g, h, w)
    for isa in hmtl.tiles_ext.available_cpu_kernel_isas():
        hmtl.tiles_ext.set_cpu_kernel_isa(isa)
        check_property_case(device, n, c, h, w, g, dtype, fmt, task, seed)
    hmtl.tiles_ext.set_cpu_kernel_isa(hmtl.tiles_ext.available_cpu_kernel_isas()[0])


def check_property_case(device, n, c, h, w, g, dtype, fmt, task, seed):
    x = random_images(n, c, h, w, dtype, fmt, seed)
    perm, rot = hmtl.sample_tiles(n, g, task, torch.Generator().manual_seed(seed))
    got = hmtl.shuffle_tiles(x.to(device), perm.to(device), rot.to(device), "ext")
    assert torch.equal(got.cpu(), tile_by_tile(x, perm, rot))
    back = hmtl.shuffle_tiles(got, *hmtl.invert_tiles(perm.to(device), rot.to(device)), "ext")
    assert torch.equal(back.cpu(), x)


def outcome(fn):
    try:
        return fn()
    except (ValueError, TypeError) as e:
        return type(e)


@needs_ext
@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=5),
       prows=st.integers(0, 4), pcols=st.integers(0, 17), values=st.lists(st.integers(-3, 20), min_size=1),
       rvalues=st.lists(st.integers(-2, 5), min_size=1), dtype=st.sampled_from(DTYPES + [torch.float64]),
       rot_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_fuzzed_inputs_give_a_result_or_a_clear_error_never_a_crash(shape, prows, pcols, values, rvalues, dtype,
                                                                    rot_dtype):
    x = torch.zeros(shape, dtype=dtype)
    perm = torch.tensor((values * (prows * pcols + 1))[:prows * pcols], dtype=torch.int64).view(prows, pcols)
    rot = torch.tensor((rvalues * (prows * pcols + 1))[:prows * pcols], dtype=rot_dtype).view(prows, pcols)
    got = outcome(lambda: hmtl.shuffle_tiles(x, perm, rot, "ext"))
    want = outcome(lambda: hmtl.shuffle_tiles(x, perm, rot, "torch"))
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
        hmtl.shuffle_tiles(x, perm, rot, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_the_wrong_shape_dtype_or_memory_is_refused_alike_by_both_backends(backend):
    x = torch.zeros(2, 3, 8, 8)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.raises(ValueError, match=r"shuffle_tiles: out must have shape \[2, 3, 8, 8\], got \[2, 3, 8, 9\]"):
        hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=torch.empty(2, 3, 8, 9))
    with pytest.raises(TypeError, match="shuffle_tiles: out must be Float, got Half"):
        hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=torch.empty(2, 3, 8, 8, dtype=torch.float16))
    for alias in (x, x.view(2, 3, 64).view(2, 3, 8, 8)):
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=alias)
    big = torch.zeros(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):  # overlapping halves
        hmtl.shuffle_tiles(big[:2], perm, rot, backend=backend, out=big[1:3])
    hmtl.shuffle_tiles(big[:2], perm, rot, backend=backend, out=big[2:])  # apart in one storage: fine
    u8 = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"out must have shape \[2, 3, 8, 8\]"):
        hmtl.shuffle_tiles_normalize(u8, perm, rot, backend=backend, out=torch.empty(2, 3, 8, 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_is_the_inverse_shuffle(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    x = random_images(3, 2, 11, 13, dtype).requires_grad_()
    perm, rot = hmtl.sample_tiles(3, 3, "puzzle_rotation", gen)
    weight = random_images(3, 2, 11, 13, dtype, seed=5)
    (hmtl.shuffle_tiles(x, perm, rot, backend=backend) * weight).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.equal(x.grad, tile_by_tile(weight, *hmtl.invert_tiles(perm, rot)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    """Finite differences in float32 (the op takes no float64): a shuffle is linear, so its
    Jacobian is a permutation matrix and the differences are exact up to rounding."""
    gen = torch.Generator().manual_seed(1)
    perm, rot = hmtl.sample_tiles(2, 2, "rotation", gen)
    x = torch.randn(2, 2, 6, 7, generator=gen, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not double precision"
        assert torch.autograd.gradcheck(lambda t: hmtl.shuffle_tiles(t, perm, rot, backend=backend), (x,),
                                        eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_refuses_tensors_that_need_a_gradient(backend):
    x = torch.zeros(2, 3, 8, 8, requires_grad=True)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=torch.empty(2, 3, 8, 8))
    with torch.no_grad():
        hmtl.shuffle_tiles(x, perm, rot, backend=backend, out=torch.empty(2, 3, 8, 8))


@needs_ext
def test_skipping_the_value_check_never_skips_it_on_the_cpu():
    x = torch.zeros(2, 3, 8, 8)
    perm = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    with pytest.raises(ValueError, match="perm row 1 is not a permutation"):
        hmtl.shuffle_tiles(x, perm, torch.zeros_like(perm), "ext", check=False)
    with pytest.raises(ValueError, match="rot\\[0, 1\\] = 9 is outside 0..3"):
        hmtl.shuffle_tiles_normalize(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.arange(4).repeat(2, 1),
                                     torch.tensor([[0, 9, 0, 0], [0, 0, 0, 0]]), backend="ext", check=False)


# ----------------------------------------------------------------------------- fused op

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("c", [1, 3, 4])
def test_fused_op_is_shuffle_then_normalise(backend, dtype, channels_last, c):
    gen = torch.Generator().manual_seed(c)
    x = torch.randint(0, 256, (3, 21, 17, c), dtype=torch.uint8, generator=gen)
    mean, std = torch.rand(c, generator=gen).tolist(), (torch.rand(c, generator=gen) + 0.1).tolist()
    perm, rot = hmtl.sample_tiles(3, 3, "rotation", gen)
    got = hmtl.shuffle_tiles_normalize(x, perm, rot, mean, std, dtype, channels_last, backend=backend)
    assert got.shape == (3, c, 21, 17) and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale, shift = hmtl.normalize_affine(mean, std)
    shuffled = tile_by_tile(x.permute(0, 3, 1, 2), perm, rot).float()
    assert torch.equal(got, (shuffled * scale[:, None, None] + shift[:, None, None]).to(dtype))
    if dtype == torch.float32:  # ... which is (x / 255 - mean) / std up to float32 rounding
        textbook = (shuffled / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(got, textbook, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_extension_is_bit_exact_with_the_reference_including_out(dtype, channels_last):
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (5, 37, 29, 3), dtype=torch.uint8, generator=gen)
    for g, task in [(1, "rotation"), (2, "puzzle"), (3, "puzzle_rotation"), (4, "rotation")]:
        perm, rot = hmtl.sample_tiles(5, g, task, gen)
        want = hmtl.shuffle_tiles_normalize(x, perm, rot, dtype=dtype, channels_last=channels_last, backend="torch")
        got = hmtl.shuffle_tiles_normalize(x, perm, rot, dtype=dtype, channels_last=channels_last, backend="ext")
        assert torch.equal(got, want) and got.stride() == want.stride()
        out = torch.empty_like(want)
        hmtl.shuffle_tiles_normalize(x, perm, rot, backend="ext", out=out)
        assert torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_refuses_bad_input(backend):
    x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    f = hmtl.shuffle_tiles_normalize
    with pytest.raises(TypeError, match="x must be uint8"):
        f(x.float(), perm, rot, backend=backend)
    with pytest.raises(TypeError, match="output dtype must be float32, bfloat16 or float16"):
        f(x, perm, rot, dtype=torch.float64, backend=backend)
    with pytest.raises(ValueError, match="one value per channel \\(3\\), got 2 and 3"):
        f(x, perm, rot, mean=(0.5, 0.5), backend=backend)
    with pytest.raises(ValueError, match="std > 0"):
        f(x, perm, rot, std=(0.2, 0.0, 0.2), backend=backend)
    with pytest.raises(ValueError, match="x must be N x H x W x C"):
        f(x[0], perm, rot, backend=backend)


# ----------------------------------------------------------------------------- operator registration

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_passes_for_every_operator(device):
    gen = torch.Generator().manual_seed(0)
    for dtype, fmt, (n, c, h, w), g in [(torch.float32, torch.contiguous_format, (2, 3, 12, 14), 3),
                                        (torch.uint8, torch.channels_last, (1, 3, 9, 9), 2),
                                        (torch.bfloat16, torch.contiguous_format, (3, 1, 7, 10), 1)]:
        x = random_images(n, c, h, w, dtype, fmt).to(device)
        perm, rot = (t.to(device) for t in hmtl.sample_tiles(n, g, "puzzle_rotation", gen))
        torch.library.opcheck(torch.ops.hmtl.shuffle_tiles.default, (x, perm, rot))
        if x.is_floating_point():  # with a gradient: opcheck tests the autograd registration too
            torch.library.opcheck(torch.ops.hmtl.shuffle_tiles.default, (x.clone().requires_grad_(), perm, rot, False))
        torch.library.opcheck(torch.ops.hmtl.shuffle_tiles_out.default, (x, perm, rot, torch.empty_like(x)))
        u8 = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=gen).to(device)
        mean, std = [0.5] * c, [0.25] * c
        for out_dtype in (torch.float32, torch.bfloat16):
            torch.library.opcheck(torch.ops.hmtl.shuffle_tiles_normalize.default,
                                  (u8, perm, rot, mean, std, out_dtype, fmt == torch.channels_last))
        torch.library.opcheck(torch.ops.hmtl.shuffle_tiles_normalize_out.default,
                              (u8, perm, rot, mean, std, torch.empty(n, c, h, w, device=device)))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_operators_in_one_graph(device):
    @torch.compile(backend="aot_eager", fullgraph=True)
    def shuffled_and_normalised(u8, perm, rot):
        y = hmtl.shuffle_tiles_normalize(u8, perm, rot, backend="ext")
        return hmtl.shuffle_tiles(y, perm, rot, backend="ext") * 2

    u8 = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8)
    perm, rot = hmtl.sample_tiles(2, 2, "rotation")
    want = hmtl.shuffle_tiles(hmtl.shuffle_tiles_normalize(u8, perm, rot, backend="torch"), perm, rot, "torch") * 2
    got = shuffled_and_normalised(u8.to(device), perm.to(device), rot.to(device))
    assert torch.equal(got.cpu(), want)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def squared(x, perm, rot):
        return (hmtl.shuffle_tiles(x, perm, rot, backend="ext") ** 2).sum()

    x = torch.randn(2, 3, 12, 12, device=device, requires_grad=True)
    squared(x, perm.to(device), rot.to(device)).backward()
    assert torch.equal(x.grad, 2 * x.detach())  # the compiled graph differentiates through the op


# ----------------------------------------------------------------------------- sampling and backends

def test_sample_tiles_draws_what_each_task_promises():
    gen = torch.Generator().manual_seed(0)
    n, g = 2000, 3
    perm, rot = hmtl.sample_tiles(n, g, "puzzle", gen)
    assert torch.equal(perm.sort(1).values, torch.arange(9).expand(n, 9)) and not rot.any()
    assert (perm != torch.arange(9)).any(1).float().mean() > 0.99  # almost never the identity
    perm, rot = hmtl.sample_tiles(n, g, "rotation", gen)
    assert torch.equal(perm, torch.arange(9).expand(n, 9))
    assert torch.bincount(rot.flatten(), minlength=4).min() > 0.2 * n * 9
    perm, rot = hmtl.sample_tiles(n, g, "puzzle_rotation", gen)
    assert torch.equal(perm.sort(1).values, torch.arange(9).expand(n, 9))
    assert (rot != 0).sum(1).max() == 2 and rot.max() == 3
    assert torch.equal(torch.bincount((rot != 0).sum(1)), torch.bincount((rot != 0).sum(1), minlength=3)[:3])
    perm, rot = hmtl.sample_tiles(3, 2, "none")
    assert torch.equal(perm, torch.arange(4).expand(3, 4)) and not rot.any()
    a = hmtl.sample_tiles(5, 2, "puzzle_rotation", torch.Generator().manual_seed(9))
    b = hmtl.sample_tiles(5, 2, "puzzle_rotation", torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="unknown task 'jigsaw'"):
        hmtl.sample_tiles(1, 2, "jigsaw")


def test_auto_backend_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(hmtl, "tiles_ext", None)
    hmtl._warn_reference_backend.cache_clear()
    x = random_images(2, 3, 8, 8, torch.float32)
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.warns(UserWarning, match="not built"):
        y = hmtl.shuffle_tiles(x, perm, rot)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(hmtl.shuffle_tiles(x, perm, rot), y)
    with pytest.raises(RuntimeError, match="extension is not built"):
        hmtl.shuffle_tiles(x, perm, rot, backend="ext")
    with pytest.raises(ValueError, match="unknown tile-op backend 'fast'"):
        hmtl.shuffle_tiles(x, perm, rot, backend="fast")
    hmtl._warn_reference_backend.cache_clear()


# ----------------------------------------------------------------------------- the CUDA kernel's block program, on the CPU
# csrc/tiles_wide.h: wide_kernel_on_cpu runs the GPU kernel's code for planes of contiguous rows,
# block by block and thread by thread, so its indexing is checked where no GPU is.

# (x, g, the word width in bytes it must choose: the largest power of two up to 16 dividing the
# base address, every stride and the tile side, in bytes, worked out by hand)
def wide_cases():
    f32, u8 = random_images(2, 3, 224, 224, torch.float32), random_images(2, 3, 224, 224, torch.uint8)
    return [
        (f32, 2, 16),  # t = 112: 448-byte tile rows, 896-byte image rows
        (f32, 3, 8),  # t = 74: 296 = 8 x 37 bytes
        (u8, 2, 16),  # 112 = 16 x 7 bytes
        (u8, 3, 2),  # 74 bytes
        (random_images(2, 3, 224, 224, torch.bfloat16), 3, 4),  # 148 bytes
        (random_images(3, 2, 13, 17, torch.float32), 2, 4),  # rows of 17 floats
        (random_images(2, 3, 70, 70, torch.uint8), 4, 1),  # t = 17
        (random_images(1, 1, 8, 8, torch.float16), 1, 16),  # 16-byte rows
        (f32[..., 1:], 3, 4),  # the view starts one float in
        (u8[:, :, 1:, :], 2, 1),  # a row in (224 bytes, 16-divisible), but t = 111
        (f32[:, 1:], 2, 16),  # a plane in
    ]


@needs_ext
@pytest.mark.parametrize("case", range(len(wide_cases())))
def test_the_cuda_kernels_block_program_is_bit_exact_and_as_wide_as_the_layout_allows(case):
    x, g, word = wide_cases()[case]
    gen = torch.Generator().manual_seed(case)
    perm, _ = hmtl.sample_tiles(x.shape[0], g, "puzzle", gen)
    for rot in [torch.full_like(perm, k) for k in range(4)] + [torch.randint(0, 4, perm.shape, generator=gen)]:
        out = torch.full_like(x, 7)
        assert hmtl.tiles_ext.wide_kernel_on_cpu(x, perm, rot, out) == word
        assert torch.equal(out, tile_by_tile(x, perm, rot)), rot[0].tolist()


def cuda_home():
    """As setup.py finds it: a directory holding include/cuda_runtime.h, or None."""
    import os
    import shutil
    from pathlib import Path
    nvcc = shutil.which("nvcc")
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc and str(Path(nvcc).resolve().parents[1]),
              "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return c
    return None


@pytest.mark.skipif(cuda_home() is None or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch")
def test_the_cuda_kernel_moves_each_word_in_one_load_and_one_store(tmp_path):
    """Compiled to PTX (no GPU needed): every shuffle_wide_kernel<E, W> reads and writes tile data
    only in W-byte instructions -- a 16-byte word is ld/st .v4.u32, not four 4-byte moves."""
    import re
    import subprocess
    from pathlib import Path
    from torch.utils.cpp_extension import include_paths
    root, home = Path(__file__).resolve().parents[1], cuda_home()
    ptx = tmp_path / "tiles.ptx"
    nvcc = subprocess.run([f"{home}/bin/nvcc", "-std=c++20", "-O3", "-arch=sm_80", "--ptx", "-DHMTL_WITH_CUDA",
                           f"-I{home}/include", *(f"-I{p}" for p in include_paths()), "-o", str(ptx),
                           str(root / "csrc" / "tiles_cuda.cu")], capture_output=True, text=True)
    assert nvcc.returncode == 0, nvcc.stderr[-3000:]
    text = ptx.read_text()

    def width(kind):  # the bytes one instruction moves: "v4.u32" -> 16, "v2.u8" -> 2, "u16" -> 2
        vector, _, scalar = kind.rpartition(".")
        return (int(vector[1:]) if vector else 1) * int(scalar[1:]) // 8

    found = re.findall(r"\.entry (_ZN4hmtl19shuffle_wide_kernelI([hjt])Li(\d+)E\S*)\(", text)
    assert {(e, int(w)) for _, e, w in found} == {(e, w) for e, size in (("h", 1), ("t", 2), ("j", 4))
                                                  for w in (1, 2, 4, 8, 16) if w >= size}
    for name, _, w in found:
        body = text.split(f".entry {name}(", 1)[1].split(".entry", 1)[0]
        loads = set(re.findall(r"ld\.global(?:\.nc)?\.(\S+)", body)) - {"u64"}  # u64: perm and rot
        stores = set(re.findall(r"st\.global(?:\.cg)?\.(\S+)", body))
        assert {width(k) for k in loads} == {width(k) for k in stores} == {int(w)}, (name, loads, stores)


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_extension_is_bit_exact_with_cpu(dtype, fmt):
    for shape, g, task in CASES:
        x = random_images(*shape, dtype, fmt, seed=g)
        perm, rot = hmtl.sample_tiles(shape[0], g, task, torch.Generator().manual_seed(3))
        want = hmtl.shuffle_tiles(x, perm, rot, "ext")
        got = hmtl.shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), "ext")
        assert torch.equal(got.cpu(), want) and got.stride() == want.stride()
        assert torch.equal(hmtl.shuffle_tiles(got, *hmtl.invert_tiles(perm.cuda(), rot.cuda()), "ext").cpu(), x)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_fused_op_is_bit_exact_with_cpu(dtype, channels_last):
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (6, 45, 38, 3), dtype=torch.uint8, generator=gen)
    for g in (1, 2, 3, 4):
        perm, rot = hmtl.sample_tiles(6, g, "puzzle_rotation", gen)
        want = hmtl.shuffle_tiles_normalize(x, perm, rot, dtype=dtype, channels_last=channels_last, backend="ext")
        got = hmtl.shuffle_tiles_normalize(x.cuda(), perm.cuda(), rot.cuda(), dtype=dtype,
                                           channels_last=channels_last, backend="ext")
        assert torch.equal(got.cpu(), want)


@needs_cuda
@pytest.mark.parametrize("message", list(bad_inputs()))
def test_cuda_bad_input_raises_the_same_errors(message):
    x, perm, rot = (t.cuda() for t in bad_inputs()[message])
    with pytest.raises((ValueError, TypeError), match=message):
        hmtl.shuffle_tiles(x, perm, rot, backend="ext")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_batches_past_the_grid_limit_are_bit_exact(dtype):
    """The kernel launches at most 2^16 blocks of 256 threads (one per pixel) and strides
    over the rest: 340 images of 224 x 224 px are 17.1M pixels, past 2^24."""
    x = random_images(340, 3, 224, 224, dtype, torch.channels_last if dtype == torch.uint8 else torch.contiguous_format)
    perm, _ = hmtl.sample_tiles(340, 3, "puzzle", torch.Generator().manual_seed(8))
    rot = torch.randint(0, 4, perm.shape, generator=torch.Generator().manual_seed(9))
    got = hmtl.shuffle_tiles(x.cuda(), perm.cuda(), rot.cuda(), "ext")
    assert torch.equal(got.cpu(), hmtl.shuffle_tiles(x, perm, rot, "ext"))
    if dtype == torch.uint8:
        u8 = x.permute(0, 2, 3, 1)  # N x H x W x C, contiguous
        for out_dtype in (torch.float32, torch.bfloat16):
            got = hmtl.shuffle_tiles_normalize(u8.cuda(), perm.cuda(), rot.cuda(), dtype=out_dtype, backend="ext")
            assert torch.equal(got.cpu(), hmtl.shuffle_tiles_normalize(u8, perm, rot, dtype=out_dtype, backend="ext"))


@needs_cuda
def test_cuda_device_mismatch_is_refused():
    x = torch.zeros(2, 3, 8, 8, device="cuda")
    perm, rot = hmtl.sample_tiles(2, 2, "puzzle")
    with pytest.raises(ValueError, match="one device"):
        hmtl.shuffle_tiles(x, perm, rot, backend="ext")
    with pytest.raises(ValueError, match="one device"):
        hmtl.shuffle_tiles(x.cpu(), perm.cuda(), rot.cuda(), backend="ext")


@needs_ext
def test_the_cpu_kernel_runs_the_best_instruction_set_this_cpu_has():
    import platform
    available = hmtl.tiles_ext.available_cpu_kernel_isas()
    assert available[-1] == "portable" and set(available) <= set(ISAS)
    assert hmtl.tiles_ext.cpu_kernel_isa() == available[0]
    flags = open("/proc/cpuinfo").read().split() if platform.system() == "Linux" else []
    if "avx2" in available:  # never code the CPU cannot run
        assert platform.machine() == "x86_64" and "avx2" in flags
    with pytest.raises(ValueError, match="cannot run the tile kernel's neon code; it can run: " + ", ".join(available)):
        hmtl.tiles_ext.set_cpu_kernel_isa("neon")


@needs_cuda
def test_cuda_op_with_check_off_never_waits_for_the_gpu():
    """check=False: the values are checked on the device, so the op never synchronises (sync debug
    mode "error" raises on any synchronisation); check=True copies perm and rot to the host."""
    x = random_images(8, 3, 32, 32, torch.float32).cuda()
    u8 = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).cuda()
    perm, rot = (t.cuda() for t in hmtl.sample_tiles(8, 2, "puzzle_rotation", torch.Generator().manual_seed(1)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = hmtl.shuffle_tiles(x, perm, rot, "ext", check=False)
        fused = hmtl.shuffle_tiles_normalize(u8, perm, rot, backend="ext", check=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            hmtl.shuffle_tiles(x, perm, rot, "ext", check=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), tile_by_tile(x.cpu(), perm.cpu(), rot.cpu()))
    assert torch.equal(fused.cpu(), hmtl.shuffle_tiles_normalize(u8.cpu(), perm.cpu(), rot.cpu(), backend="torch"))


@needs_cuda
def test_cuda_graph_captures_and_replays_the_op():
    gen = torch.Generator().manual_seed(2)
    x = random_images(8, 3, 40, 40, torch.float32).cuda()
    u8 = torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8, generator=gen).cuda()
    perm, rot = (t.cuda() for t in hmtl.sample_tiles(8, 3, "puzzle_rotation", gen))
    out, fused = torch.empty_like(x), torch.empty(8, 3, 40, 40, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        hmtl.shuffle_tiles(x, perm, rot, "ext", out=out, check=False)
        hmtl.shuffle_tiles_normalize(u8, perm, rot, backend="ext", out=fused, check=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hmtl.shuffle_tiles(x, perm, rot, "ext", out=out, check=False)
        hmtl.shuffle_tiles_normalize(u8, perm, rot, backend="ext", out=fused, check=False)
    new_perm, new_rot = hmtl.sample_tiles(8, 3, "puzzle_rotation", gen)
    x.copy_(random_images(8, 3, 40, 40, torch.float32, seed=9))
    perm.copy_(new_perm)
    rot.copy_(new_rot)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), tile_by_tile(x.cpu(), new_perm, new_rot))
    assert torch.equal(fused.cpu(), hmtl.shuffle_tiles_normalize(u8.cpu(), new_perm, new_rot, backend="torch"))
