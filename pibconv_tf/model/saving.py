"""Loading saved models: the one loader every app uses, with one message per failure."""

import os
import zipfile

import keras

from pibconv_tf.errors import UserInputError


def load_model(path, flag="--model"):
    """Loads a `.keras` model, turning a missing, foreign or damaged file into one sentence.

    Args:
        path: the `.keras` file.
        flag: how the message names the input (the app's flag).

    Raises:
        UserInputError: no such file, a directory, not a zip archive (what `.keras` files
            are), or an archive that Keras cannot load.
    """
    from pibconv_tf.model import networks  # noqa: F401, PLC0415 (registers the layers)

    if not path:
        raise UserInputError(f"{flag} is required: the path of a .keras model.")
    if os.path.isdir(path):
        raise UserInputError(f"{flag} {str(path)!r} is a directory; pass the .keras file in it.")
    if not os.path.isfile(path):
        raise UserInputError(f"{flag} {str(path)!r} does not exist.")
    if not zipfile.is_zipfile(path):
        raise UserInputError(
            f"{flag} {str(path)!r} is not a .keras model file (not a zip archive)."
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a damaged or foreign archive
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserInputError(
            f"{flag} {str(path)!r} could not be loaded as a Keras model "
            f"({type(error).__name__}: {reason})."
        ) from error
