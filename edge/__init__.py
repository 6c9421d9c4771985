"""What runs on the edge device: `run_tflite` (LiteRT, numpy and Pillow; no TensorFlow)."""
