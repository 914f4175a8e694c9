"""Everything that runs INSIDE a trial, on any Ray worker: one description of a network
(:class:`ArchConfig`), the models it builds, their accounting (params, MACs, int8 flash, SRAM),
the data, the training loop, pruning, and the Ray trainable.

The public API is listed in ``__all__`` and imported lazily (``import trainables`` imports no
torch until a name is used).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "ArchConfig": "trainables.arch", "StageConfig": "trainables.arch",
    "StemConfig": "trainables.arch", "HeadLayer": "trainables.arch",
    "ArchError": "trainables.arch",
    "build_model": "trainables.models",
    "count": "trainables.accounting", "count_built": "trainables.accounting",
    "Accounting": "trainables.accounting",
    "DataConfig": "trainables.data", "load_dataset": "trainables.data",
    "probe_dataset": "trainables.data", "Splits": "trainables.data",
    "DataError": "trainables.data",
    "TrainConfig": "trainables.train", "TrainConfigError": "trainables.train",
    "train_arch": "trainables.trial", "train_trial": "trainables.trial",
    "ConfigError": "trainables.errors",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
