"""finegrain: adapt LLaMA-family language models to fine-grained NLP tasks on a CPU."""

from finegrain.errors import FinegrainError

__version__ = "0.1.0"
__all__ = ["FinegrainError", "generate", "load", "load_model"]


def load(run_dir):
    """Load a trained run directory for prediction: `finegrain.load(RUN_DIR).predict([...])`."""
    from finegrain.run import Predictor

    return Predictor(run_dir)


def __getattr__(name: str):
    # torch takes seconds to import: `finegrain --help` and light imports should not wait for it.
    if name == "load_model":
        from finegrain.checkpoint.load import load_model

        return load_model
    if name == "generate":
        from finegrain.generation import generate

        return generate
    raise AttributeError(f"module 'finegrain' has no attribute {name!r}")
