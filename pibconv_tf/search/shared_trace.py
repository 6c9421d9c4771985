"""One tf.function per mixed-operation configuration, shared by all edges that have it.

The 8-cell search network has 112 mixed operations (1,008 operation instances for the
pibconv space) but only five distinct configurations (filters, stride, input shape). Traced
layer by layer, a train step builds a graph of ~10^6 nodes: a first-order step of the paper's
network takes over half an hour to trace on a 2-core CPU before it runs once. Here each
configuration is traced once, as a function of (inputs, mixing weights, variable values), and
every edge calls that function with its own variables; TensorFlow also derives the function's
gradient once and reuses it at every call.

The shared function runs the first edge of the configuration (the template) in a
`keras.StatelessScope` that substitutes the calling edge's variable values. It takes the
edge's tf.Variables, reads them and assigns the updated BatchNorm statistics itself, so that
the step's graph holds one call per edge and pass (not ~50 reads and assignments around it).
Inside the architect's stateless passes (substituted weights), under autocast or a
tf.distribute strategy it takes the values instead and returns the statistics, which the
caller assigns (or the scope records without applying, as a direct call would). Where the
caller throws the statistics away (`statistics_discarded`: the architect's passes at w' and
w+-), the function takes the trainable values only and returns no statistics: in training
mode BatchNorm normalises by the batch's own statistics, so the outputs are the same, and
the second-order step's graph holds ~8,000 fewer reads, constants and outputs.

Each function is specialised to what the gradient tape follows at the call (inputs, mixing
weights, weights): the others are cut off inside, so that the gradient of the architecture
pass does not compute the weights' gradients, nor the weight pass the alphas'. With
`recompute=True` the gradient keeps only the function's arguments and runs it again.

With `inline=True` TensorFlow inlines each call into the step's graph when the step first
runs: the executed graph is as large as one traced edge by edge, which costs minutes of the
first call and gigabytes of memory. By default (`inline=False`) the functions are marked
`_noinline`: each call runs the one instantiated body. Measured on the paper's search network
(8 cells, C=16, batch 8, 2-core CPU, same run; docs/performance.md), calls with recomputation
against inlined calls without: trace + first call 33 s instead of 76 s (first order) and 89 s
instead of 207 s (second), at 0.50x and 0.42x the memory and 1.08x and 1.03x the speed.
"""

import collections
import contextlib
import contextvars

import keras
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import resource_variable_ops

# What one shared function is specialised to: the operation's configuration, the input
# shape (without the batch) and dtype, the training flag, what the tape follows (inputs,
# mixing weights, weights), whether the edge passes its tf.Variables, and whether the
# caller discards the BatchNorm statistics.
TraceKey = collections.namedtuple(
    "TraceKey",
    "configuration shape dtype training differentiated by_variables discarding",
)


class SharedTraces:
    """A `MixedOp` executor (see `network.set_op_executor`) that traces per configuration.

    Example:
    ```python
    network.set_op_executor(network, SharedTraces())
    ```

    Args:
        inline: let TensorFlow inline the shared functions into the step's graph; False
            (the default) runs them as calls (a much faster first step, less memory).
        recompute: keep only each edge's arguments for the backward pass and run the edge
            again there (gradient checkpointing per mixed operation): the activations held
            between the forward and the backward pass shrink to the cells' states; one
            more forward pass of work, yet faster steps when called (docs/performance.md).
    """

    def __init__(self, inline=False, recompute=True):
        self._functions = {}
        self.inline = inline
        self.recompute = recompute

    def __call__(self, op, inputs, weights, training):
        training = bool(training)
        variables = _passable_variables(op)
        # The caller throws the BatchNorm statistics away: neither pass nor return them.
        discarding = training and variables is None and _DISCARDED.get()
        if variables is not None:
            # The edge's own tf.Variables: the function reads them and assigns the BatchNorm
            # statistics itself, so the step's graph holds one call per edge and pass.
            arguments = variables
            for variable in variables:
                # As a read would: a tape that watches what it accesses now watches these.
                resource_variable_ops.variable_accessed(variable)
            followed = [v.handle for v, w in zip(variables, op.weights, strict=True) if w.trainable]
        else:
            # Inside the architect's stateless passes (substituted weights) or a strategy:
            # the values, and the caller applies (or the scope records) the statistics.
            passed = op.trainable_weights if discarding else op.weights
            arguments = [tf.convert_to_tensor(v) for v in passed]
            followed = [v for v, w in zip(arguments, passed, strict=True) if w.trainable]
        # Which of the three arguments a gradient tape follows here; the others are cut off
        # inside the function, so that its gradient does not compute what nobody asks for
        # (the weights' gradients in the architecture pass, the alphas' in the weight pass).
        differentiated = (
            record.should_record_backprop([inputs]),
            record.should_record_backprop([weights]),
            bool(followed) and record.should_record_backprop(followed),
        )
        by_variables = variables is not None
        key = TraceKey(
            op.configuration(),
            tuple(inputs.shape[1:]),
            inputs.dtype.name,
            training,
            differentiated,
            by_variables,
            discarding,
        )
        function = self._functions.get(key)
        if function is None:
            function = _shared_function(
                op,
                training,
                self.inline,
                differentiated,
                self.recompute,
                by_variables,
                discarding,
            )
            self._functions[key] = function
        if by_variables:
            return function(inputs, weights, arguments)
        outputs, updates = function(inputs, weights, arguments)
        if training and not discarding:
            for variable, value in zip(op.non_trainable_weights, updates, strict=True):
                variable.assign(value)
        return outputs

    @property
    def num_functions(self):
        return len(self._functions)

    @property
    def functions(self):
        """The shared tf.functions traced so far, by `TraceKey`."""
        return dict(self._functions)


def _passable_variables(op):
    """`op`'s tf.Variables, or None where its weights are not plain variables to pass.

    A Keras variable's `value` is its tf.Variable except inside a `keras.StatelessScope`
    (the substituted value) or an autocast scope (a cast tensor); under a tf.distribute
    strategy the values are passed instead, as the replicas' variables are mirrored.
    """
    if tf.distribute.has_strategy():
        return None
    variables = [w.value for w in op.weights]
    if not all(isinstance(v, tf.Variable) for v in variables):
        return None
    return variables


_DISCARDED = contextvars.ContextVar("statistics_discarded", default=False)


@contextlib.contextmanager
def statistics_discarded():
    """Within: the caller throws away the BatchNorm statistics its training-mode passes
    compute (the architect's passes at substituted weights, in a `keras.StatelessScope` it
    never applies), so the shared functions take the trainable values only and return no
    statistics. The outputs are unchanged: training-mode BatchNorm uses the batch's own."""
    token = _DISCARDED.set(True)
    try:
        yield
    finally:
        _DISCARDED.reset(token)


def _shared_function(
    template,
    training,
    inline,
    differentiated,
    recompute=False,
    by_variables=False,
    discarding=False,
):
    variables = list(template.trainable_weights if discarding else template.weights)
    statistics = [] if discarding else list(template.non_trainable_weights)
    # Discarded statistics stand in as zeros: in training mode nothing that is returned
    # depends on them (BatchNorm normalises by the batch's statistics).
    unused = list(template.non_trainable_weights) if discarding else []
    trainable = [v.trainable for v in variables]
    inputs_differentiated, weights_differentiated, values_differentiated = differentiated

    def mixed_op(inputs, weights, values):
        if not inputs_differentiated:
            inputs = tf.stop_gradient(inputs)
        if not weights_differentiated:
            weights = tf.stop_gradient(weights)
        if not values_differentiated:
            values = [
                tf.stop_gradient(v) if t else v for v, t in zip(values, trainable, strict=True)
            ]
        mapping = list(zip(variables, values, strict=True))
        mapping += [(v, tf.zeros(v.shape, v.dtype)) for v in unused]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = template.forward(inputs, weights, training=training)
        updates = [scope.get_current_value(v) for v in statistics] if training else []
        return outputs, updates

    function = _recomputed(mixed_op) if recompute else mixed_op
    if by_variables:
        function = _on_variables(function, [not t for t in trainable], training)
    attributes = None if inline else {"_noinline": True}
    return tf.function(function, autograph=False, experimental_attributes=attributes)


def _on_variables(function, is_statistic, training):
    """`function` of (inputs, weights, values) as one of (inputs, weights, tf.Variables)
    that reads the variables and assigns the updated BatchNorm statistics to them."""

    def mixed_op(inputs, weights, variables):
        values = [v.read_value() for v in variables]
        outputs, updates = function(inputs, weights, values)
        if training:
            targets = [v for v, s in zip(variables, is_statistic, strict=True) if s]
            for variable, value in zip(targets, updates, strict=True):
                variable.assign(value)
        return outputs

    return mixed_op


def _recomputed(forward):
    """`forward` whose gradient runs it again instead of keeping its intermediates.

    The backward pass holds only the arguments; it recomputes the outputs under a tape (in
    training mode BatchNorm normalises by the same batch statistics, so the gradients are
    those of the first pass) and differentiates them. Arguments `forward` cuts off get no
    gradient, as without recomputation.
    """

    def mixed_op(inputs, weights, values):
        @tf.custom_gradient
        def call(*arguments):
            outputs, updates = forward(arguments[0], arguments[1], list(arguments[2:]))

            def gradient(d_outputs, *unused_d_updates):
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(arguments)
                    again, _ = forward(arguments[0], arguments[1], list(arguments[2:]))
                return tape.gradient(again, list(arguments), output_gradients=d_outputs)

            return (outputs, *updates), gradient

        outputs, *updates = call(inputs, weights, *values)
        return outputs, updates

    return mixed_op
