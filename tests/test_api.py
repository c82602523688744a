"""The public API is what it says: every name in maecli.__all__ has its documented kind, whatever was imported
before (a submodule imported first must not shadow a function of the same name)."""

import importlib
import inspect
import pkgutil

import maecli

EXPECTED = {
    "MAE": "class",
    "MAEConfig": "class",
    "load": "function",
    "pretrain": "function",
    "TrainArgs": "class",
    "embed": "function",
    "finetune": "function",
    "FinetuneArgs": "class",
    "load_classifier": "function",
    "predict": "function",
    "__version__": "str",
}


def kind(value) -> str:
    if inspect.isclass(value):
        return "class"
    if inspect.isfunction(value):
        return "function"
    return type(value).__name__


def test_every_public_name_has_its_kind_after_every_submodule_is_imported():
    for module in pkgutil.walk_packages(maecli.__path__, "maecli."):
        if module.name == "maecli.__main__":
            continue  # running it runs the command line
        importlib.import_module(module.name)
    assert set(maecli.__all__) == set(EXPECTED)
    for name in maecli.__all__:
        assert kind(getattr(maecli, name)) == EXPECTED[name], name


def test_finetune_args_then_finetune_is_callable():
    args = maecli.FinetuneArgs("data", weights="w")
    assert callable(maecli.finetune) and args.weights == "w" and args.epochs == 50
    assert callable(maecli.predict) and callable(maecli.pretrain)
