"""A few search and training steps from fixed weights and batches, on the backend that
KERAS_BACKEND names; `test_backends` runs it once per backend and compares the results.

    KERAS_BACKEND=jax python -m tests.backend_steps steps OUT.npz
    KERAS_BACKEND=jax python -m tests.backend_steps hvp OUT.json
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python -m tests.backend_steps parallel OUT.npz

The second-order run adds beta-DARTS' term (a fixed coefficient). "parallel" takes the
first-order search steps and the training steps with each batch split
over every local JAX device (`keras.distribution.DataParallel`, as `--strategy=mirrored`
sets it up on JAX); they must equal the steps on one device.

Trainable weights come from a NumPy generator in variable-creation order (the same on
every backend: the recorded paths let the test check it); the BatchNorm statistics start
at 0 and 1. Sizes are the smallest that hold every operation: one reduction cell of one node
(the search; all 10 ops with stride 2), two cells and the auxiliary head (the training).
"""

import json
import sys

import keras
import numpy as np

from pibconv_tf import optim
from pibconv_tf.model import genotypes, search_network
from pibconv_tf.search.trainer import SearchTrainer
from pibconv_tf.train import config as train_config
from pibconv_tf.train import trainer as trainer_lib

IMAGE, BATCH, STEPS = 8, 4, 2


def _set_weights(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        name = variable.path.rsplit("/", 1)[-1]
        if "moving_mean" in name:
            value = np.zeros(variable.shape)
        elif "moving_variance" in name:
            value = np.ones(variable.shape)
        elif variable.trainable:
            value = rng.normal(0.0, 0.3, variable.shape)
        else:  # the drop-path rate (0), seed states
            continue
        variable.assign(value.astype(variable.dtype))
    return [variable.path for variable in model.variables]


def _batches(seed, count, classes=10):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    return images, rng.integers(0, classes, count * BATCH).astype("int32")


def _dataset(*arrays):
    import tensorflow as tf  # noqa: PLC0415 (the input pipeline on both backends)

    return tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH)


def search(order, hessian="finite_difference", beta_regularization=None):
    """Alphas, weights and losses after STEPS search steps of `order` (with beta-DARTS'
    term at a fixed coefficient if `beta_regularization` is given)."""
    keras.utils.set_random_seed(0)
    network = search_network.SearchNetwork(10, 4, 1, steps=1, multiplier=1, seed=0)
    search_network.build_network(network, IMAGE)
    paths = _set_weights(network, 1)
    trainer = SearchTrainer(
        network, order=order, hessian=hessian, beta_regularization=beta_regularization
    )
    trainer.compile(
        optim.TorchSGD(0.05, 0.9, coupled_weight_decay=3e-4),
        optim.TorchAdam(3e-3, 0.5, 0.999, coupled_weight_decay=1e-3),
    )
    train, val = _batches(2, STEPS), _batches(3, STEPS)
    history = trainer.fit(_dataset(train, val), epochs=1, verbose=0, shuffle=False)
    return {
        "paths": paths,
        "alphas": [np.asarray(a) for a in network.arch_parameters()],
        "weights": [np.asarray(w) for w in network.weight_parameters()],
        "loss": history.history["loss"][-1],
        "grad_norm": history.history["grad_norm"][-1],
        "devices": _devices(network),
    }


def train():
    """Weights and loss after STEPS training steps (auxiliary head; no drop path)."""
    config = train_config.TrainConfig(
        init_channels=4, layers=2, batch_size=BATCH, auxiliary_weight=0.4, drop_path_prob=0.0
    ).validate()
    keras.utils.set_random_seed(0)
    network, trainer, _ = trainer_lib.build_trainer(config, genotypes.PIBCONV, 10, IMAGE)
    paths = _set_weights(network, 4)
    history = trainer.fit(_dataset(*_batches(5, STEPS)), epochs=1, verbose=0, shuffle=False)
    return {
        "paths": paths,
        "weights": [np.asarray(w) for w in network.trainable_variables],
        "loss": history.history["loss"][-1],
        "devices": _devices(network),
    }


def _devices(network):
    """How many devices hold the network's first weight (JAX; 1 on TensorFlow)."""
    sharding = getattr(network.trainable_variables[0].value, "sharding", None)
    return len(sharding.device_set) if sharding is not None else 1


def steps(out):
    second = search("second", beta_regularization=2.0)
    _save(out, {"first": search("first"), "second": second, "train": train()})


def parallel(out):
    import jax  # noqa: PLC0415

    from pibconv_tf import distribute  # noqa: PLC0415

    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == len(jax.local_devices()) > 1, jax.local_devices()
    assert keras.distribution.distribution() is not None
    _save(out, {"first": search("first"), "train": train()})


def _save(out, results):
    arrays = {}
    for run, result in results.items():
        arrays[f"{run}/paths"] = np.array(result.pop("paths"))
        for key, value in result.items():
            if isinstance(value, list):
                for index, array in enumerate(value):
                    arrays[f"{run}/{key}/{index:03d}"] = array
            else:
                arrays[f"{run}/{key}"] = np.asarray(value)
    np.savez(out, **arrays)


def hvp(out):
    """The second order's Hessian-vector product, exact and by DARTS' finite difference,
    on the search network's training loss; and the product with another vector."""
    import jax  # noqa: PLC0415

    from pibconv_tf.search import jax_step  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    network = search_network.SearchNetwork(10, 4, 1, steps=1, multiplier=1, seed=0)
    search_network.build_network(network, IMAGE)
    _set_weights(network, 1)
    alphas_ids = {id(a) for a in network.arch_parameters()}
    trainable = network.trainable_variables
    is_alpha = [id(v) in alphas_ids for v in trainable]
    non_trainable = [v.value for v in network.non_trainable_variables]
    x, y = _batches(2, 1)

    def alpha_gradient(weights):
        def loss(alphas):
            ws, als = iter(weights), iter(alphas)
            values = [next(als) if a else next(ws) for a in is_alpha]
            logits, _ = network.stateless_call(values, non_trainable, x, training=True)
            return keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )

        return jax.grad(loss)([v.value for v, a in zip(trainable, is_alpha, strict=True) if a])

    weights = [v.value for v, a in zip(trainable, is_alpha, strict=True) if not a]
    rng = np.random.default_rng(6)
    vector = [rng.normal(size=w.shape).astype("float32") for w in weights]
    other = [rng.normal(size=w.shape).astype("float32") for w in weights]

    def flat(parts):
        return np.concatenate([np.ravel(np.asarray(p)) for p in parts]).tolist()

    exact = jax.jit(jax_step.hessian_vector_product_exact, static_argnums=0)
    finite = jax.jit(jax_step.hessian_vector_product_fd, static_argnums=0)
    result = {
        "exact": flat(exact(alpha_gradient, weights, vector)),
        "finite_difference": flat(finite(alpha_gradient, weights, vector)),
        "other_vector": flat(exact(alpha_gradient, weights, other)),
    }
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    {"steps": steps, "parallel": parallel, "hvp": hvp}[sys.argv[1]](sys.argv[2])
