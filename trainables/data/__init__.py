"""Datasets as uint8 tensors, split once into train / val / test: the config and the splits
(:mod:`~trainables.data.splits`), the file formats read and probed
(:mod:`~trainables.data.formats`), and the cache of fixed-shape datasets named, not located
(:mod:`~trainables.data.cache`).

Imported lazily (``import trainables.data`` imports no torch); :class:`DataConfig` is pickled
by Ray under this path (``trainables.data.DataConfig``).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "DataConfig": "trainables.data.splits", "Splits": "trainables.data.splits",
    "load_dataset": "trainables.data.splits", "probe_dataset": "trainables.data.splits",
    "fixed_shape": "trainables.data.splits", "channel_stats": "trainables.data.splits",
    "DATASETS": "trainables.data.splits", "FLAT_PREFIX": "trainables.data.splits",
    "DataError": "trainables.data.formats", "KNOWN": "trainables.data.formats",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
