"""finegrain: adapt LLaMA-family language models to fine-grained NLP tasks on a CPU."""

from finegrain.errors import FinegrainError

__version__ = "0.1.0"
__all__ = ["FinegrainError", "generate", "load", "load_model"]


def load(run_dir):
    """Load a trained run directory (or an ensemble directory of `finegrain ensemble`) for prediction:
    `finegrain.load(RUN_DIR).predict([...])`; a multi-task run's: `.predict([...], task="NAME")`."""
    from finegrain.rundir import is_ensemble, task_runs

    if is_ensemble(run_dir):
        from finegrain.ensemble import EnsemblePredictor

        return EnsemblePredictor(run_dir)
    if task_runs(run_dir):  # a multi-task run: predict(texts, task="...")
        from finegrain.multitask import MultiTaskPredictor

        return MultiTaskPredictor(run_dir)
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
