"""Elementwise arithmetic over the search network's weight tensors, one op per shape.

The paper's search network has 2,071 weight tensors but only 41 distinct shapes. Arithmetic
written tensor by tensor (the SGD update, DARTS' unrolled weights w' and perturbed weights
w+-, the global norm of a gradient) puts a few graph nodes per tensor into the search step:
~10^4 nodes, each traced in Python, instantiated and scheduled at every step. Stacked by
shape, the same arithmetic is one node per shape. `tf.stack` copies each tensor once; the
results are handed back by `tf.unstack` along the first axis. The arithmetic itself is
unchanged, element for element (a stacked `a + b * c` computes what the per-tensor one
does), so the results are bit-identical; only sums over tensors (`global_norm`) add in
another order.

TensorFlow only (the JAX step is compiled whole by XLA, which fuses this itself).
"""

import tensorflow as tf


class ShapeGroups:
    """The tensors of a list grouped by (shape, dtype), in order of first appearance.

    Args:
        tensors: tensors or variables of static shapes (only shapes and dtypes are read).

    Example:
    ```python
    groups = ShapeGroups(weights)
    shifted = groups.map(lambda w, v: w + eps * v, weights, vector)  # one add per shape
    ```
    """

    def __init__(self, tensors):
        members = {}
        for index, tensor in enumerate(tensors):
            key = (tuple(tensor.shape), tf.as_dtype(tensor.dtype))
            members.setdefault(key, []).append(index)
        self.indices = list(members.values())
        self.size = len(tensors)

    def __len__(self):
        return len(self.indices)

    def stack(self, tensors):
        """One stacked tensor per group (the group's tensors along a new first axis)."""
        if len(tensors) != self.size:
            raise ValueError(f"Expected {self.size} tensors, got {len(tensors)}.")
        return [tf.stack([tensors[i] for i in group]) for group in self.indices]

    def unstack(self, stacked):
        """The inverse of `stack`: the tensors in their original order."""
        tensors = [None] * self.size
        for group, values in zip(self.indices, stacked, strict=True):
            for index, value in zip(group, tf.unstack(values, num=len(group)), strict=True):
                tensors[index] = value
        return tensors

    def map(self, function, *lists):
        """[function(a_i, b_i, ...) for each tensor i], computed once per group."""
        stacked = [self.stack(values) for values in lists]
        return self.unstack([function(*arguments) for arguments in zip(*stacked, strict=True)])


def global_norm(tensors):
    """sqrt of the sum of squares of every entry of `tensors` (stacked by `ShapeGroups` or
    not): one `l2_loss` (sum of squares / 2) per tensor, in their (common) dtype."""
    return tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(t) for t in tensors]))
