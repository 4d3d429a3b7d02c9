"""What a run prints: by default its own stage lines, progress bars, results and errors, nothing else.

The libraries a run uses (Lightning, transformers, datasets, peft, bitsandbytes, torch, jsonargparse) speak
through Python's logging, the warnings module and their own progress bars: tips, device summaries, model
summaries, deprecations, per-load bars. ``configure(verbose=False)`` silences those (their errors still
show); the project's own warnings (a truncated row, say) still show. ``--verbose`` keeps everything.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("lightning", "lightning_fabric", "pytorch_lightning", "transformers", "datasets", "peft", "bitsandbytes",
             "torch", "torchmetrics", "jsonargparse", "huggingface_hub", "accelerate", "matplotlib", "filelock",
             "safetensors", "tokenizers")


def configure(verbose: bool) -> None:
    """Silence the libraries (``verbose=False``) before they are imported, as far as they allow, and after."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in [*LIBRARIES, *logging.root.manager.loggerDict]:  # their own children too (Lightning sets its own)
        if name.split(".")[0] in LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)
    pattern = "|".join(LIBRARIES)
    warnings.filterwarnings("ignore", module=rf"({pattern})(\..*)?$")
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    try:  # when already imported, their own switches
        import transformers.utils.logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
