"""What a trained network costs where it ships: flash and peak SRAM from its shapes
(:mod:`~trainables.deploy.budgets`), post-training int8 quantization with ONNX Runtime and
the int8 model's accuracy (:mod:`~trainables.deploy.quantize`), and latency measured, not
modelled (:mod:`~trainables.deploy.latency`).

Imported lazily (``import trainables.deploy`` imports neither torch nor ONNX Runtime).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "weight_bytes": "trainables.deploy.budgets", "peak_activation": "trainables.deploy.budgets",
    "export_onnx": "trainables.deploy.quantize", "quantize_int8": "trainables.deploy.quantize",
    "trial_int8": "trainables.deploy.quantize", "Int8Result": "trainables.deploy.quantize",
    "measure_latency": "trainables.deploy.latency", "Latency": "trainables.deploy.latency",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
