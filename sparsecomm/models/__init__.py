"""The model zoo: every network the benchmarks train, buildable by name.

    from sparsecomm import models
    models.available_models()
    net = models.build_model("resnet18", num_classes=100)
    lm = models.build_model("lstm_lm", vocab_size=28869)
    models.model_options("neumf")   # {'num_users': <empty>, ..., 'dropout': 0.5}

CIFAR networks (32x32 inputs, ``num_classes=10``): ``resnet18``, ``resnet152``, ``resnet20``,
``vgg16``, ``vgg19``, ``senet18``, ``googlenet``. Others: ``mnist_cnn`` (28x28 grey),
``lstm_lm`` (word-level language model), ``neumf`` (NCF recommender), ``logreg``.
"""
from .registry import available_models, build_model, check_model_options, model_options, register_model
from . import cifar_resnet, googlenet, logreg, lstm, mnist_cnn, ncf, resnet20, senet, vgg  # noqa: F401  (registers)

__all__ = ["available_models", "build_model", "check_model_options", "model_options", "register_model"]
