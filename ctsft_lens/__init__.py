"""ctsft_lens: Circuit-Targeted Supervised Fine-Tuning with CD-T circuit discovery.

The public API is re-exported here; each name lives in the module that says what it holds.
"""

from ctsft_lens import progress as _progress  # noqa: F401  first: its warning filter precedes tqdm.auto's import
from ctsft_lens.batching import Batch, encode
from ctsft_lens.discovery import discover
from ctsft_lens.circuit import Circuit, head_name, load_circuit, parse_head, rank_heads, save_circuit
from ctsft_lens.errors import ConfigError, CtsftError, DataError, MaskError, ModelLoadError, TaskError
from ctsft_lens.evaluate import EvalResult, evaluate, predict
from ctsft_lens.explore import HeadView, circuit_report, head_view
from ctsft_lens.faithfulness import MeanAblation, faithfulness_report
from ctsft_lens.masks import HeadMask, circuit_mask, load_mask, nearzero_mask, random_mask, save_mask, variant_mask
from ctsft_lens.models import load_model, model_info, save_model, tiny_model
from ctsft_lens.scoring import head_relevance
from ctsft_lens.tasks import Example, Task, load_task

__version__ = "0.2.0"
__all__ = [
    "Batch", "encode", "EvalResult", "evaluate", "predict", "load_model", "model_info",
    "save_model", "tiny_model", "Example", "Task", "TaskError", "load_task",
    "Circuit", "HeadMask", "MaskError", "circuit_mask", "load_circuit", "load_mask", "nearzero_mask",
    "random_mask", "save_circuit", "save_mask", "MeanAblation", "faithfulness_report",
    "discover", "head_relevance", "head_name", "parse_head", "rank_heads", "variant_mask",
    "CtsftError", "ConfigError", "DataError", "ModelLoadError",
    "HeadView", "circuit_report", "head_view",
]
