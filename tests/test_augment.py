"""Differentiable siamese augmentation: hand-computed cases on tiny tensors, siamese and per-sample
modes, determinism, the global RNG left alone, gradients, and strategy validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from builders.augment import (
    FAMILIES,
    PACK_COLUMNS,
    PACK_FAMILY,
    PACK_IDENTITY,
    PACK_WIDTH,
    AugmentDraw,
    Augmenter,
    parse_strategy,
)

FULL = "color_crop_cutout_flip_scale_rotate"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def color(brightness: float = 0.0, saturation: float = 1.0, contrast: float = 1.0) -> AugmentDraw:
    return AugmentDraw("color", {"brightness": t(brightness), "saturation": t(saturation), "contrast": t(contrast)})


def grid4() -> torch.Tensor:
    """1x1x4x4 with values 1..16, row-major."""
    return torch.arange(1.0, 17.0).view(1, 1, 4, 4)


# -- colour -------------------------------------------------------------------------------------
def test_brightness_adds_offset() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, -3.0]]]])
    out = Augmenter("color").apply(x, color(brightness=0.25))
    assert torch.allclose(out, torch.tensor([[[[0.25, 1.25], [2.25, -2.75]]]]))


def test_saturation_scales_distance_from_channel_mean() -> None:
    # pixel 0: channels (0, 1, 2), mean 1; pixel 1: grey (3, 3, 3) stays put
    x = torch.tensor([[0.0, 3.0], [1.0, 3.0], [2.0, 3.0]]).view(1, 3, 1, 2)
    out = Augmenter("color").apply(x, color(saturation=0.5))
    expected = torch.tensor([[0.5, 3.0], [1.0, 3.0], [1.5, 3.0]]).view(1, 3, 1, 2)
    assert torch.allclose(out, expected)


def test_saturation_is_identity_on_one_channel() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 7.0]]]])
    assert torch.allclose(Augmenter("color").apply(x, color(saturation=1.7)), x)


def test_contrast_scales_distance_from_image_mean() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # mean 2
    out = Augmenter("color").apply(x, color(contrast=0.5))
    assert torch.allclose(out, torch.tensor([[[[1.0, 1.5], [2.0, 3.5]]]]))


def test_color_all_three_together() -> None:
    # one pixel, channels (0, 2): +1 -> (1, 3); saturation 2 about 2 -> (0, 4); contrast 0.5 about 2 -> (1, 3)
    x = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    out = Augmenter("color").apply(x, color(brightness=1.0, saturation=2.0, contrast=0.5))
    assert torch.allclose(out, torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))


def test_color_factor_ranges_follow_reference() -> None:
    draw = Augmenter("color").sample(torch.Generator().manual_seed(0), 2000)
    b, s, c = draw.params["brightness"], draw.params["saturation"], draw.params["contrast"]
    assert -0.5 <= b.min() < -0.45 and 0.45 < b.max() < 0.5
    assert 0.0 <= s.min() < 0.05 and 1.95 < s.max() < 2.0
    assert 0.5 <= c.min() < 0.55 and 1.45 < c.max() < 1.5


# -- crop / cutout / flip -----------------------------------------------------------------------
def test_crop_known_shift_moves_pixels_and_zero_pads() -> None:
    # 4x4, crop 0.125: shifts in {-1, 0, 1}, u -> floor(3u) - 1. Rows +1 (read the row below),
    # columns -1 (read the column to the left).
    draw = AugmentDraw("crop", {"crop_row": t(0.9), "crop_col": t(0.0)})
    out = Augmenter("crop").apply(grid4(), draw)
    expected = torch.tensor([[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(out[0, 0], expected)


def test_crop_larger_shift_on_rectangle() -> None:
    # 2x8 with crop 0.25: rows int(0.5+0.5)=1, cols int(2+0.5)=2; u_row 0.5 -> 0, u_col 0.99 -> +2
    x = torch.arange(1.0, 17.0).view(1, 1, 2, 8)
    draw = AugmentDraw("crop", {"crop_row": t(0.5), "crop_col": t(0.99)})
    out = Augmenter("crop", crop=0.25).apply(x, draw)
    expected = torch.tensor([[3, 4, 5, 6, 7, 8, 0, 0], [11, 12, 13, 14, 15, 16, 0, 0]], dtype=torch.float)
    assert torch.equal(out[0, 0], expected)


def test_cutout_known_square_zeroed() -> None:
    # 4x4, cutout 0.5 -> 2x2 square; centre uniform on 0..4 (u -> floor(5u)), rows [c-1, c].
    x = torch.ones(1, 2, 4, 4)
    aug = Augmenter("cutout")
    inner = aug.apply(x, AugmentDraw("cutout", {"cutout_row": t(0.5), "cutout_col": t(0.3)}))  # centre (2, 1)
    expected = torch.ones(4, 4)
    expected[1:3, 0:2] = 0
    assert torch.equal(inner[0, 0], expected) and torch.equal(inner[0, 1], expected)
    edge = aug.apply(x, AugmentDraw("cutout", {"cutout_row": t(0.0), "cutout_col": t(0.99)}))  # centre (0, 4)
    expected = torch.ones(4, 4)
    expected[0, 3] = 0  # square rows -1..0, cols 3..4, clipped to the image
    assert torch.equal(edge[0, 0], expected)


def test_flip_mirrors_left_right_per_image() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).expand(2, 1, 2, 3)
    out = Augmenter("flip").apply(x, AugmentDraw("flip", {"flip": torch.tensor([True, False])}, batch_size=2))
    assert torch.equal(out[0, 0], torch.tensor([[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]))
    assert torch.equal(out[1], x[1])


# -- scale / rotate -----------------------------------------------------------------------------
def scale(sx: float, sy: float) -> AugmentDraw:
    return AugmentDraw("scale", {"scale_x": t(sx), "scale_y": t(sy)})


def rotate(degrees: float) -> AugmentDraw:
    return AugmentDraw("rotate", {"angle": t(degrees)})


def test_scale_one_and_rotate_zero_are_identity() -> None:
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(Augmenter("scale").apply(x, scale(1.0, 1.0)), x, atol=1e-6)
    assert torch.allclose(Augmenter("rotate").apply(x, rotate(0.0)), x, atol=1e-6)


def test_scale_two_shrinks_pattern_into_the_centre() -> None:
    # Grid factor 2: output pixel centres read the input at -1.5, 0.5, 2.5, 4.5 (pixel units), so the
    # border is zero and the centre is the bilinear mean of each 2x2 block of the 4x4 grid (0..15).
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = Augmenter("scale", scale=2.0).apply(x, scale(2.0, 2.0))
    expected = torch.tensor([[0, 0, 0, 0], [0, 2.5, 4.5, 0], [0, 10.5, 12.5, 0], [0, 0, 0, 0]])
    assert torch.allclose(out[0, 0], expected, atol=1e-5)
    # scale_x is the width axis: only columns are squeezed
    out = Augmenter("scale", scale=2.0).apply(x, scale(2.0, 1.0))
    expected = torch.tensor([[0, 0.5, 2.5, 0], [0, 4.5, 6.5, 0], [0, 8.5, 10.5, 0], [0, 12.5, 14.5, 0]])
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


def test_rotate_ninety_is_rot90_anticlockwise() -> None:
    aug = Augmenter("rotate")
    small = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(aug.apply(small, rotate(90.0)), torch.tensor([[[[2.0, 4.0], [1.0, 3.0]]]]), atol=1e-5)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(aug.apply(x, rotate(90.0)), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)


def test_geometric_ranges_follow_reference() -> None:
    g = torch.Generator().manual_seed(3)
    s = Augmenter("scale").sample(g, 2000).params
    for v in (s["scale_x"], s["scale_y"]):
        assert 1 / 1.2 <= v.min() < 0.84 and 1.19 < v.max() < 1.2
    a = Augmenter("rotate").sample(g, 2000).params["angle"]
    assert -15 <= a.min() < -14.8 and 14.8 < a.max() < 15
    f = Augmenter("flip").sample(g, 2000).params["flip"].float().mean()
    assert 0.45 < f < 0.55


# -- modes, determinism, RNG --------------------------------------------------------------------
def batch(n: int = 3, c: int = 3, h: int = 6, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_draw_is_one_transform_for_any_batch(family: str) -> None:
    aug = Augmenter(family)
    x = batch(3)
    g = torch.Generator().manual_seed(10)
    for _ in range(5):
        draw = aug.sample(g)
        assert draw.siamese
        full = aug.apply(x, draw)
        reordered = aug.apply(x[[2, 0, 1]].clone(), draw)
        single = aug.apply(x[1:2].clone(), draw)
        assert torch.allclose(reordered, full[[2, 0, 1]], atol=1e-6)
        assert torch.allclose(single, full[1:2], atol=1e-6)
        same = aug.apply(x[:1].expand(4, -1, -1, -1), draw)  # identical images -> identical outputs
        assert torch.allclose(same, same[:1].expand(4, -1, -1, -1), atol=1e-6)


def test_siamese_method_applies_one_draw_to_every_batch() -> None:
    aug = Augmenter(FULL)
    real, syn = batch(5, seed=1), batch(2, seed=2)
    for seed in range(12):
        out_real, out_syn = aug.siamese(torch.Generator().manual_seed(seed), real, syn)
        draw = aug.sample(torch.Generator().manual_seed(seed))
        assert torch.equal(out_real, aug.apply(real, draw)) and torch.equal(out_syn, aug.apply(syn, draw))
        joint = aug(torch.cat([real, syn]), torch.Generator().manual_seed(seed), siamese=True)
        assert torch.allclose(joint, torch.cat([out_real, out_syn]), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_mode_gives_each_image_its_own_parameters(family: str) -> None:
    aug = Augmenter(family)
    draw = aug.sample(torch.Generator().manual_seed(4), 16)
    assert draw.batch_size == 16 and draw.family == family
    for value in draw.params.values():
        assert value.shape == (16,) and value.unique().numel() > 1
    # identical images come out differently (one family for the whole call)
    x = batch(1, seed=5).expand(16, -1, -1, -1)
    out = aug(x, torch.Generator().manual_seed(4))
    assert not torch.allclose(out, out[:1].expand_as(out))


def test_one_family_per_call_chosen_uniformly() -> None:
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(6)
    counts = {f: 0 for f in FAMILIES}
    for _ in range(600):
        counts[aug.sample(g, 4).family] += 1
    assert all(70 < c < 130 for c in counts.values()), counts


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(7)
    x = batch(4)
    for _ in range(30):
        aug(x, g)
        aug.siamese(g, x, x[:2])
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_output_different_seed_different_output() -> None:
    aug = Augmenter(FULL)
    x = batch(4)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (8, 8, 9))
    outs1 = [aug(x, g1) for _ in range(6)]
    outs2 = [aug(x, g2) for _ in range(6)]
    outs3 = [aug(x, g3) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(outs1, outs2))
    assert not all(torch.equal(a, b) for a, b in zip(outs1, outs3))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_input_and_input_untouched(family: str) -> None:
    aug = Augmenter(family)
    x = batch(2, c=3, h=5, w=4).requires_grad_(True)
    before = x.detach().clone()
    weights = batch(2, c=3, h=5, w=4, seed=11)
    out = aug(x, torch.Generator().manual_seed(12))
    (out * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("shape", [(2, 1, 5, 8), (3, 3, 7, 4), (1, 3, 32, 32)])
def test_any_size_and_channel_count(shape: tuple[int, int, int, int]) -> None:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(13))
    for family in FAMILIES:
        aug = Augmenter(family)
        for siamese in (False, True):
            out = aug(x, torch.Generator().manual_seed(14), siamese=siamese)
            assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_draw_must_match_batch() -> None:
    aug = Augmenter("flip")
    draw = aug.sample(torch.Generator().manual_seed(0), 3)
    with pytest.raises(ValueError, match="3 images"):
        aug.apply(batch(2), draw)
    with pytest.raises(ValueError, match="shape"):
        AugmentDraw("flip", {"flip": torch.tensor([True, False])})  # siamese draws hold one value
    with pytest.raises(ValueError, match="lacks"):
        AugmentDraw("scale", {"scale_x": t(1.0)})


# -- strategy -----------------------------------------------------------------------------------
def test_parse_strategy() -> None:
    assert parse_strategy(FULL) == FAMILIES
    assert parse_strategy("crop_flip") == ("crop", "flip")
    assert Augmenter("flip_crop").strategy == "flip_crop"


@pytest.mark.parametrize("bad", ["color_blur", "", "none", "crop__flip", "Crop", "crop_crop"])
def test_bad_strategy_is_value_error_listing_valid_families(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        Augmenter(bad)
    assert all(f in str(info.value) for f in FAMILIES)


def test_generator_must_be_cpu_and_draws_live_on_cpu() -> None:
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        assert all(v.device.type == "cpu" for v in aug.sample(g, 2).params.values())
    if torch.cuda.is_available():
        x = batch(2).cuda()
        cpu_out = aug(x.cpu(), torch.Generator().manual_seed(1))
        assert torch.allclose(aug(x, torch.Generator().manual_seed(1)).cpu(), cpu_out, atol=1e-5)
        with pytest.raises(ValueError, match="CPU"):
            aug.sample(torch.Generator(device="cuda"))


def test_dc_augmentation_is_the_references_per_image_family():
    """DC's MNIST evaluation augmentation (reference utils.py get_daparam/augment): one of crop (pad 4
    with the channel mean, offset 0..7), scale (nearest resize, zero canvas), rotate per image."""
    from builders.dc_augment import DCAugmenter, check_strategy, make_augmenter

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 3] = 8.0  # channel mean 8/64 = 0.125
    crop = DCAugmenter("dc:crop")
    g = torch.Generator().manual_seed(0)
    out = crop(x, g)
    g = torch.Generator().manual_seed(0)
    torch.randint(1, (1,), generator=g)  # the family choice
    r, s = (int(v) for v in torch.randint(8, (2,), generator=g))
    padded = torch.full((1, 16, 16), 0.125)
    padded[:, 4:12, 4:12] = x[0]
    torch.testing.assert_close(out[0], padded[:, r : r + 8, s : s + 8])
    # Rotation by 0 degrees with bilinear sampling is the identity; 'noise' adds 0.001-scale noise.
    from builders.dc_augment import _rotate

    torch.testing.assert_close(_rotate(x[0], 0, 0.125), x[0])
    noisy = DCAugmenter("dc:noise")(x, torch.Generator().manual_seed(1))
    assert 0 < (noisy - x).abs().max() < 0.01
    # Scale by exactly 1 keeps the image (nearest resize to the same size, centred).
    scaler = DCAugmenter("dc:scale", scale=0.0)
    torch.testing.assert_close(scaler(x, torch.Generator().manual_seed(2)), x)
    assert isinstance(make_augmenter("dc:crop_scale_rotate"), DCAugmenter)
    assert make_augmenter("none") is None
    with pytest.raises(ValueError, match="dc:crop_scale_rotate"):
        check_strategy("dc:crop_flip")


def test_dc_mnist_recipe_evaluates_with_dcs_own_augmentation():
    from builders.build import load_recipe
    from builders.recipe import RECIPES_DIR

    r = load_recipe(RECIPES_DIR / "dc_mnist.yaml")
    assert r.eval.augment == "dc:crop_scale_rotate" and r.eval.epochs == 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_the_rows_of_a_per_sample_draw_transform_those_images_alone(family: str) -> None:
    """A batch split across processes: rows [2, 5) of a per-sample draw on images [2, 5) give the rows of the
    whole batch's output; a siamese draw is its own rows."""
    aug = Augmenter(family)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    draw = aug.sample(torch.Generator().manual_seed(2), 6)
    part = draw.rows(2, 5)
    assert part.batch_size == 3 and part.family == draw.family
    torch.testing.assert_close(aug.apply(x[2:5], part), aug.apply(x, draw)[2:5], rtol=0, atol=1e-6)
    siamese = aug.sample(torch.Generator().manual_seed(3))
    assert siamese.rows(2, 5) is siamese


def test_apply_each_equals_applying_each_siamese_draw_alone():
    # Many classes' (real, synthetic) batches, each pair with its own siamese draw, transformed in one
    # call per family: every image must come out as its own batch's transform alone makes it.
    aug = Augmenter("color_crop_cutout_flip_scale_rotate")
    g = torch.Generator().manual_seed(11)
    batches, draws = [], []
    for c in range(24):  # enough draws that every family occurs, most several times
        draw = aug.sample(g, None)
        for n in (5 + c % 3, 2):
            batches.append(torch.randn(n, 3, 9, 11, generator=g))
            draws.append(draw)
    assert {d.family for d in draws} == set(FAMILIES)
    together = aug.apply_each(batches, draws)
    for b, d, out in zip(batches, draws, together):
        torch.testing.assert_close(out, aug.apply(b, d), rtol=1e-6, atol=1e-6)


def test_apply_each_refuses_per_sample_draws_and_mismatched_lists():
    aug = Augmenter("flip")
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="siamese"):
        aug.apply_each([x], [aug.sample(g, 3)])
    with pytest.raises(ValueError, match="as many draws"):
        aug.apply_each([x, x], [aug.sample(g, None)])
    assert aug.apply_each([], []) == []


# -- packed: every family in one fixed sequence of operators ------------------------------------
def _draws_of(families: list[str], sizes: list[int], seed: int) -> list[AugmentDraw]:
    """Per-sample draws of the given families (each from a one-family augmenter with the default factors)."""
    g = torch.Generator().manual_seed(seed)
    return [Augmenter(f).sample(g, n) for f, n in zip(families, sizes)]


def _packed_and_separate(families: list[str], sizes: list[int], seed: int, shape=(3, 9, 11)):
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(seed + 1000)
    batches = [torch.randn(n, *shape, generator=g) for n in sizes]
    draws = _draws_of(families, sizes, seed)
    return aug.apply_packed(torch.cat(batches), aug.pack(draws)), torch.cat(
        [aug.apply(b, d) for b, d in zip(batches, draws)])


def test_pack_layout_has_a_column_for_every_parameter() -> None:
    from builders.augment import _PARAMS

    keys = [k for f in FAMILIES for k in _PARAMS[f]]
    assert sorted(PACK_COLUMNS) == sorted(keys) == sorted(PACK_IDENTITY)
    assert sorted([PACK_FAMILY, *PACK_COLUMNS.values()]) == list(range(PACK_WIDTH))


def test_pack_writes_each_images_family_and_parameters_and_identity_elsewhere() -> None:
    aug = Augmenter("color_flip")
    flip = AugmentDraw("flip", {"flip": torch.tensor([True, False])}, 2)
    shared = color(brightness=0.25, saturation=1.5, contrast=0.75)  # siamese: repeated over its 3 rows
    packed = aug.pack([flip, shared], sizes=[2, 3])
    assert packed.dtype == torch.float32 and packed.shape == (5, PACK_WIDTH)
    assert packed[:, PACK_FAMILY].tolist() == [3, 3, 0, 0, 0]
    assert packed[:, PACK_COLUMNS["flip"]].tolist() == [1, 0, 0, 0, 0]
    assert packed[:, PACK_COLUMNS["brightness"]].tolist() == [0, 0, 0.25, 0.25, 0.25]
    assert packed[:, PACK_COLUMNS["saturation"]].tolist() == [1, 1, 1.5, 1.5, 1.5]
    assert packed[:, PACK_COLUMNS["contrast"]].tolist() == [1, 1, 0.75, 0.75, 0.75]
    for key in ("crop_row", "crop_col", "cutout_row", "cutout_col", "scale_x", "scale_y", "angle"):
        assert packed[:, PACK_COLUMNS[key]].tolist() == [PACK_IDENTITY[key]] * 5


@pytest.mark.parametrize("families", [
    list(FAMILIES),  # all six, one batch each
    ["rotate"] * 3,  # a single family
    ["scale", "rotate", "scale"],  # the two warps share one grid_sample
    ["crop", "flip", "cutout", "color", "crop"],
])
def test_apply_packed_is_apply_on_each_batch_bit_for_bit(families: list[str]) -> None:
    # Exact: each image meets its own family's arithmetic as apply does it (same dtypes, same per-image
    # reductions); every other family leaves it unchanged exactly (torch.where, a gather with shift 0, x * 1).
    sizes = [2 + i % 3 for i in range(len(families))]
    got, want = _packed_and_separate(families, sizes, seed=len(families))
    assert torch.equal(got, want)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(FAMILIES), st.integers(1, 4)), min_size=1, max_size=7),
       st.integers(0, 2**16), st.sampled_from([(1, 6, 6), (3, 7, 10)]))
def test_apply_packed_equals_apply_for_any_mix_of_families(batches, seed, shape) -> None:
    families, sizes = [f for f, _ in batches], [n for _, n in batches]
    got, want = _packed_and_separate(families, sizes, seed, shape)
    assert torch.equal(got, want)


def test_apply_packed_takes_siamese_draws_with_their_sizes() -> None:
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 3, 8, 8, generator=g) for n in (3, 1, 4)]
    draws = [aug.sample(g, None), aug.sample(g, 1), aug.sample(g, None)]
    got = aug.apply_packed(torch.cat(batches), aug.pack(draws, sizes=[3, 1, 4]))
    assert torch.equal(got, torch.cat([aug.apply(b, d) for b, d in zip(batches, draws)]))


def _dispatched_ops(fn) -> list[str]:
    """Every operator ``fn()`` dispatches, in order (including those inside composite operators)."""
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_apply_packed_dispatches_the_same_operators_whatever_the_families() -> None:
    aug = Augmenter(FULL)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mixes = [["color"] * 4, ["flip", "crop", "flip", "flip"], list(FAMILIES[:4]),
             ["rotate", "scale", "cutout", "color"], ["rotate"] * 4]
    packs = [aug.pack(_draws_of(m, [3] * 4, 1)) for m in mixes]  # drawn and packed outside: the host's part
    sequences = [_dispatched_ops(lambda p=p: aug.apply_packed(x, p)) for p in packs]
    assert len(sequences[0]) > 30 and all(s == sequences[0] for s in sequences[1:])


def test_apply_packed_skips_the_families_its_strategy_lacks_and_refuses_their_draws() -> None:
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    flip_only = Augmenter("flip")
    draws = _draws_of(["flip", "flip"], [2, 2], 3)
    packed = flip_only.pack(draws)
    fewer = _dispatched_ops(lambda: flip_only.apply_packed(x, packed))
    assert len(fewer) < len(_dispatched_ops(lambda: Augmenter(FULL).apply_packed(x, packed)))
    assert torch.equal(flip_only.apply_packed(x, flip_only.pack(draws)), torch.cat(
        [flip_only.apply(b, d) for b, d in zip(x.split(2), draws)]))
    with pytest.raises(ValueError, match="strategy is 'flip'"):
        flip_only.pack(_draws_of(["crop"], [2], 0))


def test_apply_packed_gradients_are_applys() -> None:
    aug = Augmenter(FULL)
    sizes = [3] * 6
    draws = _draws_of(list(FAMILIES), sizes, 7)
    x = torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    (aug.apply_packed(x, aug.pack(draws)) * weights).sum().backward()
    packed_grad, x.grad = x.grad, None
    (torch.cat([aug.apply(b, d) for b, d in zip(x.split(sizes), draws)]) * weights).sum().backward()
    assert packed_grad is not None and packed_grad.abs().sum() > 0
    # within rounding, not bit for bit: torch.where's backward adds the other branch's zero gradient
    torch.testing.assert_close(packed_grad, x.grad, rtol=1e-6, atol=1e-6)


def test_pack_and_apply_packed_refuse_mismatches() -> None:
    aug = Augmenter(FULL)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="siamese draw needs its batch's size"):
        aug.pack([aug.sample(g, None)])
    with pytest.raises(ValueError, match="made for 3 images"):
        aug.pack([aug.sample(g, 3)], sizes=[4])
    with pytest.raises(ValueError, match="as many sizes"):
        aug.pack([aug.sample(g, 3)], sizes=[3, 3])
    with pytest.raises(ValueError, match=r"shape \[2, 12\]"):
        aug.apply_packed(torch.zeros(2, 1, 4, 4), aug.pack([aug.sample(g, 3)]))
    assert aug.pack([]).shape == (0, PACK_WIDTH)
