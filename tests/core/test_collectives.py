"""The 2-D reduction equals the flat one, and the op trace shows the collectives DTensor runs for each."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.core.collectives import count_collectives, per_replica, reduce_flat, reduce_two_stage


@pytest.fixture(scope="module")
def stacked():
    mesh = mesh_lib.create_mesh("x=2,y=4")
    values = np.random.default_rng(0).normal(size=(2, 4, 3, 5)).astype(np.float32)
    return values, per_replica(mesh, values)


@pytest.mark.parametrize("first", [0, 1])
def test_two_stage_reduction_equals_the_flat_one_and_numpy(stacked, first):
    values, placed = stacked
    flat = mesh_lib.to_numpy(tf.function(reduce_flat)(placed))
    two = mesh_lib.to_numpy(tf.function(lambda t: reduce_two_stage(t, first))(placed))
    np.testing.assert_allclose(flat, values.sum(axis=(0, 1)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(two, flat, rtol=0, atol=1e-5)
    assert two.shape == (3, 5)


def test_the_trace_shows_one_all_reduce_flat_and_two_in_two_stages(stacked):
    _, placed = stacked
    flat = count_collectives(tf.function(reduce_flat), placed, devices=8)
    two = count_collectives(tf.function(reduce_two_stage), placed, devices=8)
    assert flat["per_device"] == 1  # one all-reduce over all 8 replicas
    assert two["per_device"] == 2  # within the rows of 4, then across the 2 rows
    assert 6 <= flat["collective_ops"] <= 8 and 14 <= two["collective_ops"] <= 16  # a few may be dropped
