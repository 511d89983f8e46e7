"""Out-of-distribution reference of a checkpoint: an ``EmbeddingReference`` fitted on (at most ``limit``) images of
the checkpoint's own training split, re-made from its stored config. ``build-default-model`` ships it inside the
default model; the predictor then flags images far from the training images (``inference/embedding.py``).
See docs/trust.md.
"""
from __future__ import annotations

from pathlib import Path

from pneumoscope.config import resolve
from pneumoscope.data.cache import decode_all
from pneumoscope.data.splits import split_samples, subset
from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.inference.embedding import EmbeddingReference, reference_from_images
from pneumoscope.inference.features import NAME
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint


def reference_for_checkpoint(checkpoint: str | Path, data_dir: str | Path, limit: int = 2000, seed: int = 0,
                             progress: bool = False, false_flag_rate: float = 0.01,
                             space: str = NAME) -> EmbeddingReference:
    """Fit on (at most ``limit``, stratified) images of the checkpoint's own training split, re-made from its config.

    The flag threshold is the (1 - ``false_flag_rate``) quantile of out-of-fold distances: every training image is
    measured against a fit without it, so about ``false_flag_rate`` of new in-distribution images are flagged.
    Put ``ref.to_dict()`` into the checkpoint (under ``"ood_reference"``) to ship it with the model.
    """
    if not 0 < false_flag_rate < 0.5:
        raise ConfigError(f"false_flag_rate={false_flag_rate!r} must be in (0, 0.5), e.g. 0.01")
    ckpt = load_checkpoint(checkpoint)
    if not ckpt.get("config"):
        raise CheckpointError(f"{checkpoint} stores no training config: its training split cannot be re-made")
    train_s, _, _, _ = split_samples(resolve(dict(ckpt["config"]), data=str(data_dir), limit=0, progress=False))
    train_s = subset(train_s, limit, seed)
    predictor = load(checkpoint)
    d = decode_all([s.path for s in train_s], predictor.preprocess.input_size, progress=progress)
    return reference_from_images(predictor, d.images[d.ok], 1.0 - false_flag_rate, space)
