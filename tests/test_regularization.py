"""Tests for pibconv_tf/search/regularization.py: beta-DARTS' Beta-Decay term."""

import keras
import numpy as np
import tensorflow as tf

from pibconv_tf import optim
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.search import regularization
from pibconv_tf.search.trainer import SearchTrainer


def _alphas(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2, (5, 8)).astype("float32"), rng.normal(0, 2, (5, 8)).astype("float32")]


def test_closed_form_gradient_is_the_gradient_of_the_loss():
    alphas = [tf.Variable(a) for a in _alphas()]
    with tf.GradientTape() as tape:
        loss = 3.0 * regularization.beta_decay_loss(alphas)
    expected = tape.gradient(loss, alphas)
    zeros = [tf.zeros_like(a) for a in alphas]
    got = regularization.add_beta_decay(zeros, alphas, 3.0)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6, atol=1e-8)
    # The loss is the mean of each row's logsumexp over both matrices.
    rows = np.concatenate([np.log(np.exp(a).sum(-1)) for a in _alphas()])
    np.testing.assert_allclose(float(regularization.beta_decay_loss(alphas)), rows.mean(), 1e-6)


def test_the_ramp_is_the_authors_at_their_setting():
    # beta-DARTS' code: lambda = 50 * epoch / 100 over 50 epochs.
    for epoch in range(50):
        assert regularization.coefficient_at(25, epoch, 50) == 50 * epoch / 100


def _search_step(beta):
    keras.utils.set_random_seed(0)
    network = SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts", seed=0)
    build_network(network, 8)
    trainer = SearchTrainer(network, beta_regularization=beta)
    # Alphas move by their gradient, so the difference of two runs is the added gradient.
    trainer.compile(optim.TorchSGD(0.05, 0.9), optim.TorchSGD(1.0, 0.0), run_eagerly=True)
    start = [a.numpy() for a in network.arch_parameters()]
    rng = np.random.default_rng(1)
    batch = lambda: (  # noqa: E731
        rng.normal(size=(4, 8, 8, 3)).astype("float32"),
        rng.integers(0, 3, 4).astype("int32"),
    )
    data = tf.data.Dataset.from_tensors((batch(), batch()))
    trainer.fit(data, epochs=1, verbose=0, shuffle=False)
    return start, [a.numpy() for a in network.arch_parameters()]


def test_the_search_step_adds_lambda_softmax_over_rows_to_the_alpha_gradient():
    start, plain = _search_step(None)
    _, regularized = _search_step(4.0)
    rows = sum(a.shape[0] for a in start)
    for a0, p, r in zip(start, plain, regularized, strict=True):
        softmax = np.exp(a0) / np.exp(a0).sum(-1, keepdims=True)
        np.testing.assert_allclose(p - r, 4.0 * softmax / rows, rtol=1e-4, atol=1e-7)


def test_partial_channels_edge_betas_are_not_regularised():
    rng = np.random.default_rng(0)
    alphas = [
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.normal(size=(2, 4)).astype(np.float32),
    ]
    betas = [rng.normal(size=(3,)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
    grads = [np.ones_like(v) for v in alphas + betas]
    out = regularization.add_beta_decay(grads, alphas + betas, 5.0)
    for grad, alpha in zip(out[:2], alphas, strict=True):
        softmax = np.exp(alpha) / np.exp(alpha).sum(-1, keepdims=True)
        np.testing.assert_allclose(grad, 1.0 + 5.0 * softmax / 5, rtol=1e-6)  # 5 alpha rows
    for grad in out[2:]:
        np.testing.assert_array_equal(grad, 1.0)
    np.testing.assert_allclose(
        regularization.beta_decay_loss(alphas + betas),
        regularization.beta_decay_loss(alphas),
        rtol=1e-6,
    )
