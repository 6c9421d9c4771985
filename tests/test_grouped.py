"""Stacked-by-shape arithmetic gives back, tensor for tensor, the per-tensor results."""

import numpy as np
import pytest
import tensorflow as tf

from pibconv_tf.search import grouped


def _tensors(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]


SHAPES = [(3, 3, 4, 1), (4,), (3, 3, 4, 1), (1, 1, 4, 8), (4,), (4,), (5, 5, 8, 1)]


def test_groups_follow_shape_and_dtype_in_order_of_appearance():
    tensors = _tensors(SHAPES) + [tf.zeros((4,), tf.float64)]
    groups = grouped.ShapeGroups(tensors)
    assert groups.indices == [[0, 2], [1, 4, 5], [3], [6], [7]]
    assert len(groups) == 5


def test_map_is_bit_identical_to_the_per_tensor_arithmetic():
    a, b, c = _tensors(SHAPES, 0), _tensors(SHAPES, 1), _tensors(SHAPES, 2)
    groups = grouped.ShapeGroups(a)
    mapped = groups.map(lambda x, y, z: x - 0.37 * (y + 3e-4 * x + 0.9 * z), a, b, c)
    for x, y, z, m in zip(a, b, c, mapped, strict=True):
        assert m.shape == x.shape
        np.testing.assert_array_equal(m.numpy(), (x - 0.37 * (y + 3e-4 * x + 0.9 * z)).numpy())
    assert [t.shape for t in groups.unstack(groups.stack(a))] == [t.shape for t in a]


def test_global_norm_is_the_norm_of_all_entries():
    tensors = _tensors(SHAPES)
    groups = grouped.ShapeGroups(tensors)
    flat = np.concatenate([t.numpy().ravel() for t in tensors]).astype(np.float64)
    norm = grouped.global_norm(groups.stack(tensors))
    assert float(norm) == pytest.approx(np.linalg.norm(flat), rel=1e-6)


def test_stack_refuses_a_list_of_another_length():
    groups = grouped.ShapeGroups(_tensors(SHAPES))
    with pytest.raises(ValueError, match="Expected 7 tensors, got 6"):
        groups.stack(_tensors(SHAPES[:-1]))


def test_fewer_nodes_than_per_tensor_arithmetic():
    shapes = [(3, 3, 4, 1)] * 50 + [(4,)] * 50

    @tf.function
    def per_tensor(xs, ys):
        return [x + 0.5 * y for x, y in zip(xs, ys, strict=True)]

    @tf.function
    def stacked(xs, ys):
        return grouped.ShapeGroups(xs).map(lambda x, y: x + 0.5 * y, xs, ys)

    xs, ys = _tensors(shapes, 0), _tensors(shapes, 1)

    def arithmetic(function):
        graph = function.get_concrete_function(xs, ys).graph.as_graph_def()
        return sum(node.op not in ("Placeholder", "Identity", "NoOp") for node in graph.node)

    per_tensor_nodes, stacked_nodes = arithmetic(per_tensor), arithmetic(stacked)
    assert per_tensor_nodes >= 200 and stacked_nodes <= 12, (per_tensor_nodes, stacked_nodes)
    for p, s in zip(per_tensor(xs, ys), stacked(xs, ys), strict=True):
        np.testing.assert_array_equal(p.numpy(), s.numpy())
