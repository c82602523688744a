"""maecli: Masked Autoencoder pretraining on plain image folders (He et al., 2021, arXiv:2111.06377).

`from maecli import MAE, MAEConfig, load, embed`; the heavy modules load on first use, so the CLI starts fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "MAE": ("maecli.model", "MAE"),
    "MAEConfig": ("maecli.model", "MAEConfig"),
    "load": ("maecli.weights", "load"),
    "pretrain": ("maecli.train.pretrain", "pretrain"),
    "TrainArgs": ("maecli.train.pretrain", "TrainArgs"),
    "embed": ("maecli.embedding", "embed"),
    "finetune": ("maecli.train.finetune", "finetune"),
    "FinetuneArgs": ("maecli.train.finetune", "FinetuneArgs"),
    "load_classifier": ("maecli.classifier", "load_classifier"),
    "predict": ("maecli.prediction", "predict"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maecli' has no attribute {name!r}")
