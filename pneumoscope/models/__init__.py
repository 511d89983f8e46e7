"""Models: a timm-like registry (``create_model(name, pretrained=...)``), each model with its preprocessing config.

One file per family: ``seed_cnn`` (the study's CNN), ``cnn_rnn``, ``efficientnet`` (EfficientNet-Lite0, offline
ImageNet weights), ``monai_nets`` (DenseNet-121, ResNet-18); ``checkpoint`` rebuilds a model from its file;
``pooling`` is the CPU max-pool + ReLU fast path (numba) behind one module, with PyTorch's pooling as fallback.
"""
from pneumoscope._lazy import lazy_api

__all__ = ["DEFAULT_INPUT_SIZE", "Preprocess", "create_model", "list_models", "rebuild", "load_weights",
           "load_checkpoint", "save_checkpoint", "model_from_checkpoint"]
__getattr__, __dir__ = lazy_api(__name__, {
    "DEFAULT_INPUT_SIZE": "names", "Preprocess": "preprocess", "create_model": "registry", "list_models": "names",
    "rebuild": "registry", "load_weights": "registry", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "model_from_checkpoint": "checkpoint",
})
