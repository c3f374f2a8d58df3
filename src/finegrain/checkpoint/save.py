"""Save a model in Hugging Face layout: config.json, model.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from finegrain.atomic import atomic_dir
from finegrain.model.llama import Llama
from finegrain.tokenizer import Tokenizer


def save_pretrained(model: Llama, tokenizer: Tokenizer | None, directory: str | Path) -> Path:
    """Write the model (and tokenizer) so that `transformers` and finegrain load it back.

    The directory appears complete or not at all: it is written beside and renamed into place.
    """
    directory = Path(directory)
    config = model.config
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    dtype = next(iter(state_dict.values())).dtype
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    with atomic_dir(directory) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory

