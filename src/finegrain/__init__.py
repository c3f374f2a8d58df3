"""finegrain: adapt LLaMA-family language models to fine-grained NLP tasks on a CPU."""

from finegrain.checkpoint.load import load_model
from finegrain.errors import FinegrainError
from finegrain.generate import generate

__version__ = "0.1.0"
__all__ = ["FinegrainError", "generate", "load", "load_model"]


def load(run_dir):
    """Load a trained run directory for prediction: `finegrain.load(RUN_DIR).predict([...])`."""
    from finegrain.run import Predictor

    return Predictor(run_dir)
