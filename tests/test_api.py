"""The public API of `pibconv_tf` (its `__init__.py`): every name resolves, lazily."""

import subprocess
import sys
import tempfile

import numpy as np

import pibconv_tf as pt
from tests.test_train import REPO


def test_every_public_name_resolves_to_its_module():
    assert len(pt.__all__) >= 15
    for name in pt.__all__:
        value = getattr(pt, name)
        assert value is not None, name
    assert pt.PIBCONV.search_space == "pibconv"
    assert pt.get_search_space("pibconv_f3").pib_expansion == 3


def test_importing_the_package_loads_no_keras_and_no_backend():
    code = "import sys, pibconv_tf; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]


def test_search_then_train_through_the_api():
    with tempfile.TemporaryDirectory() as root:
        genotype = pt.run_search(
            pt.SearchConfig(
                dataset="digits",
                image_size=8,
                model_dir=f"{root}/search",
                epochs=1,
                layers=3,
                nodes=2,
                init_channels=4,
                batch_size=16,
                steps_per_epoch=2,
                verbose=0,
            )
        )
        assert isinstance(genotype, pt.Genotype) and genotype.search_space == "pibconv"
        result = pt.run_training(
            pt.TrainConfig(
                genotype=f"{root}/search/genotype.json",
                dataset="digits",
                image_size=8,
                layers=2,
                init_channels=4,
                epochs=1,
                batch_size=16,
                steps_per_epoch=2,
                cutout_length=4,
                model_dir=f"{root}/train",
                verbose=0,
            )
        )
        model = pt.load_model(result["model"])
        logits = model(np.zeros((1, 8, 8, 3), "float32"), training=False)
        assert tuple(logits.shape) == (1, 10)
        assert pt.model_complexity(model)["params"] == sum(
            int(np.prod(w.shape)) for w in model.trainable_weights
        )
