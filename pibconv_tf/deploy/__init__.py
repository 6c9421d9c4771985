"""Deployment: SavedModel and TFLite export, parity checks and latency on the device runtime.

`latency` imports neither TensorFlow nor Keras (it times LiteRT as the device runs it);
`export` and `tflite` hold the conversion.
"""
