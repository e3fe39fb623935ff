"""Head-masked supervised fine-tuning: the CT-SFT variants share one trainer and differ only in
the :class:`~ctsft_lens.circuit.HeadMask` (``None`` = full fine-tuning)."""

from ctsft_lens.train.masking import GradientMask, MaskedAdamW, ParamSpec, trainable_specs
from ctsft_lens.train.views import apply_head_mask
from ctsft_lens.train.trainer import TrainConfig, TrainResult, classification_loss, dev_metrics, train, train_step

__all__ = [
    "GradientMask", "MaskedAdamW", "ParamSpec", "apply_head_mask", "trainable_specs",
    "TrainConfig", "TrainResult", "classification_loss", "dev_metrics", "train", "train_step",
]
