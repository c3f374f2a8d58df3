"""Instruction tuning: conversations rendered with the model's chat template, loss on assistant tokens.

Tokens. A conversation is rendered turn by turn: for each assistant turn, the template's text
up to that turn with the generation prompt (`<|im_start|>assistant\\n` in ChatML), then the
text the turn adds. The pieces are encoded one by one and concatenated, so the model learns
each reply after exactly the ids it sees when it generates one (a prompt encoded on its
own). A reply's tokens up to and including its end-of-turn token carry loss; everything else
(system and user turns, headers, what a template writes after the end-of-turn) gets -100.
The template must render a conversation's prefix as a prefix of the whole (chat templates
do; one that rewrites earlier turns is an error).

Packing (`instruct.packing`, on by default). Encoded conversations are packed, longest first
into the first row with room (first-fit decreasing), into rows of at most `data.max_length`
tokens; `train.batch_size` then counts rows. A row's attention mask is block-diagonal and
causal, (B, 1, T, T), and its position ids restart at 0 for each conversation, so a token
sees exactly what it would see alone: no attention or position leakage across examples.

Loss. The decoder's hidden states are gathered at the positions that carry loss and only
those go through `lm_head` (in chunks of `LOSS_CHUNK` rows, recomputed in backward), so
logits (B, T, V) are never built.

Evaluation and prediction generate greedily, up to `instruct.max_new_tokens`, from each
conversation's prompt (everything before the last assistant turn, plus the generation
prompt), with the adapted model (LoRA layers live inside the base `Llama`). Metrics are
those of `finegrain.evaluate.generation`; the headline is ROUGE-L (`rougeL`), which scores
free-form answers and short labels alike; exact match, token F1 and, for label-like
references (`labels.json`), generative classification accuracy come with it.

The trained module is `model` + `lm_head`, Hugging Face's `LlamaForCausalLM` layout, and the
adapter is saved as PEFT `CAUSAL_LM` with no extra modules, so `PeftModel.from_pretrained`
loads it onto the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from finegrain.data import pipeline
from finegrain.data.chat import ChatExample, check_messages, messages_from_record, read_chat_examples
from finegrain.errors import FinegrainError
from finegrain.evaluate.generation import label_set
from finegrain.model.backbone import hidden_states
from finegrain.model.llama import Llama
from finegrain.tasks.base import IGNORE_INDEX, kept, labelled_weight, pad_inputs

LOSS_CHUNK = 1024  # target tokens projected onto the vocabulary at a time
EXAMPLES_SHOWN = 8  # examples kept in the metrics for the report


class Prompt(NamedTuple):
    """What to generate for one conversation."""

    index: int  # the conversation's position among the encoded examples
    text: str  # the rendered prompt, as `generate` takes it
    shown: str  # the last user turn, shown next to the generation


@dataclass
class InstructEncoded:
    """A row of one tokenized conversation, or of several packed one after another.

    Attributes:
        input_ids: the ids of the conversations, concatenated.
        targets: per position, the id of the next token when that token carries loss, else -100.
        lengths: the number of tokens of each conversation, in row order.
        prompts: the generation prompt of each conversation.
    """

    input_ids: list[int]
    targets: list[int]
    lengths: list[int]
    prompts: list[Prompt]


def generation_text(tokenizer, text: str) -> str:
    """A rendered prompt as `finegrain.generation.generate` takes it.

    `generate` encodes with the tokenizer's special tokens, adding BOS itself when the
    tokenizer adds one; a BOS the template wrote is removed so that there is one.
    """
    bos = tokenizer.bos_token
    if tokenizer.add_bos and bos and text.startswith(bos):
        return text[len(bos) :]
    return text


def render_pieces(tokenizer, messages: list[dict[str, str]], source: str) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive pieces of text, each flagged True for an assistant reply."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise FinegrainError(
                f"{source}: the chat template does not render this conversation's turns as prefixes of the whole "
                "(does it rewrite earlier turns?), so assistant tokens cannot be found; use a model with a plain template"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)[len(done) :]
    return [(text, trained) for text, trained in [*pieces, (rest, False)] if text]


def encode_conversation(tokenizer, messages: list[dict[str, str]], source: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its targets (the next id where that token carries loss, else -100)."""
    ids: list[int] = []
    trained: list[bool] = []
    eos = tokenizer.eos_token_ids
    for n, (text, is_reply) in enumerate(render_pieces(tokenizer, messages, source)):
        piece = tokenizer.encode(generation_text(tokenizer, text)) if n == 0 else tokenizer.encode(
            text, add_special_tokens=False
        )
        flags = [is_reply] * len(piece)
        if is_reply:  # learn the reply up to its end-of-turn token, not what the template writes after it
            end = next((k for k, token in enumerate(piece) if token in eos), len(piece) - 1)
            flags = [k <= end for k in range(len(piece))]
        ids += piece
        trained += flags
    targets = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, targets


def pack(items: Sequence[InstructEncoded], max_length: int) -> list[InstructEncoded]:
    """Rows of at most `max_length` tokens holding whole items, longest first into the first row with room."""
    rows: list[list[InstructEncoded]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda item: -len(item.input_ids)):
        size = len(item.input_ids)
        row = next((r for r, free in enumerate(room) if size <= free), None)
        if row is None:
            rows.append([item])
            room.append(max_length - size)
        else:
            rows[row].append(item)
            room[row] -= size
    return [
        InstructEncoded(
            [i for item in row for i in item.input_ids],
            [t for item in row for t in item.targets],
            [n for item in row for n in item.lengths],
            [p for item in row for p in item.prompts],
        )
        for row in rows
    ]


def collate_packed(items: list[InstructEncoded], pad_id: int, hidden: list[torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` (or cached `hidden`), `lengths`, `targets` (B, T) with -100 at padding,
    and for packed rows `attention_mask` (B, 1, T, T) and `position_ids` (B, T)."""
    batch = pad_inputs(items, pad_id, hidden)
    T = int(batch["lengths"].max())
    targets = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        targets[row, : len(item.targets)] = torch.tensor(item.targets, dtype=torch.long)
    batch["targets"] = targets
    if any(len(item.lengths) > 1 for item in items):
        batch["attention_mask"], batch["position_ids"] = packed_attention(items, T)
    return batch


def packed_attention(items: Sequence[InstructEncoded], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-diagonal causal mask (B, 1, T, T) and position ids (B, T) of packed rows padded to T.

    A token attends to the tokens of its own conversation up to itself; positions restart at 0
    with every conversation. Padding attends to padding, so no row of the mask is empty.
    """
    segment = torch.full((len(items), T), -1)
    positions = torch.zeros(len(items), T, dtype=torch.long)
    for row, item in enumerate(items):
        start = 0
        for k, n in enumerate(item.lengths):
            segment[row, start : start + n] = k
            positions[row, start : start + n] = torch.arange(n)
            start += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    return mask[:, None], positions


def token_losses(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (N,) of each target token (N,) from its final hidden state (N, H).

    The vocabulary projection runs `LOSS_CHUNK` rows at a time; with more than one chunk each is
    recomputed in backward instead of kept, so at most (LOSS_CHUNK, V) logits live at once.
    """

    def chunk_losses(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h).float(), t, reduction="none")

    if len(targets) <= LOSS_CHUNK:
        return chunk_losses(hidden, targets)
    return torch.cat([
        checkpoint(chunk_losses, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(LOSS_CHUNK), targets.split(LOSS_CHUNK))
    ])


class InstructModel(nn.Module):
    """The base causal LM for training: per-token losses of the assistant tokens of a batch.

    Its modules are the `Llama`'s own `model` and `lm_head`, so the adapter's keys are those of
    `LlamaForCausalLM`, and generating with `llama` uses the LoRA layers applied here.
    """

    def __init__(self, llama: Llama):
        super().__init__()
        self.model = llama.model
        self.lm_head = llama.lm_head
        # Not a submodule: its parameters are the two above, which would otherwise be saved twice.
        object.__setattr__(self, "llama", llama)

    def forward(self, batch: dict[str, torch.Tensor], start_layer: int = 0) -> torch.Tensor:
        """Losses (N,) of the N positions whose `targets` (B, T) are not -100, in row-major order.

        The batch holds right-padded `input_ids` (B, T), or with `start_layer` > 0 `hidden`
        (B, T, H), the cached output of the frozen layers below; packed rows add
        `attention_mask` (B, 1, T, T) and `position_ids` (B, T).
        """
        x = hidden_states(self.model, batch, start_layer)  # (B, T, H)
        targets = batch["targets"]  # (B, T)
        keep = targets != IGNORE_INDEX
        return token_losses(self.lm_head, x[keep], targets[keep])  # (N,)


class InstructTask:
    """Chat data, packing, the assistant-token loss, generation and generation metrics.

    Args:
        labels: the label-like references of the training data (`label_set`), for generative
            classification accuracy; may be empty.
        packing: pack short conversations into rows of up to `data.max_length` tokens.
        max_new_tokens: the most tokens generated per conversation.
    """

    name = "instruct"
    endpoint = None  # its adapter steers the language model: served by the generation endpoints
    headline_metric = "rougeL"
    predicts_from_prefix = False  # predict generates with the whole model
    peft_task_type = "CAUSAL_LM"
    head_modules = ()

    def __init__(self, labels: Sequence[str] = (), packing: bool = True, max_new_tokens: int = 64):
        self.labels = list(labels)
        self.packing = packing
        self.max_new_tokens = max_new_tokens
        self.tokenizer = None  # set by `build_model`/`encode`; generation needs it

    @classmethod
    def from_config(cls, config, labels: list[str]) -> InstructTask:
        if config.instruct.max_new_tokens < 1:
            raise FinegrainError(f"instruct.max_new_tokens: must be at least 1, got {config.instruct.max_new_tokens}")
        if config.model.bidirectional:
            raise FinegrainError("model.bidirectional: task instruct generates left to right; remove the key")
        return cls(labels, config.instruct.packing, config.instruct.max_new_tokens)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        """Conversations of `data.train` (and `data.validation`/`data.test`, else split off train,
        stratified by reference so that label-like answers stay spread)."""

        def read(path: str):
            result = read_chat_examples(path, require_reference=True, skip_bad_rows=data.skip_bad_rows)
            if not result.examples:
                raise FinegrainError(f"{path}: no usable conversations")
            return result

        splits = pipeline.load_splits(data, read, task="instruct", files="a chat JSONL file of conversations")
        splits.labels = label_set([e.label for e in splits.train])
        return splits

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list[ChatExample]:
        examples = kept(read_chat_examples(path, require_reference=require_label, skip_bad_rows=data.skip_bad_rows), skipped)
        if not examples:
            raise FinegrainError(f"{path}: no usable conversations")
        return examples

    def examples_from_inputs(self, inputs: Sequence[Any], data) -> list[ChatExample]:
        """Conversations to answer: a text (one user turn), a list of messages, a {"messages": [...]}
        or {"instruction", "input"} object, or a `ChatExample`."""
        examples = []
        for i, value in enumerate(inputs):
            source = f"input:{i + 1}"
            try:
                if isinstance(value, ChatExample):
                    examples.append(value)
                    continue
                if isinstance(value, str):
                    if not value.strip():
                        raise ValueError("an empty text")
                    messages = [{"role": "user", "content": value}]
                elif isinstance(value, list):
                    messages = check_messages(value)
                else:
                    messages = messages_from_record(value, require_reference=False)
            except ValueError as exc:
                raise FinegrainError(f"{source}: {exc}") from None
            examples.append(ChatExample(messages, source))
        return examples

    def input_record(self, example: ChatExample) -> dict[str, Any]:
        return {"messages": example.messages}

    # -- tokens ----------------------------------------------------------------------------

    def encode(self, tokenizer, examples: Sequence[ChatExample], max_length: int) -> list[InstructEncoded]:
        """Tokenize conversations (cut at `max_length`), packed into rows when `packing` is on."""
        self.tokenizer = tokenizer
        items = []
        for index, example in enumerate(examples):
            prompt = tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True)
            if example.label is not None:
                ids, targets = encode_conversation(tokenizer, example.messages, example.source)
                if len(ids) > max_length:  # the last kept token's target was cut off with the rest
                    ids, targets = ids[:max_length], targets[: max_length - 1] + [IGNORE_INDEX]
            else:  # nothing to learn: the prompt alone
                ids = tokenizer.encode(generation_text(tokenizer, prompt))[:max_length]
                targets = [IGNORE_INDEX] * len(ids)
            entry = Prompt(index, generation_text(tokenizer, prompt), example.text)
            items.append(InstructEncoded(ids, targets, [len(ids)], [entry]))
        return pack(items, max_length) if self.packing else items

    def collate(
        self, items: list[InstructEncoded], pad_id: int, hidden: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return collate_packed(items, pad_id, hidden)

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama: Llama, tokenizer=None) -> InstructModel:
        self.tokenizer = tokenizer
        return InstructModel(llama)

    def set_class_weights(self, train: list[InstructEncoded]) -> None:
        """Nothing to weigh: the targets are the vocabulary's tokens."""

    def long_text_counts(self, items: list[InstructEncoded]) -> None:
        return None  # a conversation longer than data.max_length loses its end (`encode`)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return labelled_weight(batch, None)

    def loss(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the assistant tokens of the batch."""
        # Every reply cut off by max_length: nothing to learn, but still a (zero) loss with a graph.
        return losses.mean() if losses.numel() else losses.sum()

    # -- outputs ---------------------------------------------------------------------------

    def predict(
        self, model: InstructModel, items: list[InstructEncoded], pad_id: int, batch_size: int = 64,
        hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per conversation, in the order encoded: `prompt` (its last user turn) and the `generated` reply.

        Greedy generation from the prompt text, batched by prompt length; the whole model runs,
        so cached lower-layer states (`hidden`, `start_layer`) are not used.
        """
        from finegrain.generation import generate
        from finegrain.inference import sorted_batches

        if self.tokenizer is None:
            raise FinegrainError("task instruct: no tokenizer; build the model with build_model(llama, tokenizer) first")
        prompts = sorted((p for item in items for p in item.prompts), key=lambda p: p.index)
        was_training = model.training
        model.eval()
        generated: list[str] = [""] * len(prompts)
        batches = sorted_batches([len(p.text) for p in prompts], batch_size)
        for indices in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False, delay=1.0):
            texts = generate(
                model.llama, self.tokenizer, [prompts[i].text for i in indices], max_new_tokens=self.max_new_tokens
            )
            for i, text in zip(indices, texts):
                generated[i] = text
        model.train(was_training)
        return [{"prompt": p.shown, "generated": text} for p, text in zip(prompts, generated)]

    def gold(self, examples: Sequence[ChatExample]) -> list[str | None]:
        return [e.label for e in examples]

    def metrics(self, predictions: list[dict[str, Any]], gold: list[str | None]) -> dict[str, Any]:
        """Generation metrics (see `finegrain.evaluate.generation`) and the first few examples."""
        from finegrain.evaluate.generation import generation_metrics

        if any(g is None for g in gold):
            raise FinegrainError("instruct metrics need a reference (a final assistant turn) for every conversation")
        metrics = generation_metrics([p["generated"] for p in predictions], gold, self.labels)
        metrics["examples"] = [
            {"prompt": p["prompt"], "reference": g, "generated": p["generated"]}
            for p, g in list(zip(predictions, gold))[:EXAMPLES_SHOWN]
        ]
        return metrics

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        """report.md and report.html: the scores, accuracy per label, and example generations."""
        from finegrain.evaluate.report import Table, write_report

        scores = [[name, metrics[name]] for name in _SCORES if name in metrics]
        tables = [Table("Scores", ["metric", "value"], scores)]
        if metrics.get("per_label"):
            rows = [[label, s["support"], s["accuracy"]] for label, s in metrics["per_label"].items()]
            tables.append(Table("Generative classification by label", ["label", "examples", "accuracy"], rows))
        rows = [[e["prompt"], e["reference"], e["generated"]] for e in metrics.get("examples", [])]
        tables.append(Table("Examples", ["prompt", "reference", "generated"], rows))
        summary = f"{split}: {metrics['num_examples']} conversations, " + ", ".join(
            f"{name} {metrics[name]:.4f}" for name in _SCORES if isinstance(metrics.get(name), float)
        )
        write_report(run_dir, title, summary, tables)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        """The scores, one per line, then the example generations."""
        lines = [
            f"  {name:<20} {metrics[name]:.4f}" if isinstance(metrics[name], float) else f"  {name:<20} {metrics[name]}"
            for name in _SCORES if name in metrics
        ]
        for e in metrics.get("examples", [])[:3]:
            lines += ["", f"  prompt:    {_one_line(e['prompt'])}", f"  reference: {_one_line(e['reference'])}",
                      f"  generated: {_one_line(e['generated'])}"]
        return "\n".join(lines)


# Scores in the order reports show them.
_SCORES = ("num_examples", "rougeL", "token_f1", "exact_match", "generative_accuracy", "unmappable", "label_examples")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
