"""Herding and k-center on toy points with known answers."""

import pytest
import torch

from builders.methods.coreset import herding_select, kcenter_select

POINTS = torch.tensor([[0.0], [11.0], [4.0], [7.0], [5.0]])  # mean 5.4


def test_herding_follows_the_running_mean_by_hand():
    # step 1: nearest to 5.4 is 5 (row 4); step 2: (5+x)/2 nearest 5.4 -> x=7 gives 6.0 (row 3);
    # step 3: (12+x)/3 nearest 5.4 -> x=4 gives 5.33 (row 2).
    assert herding_select(POINTS, 3).tolist() == [4, 3, 2]


def test_kcenter_takes_the_farthest_point_each_step_by_hand():
    # start nearest the mean: 5 (row 4); farthest from {5}: 11 (row 1); farthest from {5, 11}: 0 (row 0).
    assert kcenter_select(POINTS, 3).tolist() == [4, 1, 0]


def test_herding_never_repeats_and_selects_all():
    assert sorted(herding_select(POINTS, 5).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("select", [herding_select, kcenter_select])
def test_too_many_is_an_error(select):
    with pytest.raises(ValueError, match="cannot select 6 of 5"):
        select(POINTS, 6)
