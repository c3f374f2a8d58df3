"""`finegrain prune`: a finished run made into a smaller, ordinary LLaMA by structured pruning.

The run's adapter is merged into its base first (`export.merged_model`), so what is pruned is a
plain decoder. What goes is chosen by importance measured on a sample of the run's validation
split (`examples`):

- decoder layers (`--layers N` keeps N, `--layers auto`): each layer is skipped on its own and
  the run's predictions compared with the unpruned ones, as the mean KL divergence of the class
  distributions (`train.distill.soft_loss` at T = 1): a layer whose removal moves them least is
  the least important, and a layer that is an identity scores exactly 0. `auto` drops layers in
  that order while the cut model's validation metric, before any recovery, stays within
  `AUTO_TOLERANCE` of the unpruned model's.
- attention heads (`--heads F`) and FFN channels (`--ffn F`), each F the fraction to remove:
  first-order Taylor importance (gradient x activation; Molchanov et al., 2019) of each head's
  output (the input of o_proj) and of each channel of the SwiGLU product (the input of
  down_proj), as the squared gradient of the task's loss with respect to a unit scale on it,
  summed over batches. Under grouped-query attention a query head shares its key and value head
  with the rest of its group, so heads go as whole KV groups (the group's scores summed; with as
  many KV heads as heads, a group is one head): the result is still an ordinary GQA LLaMA.
  Every layer keeps the same number of groups and of channels, each layer its own most important
  ones: `transformers`' LlamaConfig has one `num_attention_heads` and one `intermediate_size` for
  all layers, so per-layer counts could not load there.

Layers go first (scored on the whole run), then heads and channels (scored on the cut model).
The output directory is an ordinary full fine-tune run (`peft.method: full`): `pruned/` holds the
pruned model before recovery (a Hugging Face directory: `config.json` with its `head_dim`,
`model.safetensors`, the tokenizer, the task's head in `head/head.safetensors`) and is the
run's `model.name`; `pruning.json` says what was kept and why; then a short recovery fine-tune
(`finegrain.run.train`, `--recover-epochs`, every weight training, the head starting from the
pruned one through `head.weights`; with `--distill` the unpruned run is its teacher,
`distill.teacher`) writes `model/`, metrics and reports like any run. With `--recover-epochs 0`
the pruned model itself becomes `model/` and is tested. `finegrain evaluate`, `finegrain.load`,
`finegrain export` and `finegrain train --resume` (of an interrupted recovery) take the directory
as they take any run; `transformers` loads `pruned/` and `model/` as `LlamaForCausalLM`.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import atomic_dir, atomic_write_json, atomic_write_text
from finegrain.config import LoraSection, PeftSection, dump_yaml, load_config
from finegrain.errors import FinegrainError, Interrupted
from finegrain.evaluate.metrics import higher_is_better
from finegrain.export import merged_model, require_llama, require_mergeable
from finegrain.data.pipeline import sample
from finegrain.inference import item_rows, sorted_batches
from finegrain.model.backbone import hidden_states
from finegrain.model.linear import Linear
from finegrain.model.llama import at_rows
from finegrain.peft.full_files import save_model_dir
from finegrain.run import Predictor, train, write_results
from finegrain.tasks import task_class
from finegrain.train.distill import soft_loss
from finegrain.train.trainer import flat_metrics

TASKS = ("classification",)  # a head of class logits: the layer score compares their distributions
AUTO_TOLERANCE = 0.02  # --layers auto: the validation metric the cut model may lose before recovery
TAYLOR_BATCH = 8  # examples per gradient in the Taylor scores (a squared gradient per batch)
SCORE_BATCH = 16  # examples per batch of the layer scores: length-sorted batches this small carry little padding
RECOVERY_LR = 5e-5  # full fine-tuning of every kept weight: LoRA's 1e-3 would undo the pruned model


# ---------------------------------------------------------------------------------------------- scores


class SkippedLayer(nn.Module):
    """A decoder layer's stand-in that passes its input on: the model as if the layer were removed."""

    def forward(self, x, cos, sin, mask, is_causal, input_pos=None, rows=None, prefix=None) -> torch.Tensor:
        return x if rows is None else at_rows(x, rows)  # (B, T, H), or (B, 1, H) at `rows`, as a layer returns


@torch.no_grad()
def layer_scores(model: nn.Module, task: Any, items: list, pad_id: int, batch_size: int = SCORE_BATCH,
                 progress: bool = True) -> list[float]:
    """Per decoder layer, the mean KL divergence of the task's class distributions from the whole
    model's when that layer alone is skipped (0: the layer changes nothing).

    Each batch runs up the layers once; the model without layer i starts from the kept input of
    layer i, so scoring L layers costs about L * L / 2 layer passes, not L * L.
    """
    backbone, multi_label = model.model, getattr(task, "multi_label", False)
    layers = list(backbone.layers)
    totals, count = torch.zeros(len(layers), dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    batches = sorted_batches([len(item.input_ids) for item in items], batch_size, [len(item_rows(item)) for item in items])
    try:
        for indices in tqdm(batches, desc="scoring layers", unit="batch", disable=not progress, leave=False):
            inputs = task.collate([items[i] for i in indices], pad_id)
            reference = model(inputs)  # (B, C)
            x = None  # the input of layer i: (B, T, H)
            for i, layer in enumerate(layers):
                batch = inputs if x is None else {**inputs, "hidden": x}
                backbone.layers[i] = SkippedLayer()
                try:
                    skipped = model(batch, start_layer=i)
                finally:
                    backbone.layers[i] = layer
                totals[i] += float(soft_loss(skipped, reference, 1.0, multi_label)) * len(reference)
                x = hidden_states(backbone, batch, i, i + 1)
            count += len(reference)
    finally:
        model.train(was_training)
    return (totals / max(count, 1)).clamp(min=0).tolist()


def taylor_scores(model: nn.Module, task: Any, items: list, pad_id: int, progress: bool = True,
                  batch_size: int = TAYLOR_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Taylor importance of every attention head (L, nh) and FFN channel (L, I): the squared
    gradient of the task's loss with respect to a unit scale on the head's output (before o_proj)
    or the channel (before down_proj), summed over batches of `batch_size` items.

    A head or channel whose output weights are zero scores exactly 0: no gradient reaches its scale.
    """
    layers = model.model.layers
    head_scales = [torch.ones(layer.self_attn.num_heads, requires_grad=True) for layer in layers]
    channel_scales = [torch.ones(layer.mlp.down_proj.in_features, requires_grad=True) for layer in layers]
    hooks = []
    for layer, heads, channels in zip(layers, head_scales, channel_scales):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(_scale_heads(heads, layer.self_attn.head_dim)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(_scale_channels(channels)))
    head_scores = torch.zeros(len(layers), len(head_scales[0])) if layers else torch.zeros(0, 0)
    channel_scores = torch.zeros(len(layers), len(channel_scales[0])) if layers else torch.zeros(0, 0)
    was_training, grads_on = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        batches = sorted_batches([len(item.input_ids) for item in items], batch_size)
        for indices in tqdm(batches, desc="scoring heads and channels", unit="batch", disable=not progress, leave=False):
            batch = task.collate([items[i] for i in indices], pad_id)
            loss = task.loss(model(batch), batch)
            grads = torch.autograd.grad(loss, head_scales + channel_scales)
            head_scores += torch.stack(grads[: len(layers)]) ** 2
            channel_scores += torch.stack(grads[len(layers):]) ** 2
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        for param, on in zip(model.parameters(), grads_on):
            param.requires_grad_(on)
    return head_scores, channel_scores


def _scale_heads(scales: torch.Tensor, head_dim: int):
    def hook(module, args):
        x = args[0]  # (B, T, nh*hd)
        shape = x.shape
        return ((x.view(*shape[:-1], len(scales), head_dim) * scales[:, None]).view(shape),)  # (B, T, nh, hd) scaled
    return hook


def _scale_channels(scales: torch.Tensor):
    def hook(module, args):
        return (args[0] * scales,)  # (B, T, I)
    return hook


def group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(L, nkv): each KV group's score, the sum of its query heads' (head h reads KV head h // group)."""
    L, num_heads = head_scores.shape
    return head_scores.view(L, num_kv_heads, num_heads // num_kv_heads).sum(-1)


def removed(fraction: float, count: int) -> int:
    """How many of `count` units a fraction removes: rounded half up, at least one unit kept."""
    return min(count - 1, int(fraction * count + 0.5))


# ---------------------------------------------------------------------------------------------- surgery


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> Linear:
    """A new `Linear` with only the output features `rows` and input features `columns` of `linear`."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    has_bias = linear.bias is not None
    sliced = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    sliced.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if has_bias:
        bias = linear.bias.detach()
        sliced.bias = nn.Parameter((bias[rows] if rows is not None else bias).clone(), requires_grad=False)
    return sliced


def keep_groups(attention: nn.Module, groups: list[int]) -> None:
    """Keep only the KV groups `groups` of an attention block: their key/value heads, their query
    heads, and o_proj's columns that read those query heads."""
    per_group, head_dim = attention.num_heads // attention.num_kv_heads, attention.head_dim
    query_heads = [g * per_group + j for g in groups for j in range(per_group)]
    query_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in query_heads])
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
    attention.q_proj = slice_linear(attention.q_proj, rows=query_rows)
    attention.k_proj = slice_linear(attention.k_proj, rows=kv_rows)
    attention.v_proj = slice_linear(attention.v_proj, rows=kv_rows)
    attention.o_proj = slice_linear(attention.o_proj, columns=query_rows)
    attention.num_heads, attention.num_kv_heads = len(query_heads), len(groups)


def keep_channels(mlp: nn.Module, channels: torch.Tensor) -> None:
    """Keep only the FFN channels `channels`: gate and up rows, down_proj columns."""
    mlp.gate_proj = slice_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = slice_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = slice_linear(mlp.down_proj, columns=channels)


def keep_layers(backbone: nn.Module, layers: list[int]) -> None:
    """Keep only the decoder layers `layers` (in their order)."""
    backbone.layers = nn.ModuleList(backbone.layers[i] for i in layers)
    backbone.config = backbone.config.replace(num_layers=len(layers))


def prune_heads_and_channels(backbone: nn.Module, head_scores: torch.Tensor, channel_scores: torch.Tensor,
                             heads: float, ffn: float) -> dict[str, Any]:
    """Remove the fraction `heads` of every layer's KV groups and `ffn` of its FFN channels, the
    lowest-scored of each layer; the same counts in every layer. Returns what each layer kept."""
    config = backbone.config
    groups = group_scores(head_scores, config.num_kv_heads)
    keep_g = config.num_kv_heads - removed(heads, config.num_kv_heads)
    keep_c = config.intermediate_size - removed(ffn, config.intermediate_size)
    kept_groups, kept_channels = [], []
    for layer, g_scores, c_scores in zip(backbone.layers, groups, channel_scores):
        kept_groups.append(sorted(g_scores.topk(keep_g).indices.tolist()))
        kept_channels.append(sorted(c_scores.topk(keep_c).indices.tolist()))
        if keep_g < config.num_kv_heads:
            keep_groups(layer.self_attn, kept_groups[-1])
        if keep_c < config.intermediate_size:
            keep_channels(layer.mlp, torch.tensor(kept_channels[-1]))
    per_group = config.num_heads // config.num_kv_heads
    backbone.config = config.replace(num_heads=keep_g * per_group, num_kv_heads=keep_g, intermediate_size=keep_c,
                                     head_dim=config.head_dim)
    return {"kv_groups": {"kept": keep_g, "of": config.num_kv_heads, "query_heads_per_group": per_group,
                          "per_layer": kept_groups},
            "ffn_channels": {"kept": keep_c, "of": config.intermediate_size, "per_layer": kept_channels}}


# ---------------------------------------------------------------------------------------------- the run


def parse_layers(value: str | int | None) -> int | str | None:
    """--layers: a number of layers to keep, `auto`, or None (keep every layer)."""
    if value is None or value == "auto" or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise FinegrainError(f"--layers: '{value}' is neither a number of layers to keep nor auto") from None


def check_request(layers: int | str | None, heads: float, ffn: float, recover_epochs: float, examples: int = 1) -> None:
    """One-line errors for what the user asked, before anything is loaded."""
    for flag, fraction, what in (("--heads", heads, "attention heads"), ("--ffn", ffn, "FFN channels")):
        if not 0 <= fraction < 1:
            raise FinegrainError(f"{flag}: {fraction:g} is not a fraction in [0, 1) of the {what} to remove; e.g. {flag} 0.25")
    if isinstance(layers, int) and layers < 1:
        raise FinegrainError(f"--layers: {layers} keeps no layer; give a number from 1, or auto")
    if layers is None and heads == 0 and ffn == 0:
        raise FinegrainError("nothing to prune: give --layers (N or auto), --heads or --ffn")
    if examples < 1:
        raise FinegrainError(f"--examples: {examples} validation examples cannot score anything; give at least 1 (default 256)")
    if recover_epochs < 0 or not math.isfinite(recover_epochs):
        raise FinegrainError(f"--recover-epochs: {recover_epochs:g} must be 0 (no recovery) or more")


def prune_run(run_dir: str | Path, output: str | Path, layers: int | str | None = None, heads: float = 0.0,
              ffn: float = 0.0, recover_epochs: float = 1.0, distill: bool = False, examples: int = 256,
              overrides: list[str] = (), progress: bool = True) -> dict[str, Any]:
    """Prune a finished run into `output` and recover it (see the module docstring).

    Args:
        run_dir: a finished run of a task in `TASKS` whose method merges into the weights.
        output: a new directory: the pruned run.
        layers: decoder layers to keep (a number), "auto", or None to keep them all.
        heads, ffn: the fractions of KV groups (attention heads) and FFN channels to remove, in [0, 1).
        recover_epochs: epochs of the recovery fine-tune; 0: none.
        distill: the recovery learns from the unpruned run's outputs (`distill.teacher`).
        examples: validation examples (stratified sample) that score the importance.
        overrides: `section.key=value` for the recovery run's config (`train.lr=1e-4`).

    Returns:
        pruning.json's content, with the test metrics of the pruned run (`test`).
    """
    run_dir, output = Path(run_dir), Path(output)
    layers = parse_layers(layers)
    check_request(layers, heads, ffn, recover_epochs, examples)
    config = rundir.read_config(run_dir)
    rundir.require_adapter(run_dir)
    if config.task not in TASKS:
        raise FinegrainError(f"{run_dir}: a {config.task} run; finegrain prune scores and recovers {', '.join(TASKS)} "
                             "runs so far (train a smaller model with model.num_layers instead)")
    require_mergeable(config, run_dir, "pruned", "prune a run of a method that merges (lora, dora, ia3, full, ...)")
    if output.exists():
        unfinished = (output / rundir.PRUNING).is_file() and rundir.has_checkpoint(output) and not rundir.is_finished(output)
        hint = f"its recovery stopped: continue it with `finegrain train --resume {output}`, or " if unfinished else ""
        raise FinegrainError(f"{output}: already exists; {hint}choose a new --output for the pruned run")
    model, tokenizer, task = merged_model(run_dir, config)
    require_llama(model, run_dir)
    backbone = model.model
    total = len(backbone.layers)
    if isinstance(layers, int) and layers > total:
        raise FinegrainError(f"--layers: {layers} is more than the run's {total} layers; give 1-{total} or auto")

    splits = task_class(config.task).load_splits(config.data)
    if not splits.validation:
        raise FinegrainError(f"{run_dir}: its data has no validation split, which scores what to prune; "
                             "give the run data.validation or a split for it")
    chosen = sample(splits.validation, examples, config.data.split_seed)
    items = task.encode(tokenizer, chosen, config.data.max_length)
    gold, pad_id, batch = task.gold(chosen), tokenizer.pad_token_id, config.train.eval_batch_size
    metric = config.train.metric or task.headline_metric

    def validation() -> float:
        return float(flat_metrics(task.metrics(task.predict(model, items, pad_id, batch), gold))[metric])

    before = {"parameters": parameters(model), "validation": validation()}
    report: dict[str, Any] = {"source": str(run_dir.resolve()), "validation_examples": len(items), "metric": metric}
    if layers is not None:
        scores = layer_scores(model, task, items, pad_id, progress=progress)
        kept = choose_layers(model, scores, layers, validation, before["validation"], higher_is_better(metric), progress)
        keep_layers(backbone, kept)
        report["layers"] = {"kept": kept, "of": total, "scores": [round(s, 6) for s in scores],
                            "score": "KL of the class distributions when the layer alone is skipped"}
    if heads or ffn:
        head_scores, channel_scores = taylor_scores(model, task, items, pad_id, progress)
        report.update(prune_heads_and_channels(backbone, head_scores, channel_scores, heads, ffn))
    after = {"parameters": parameters(model), "validation": validation()}
    report.update(before=before, pruned=after)

    output.mkdir(parents=True)
    try:
        save_model_dir(model, tokenizer, task.head_modules, output / rundir.PRUNED)
        atomic_write_json(output / rundir.PRUNING, report)
        del model
        recovery = recovery_config(config, run_dir, output, recover_epochs, distill)
        atomic_write_text(output / rundir.CONFIG, dump_yaml(recovery))
        recovery = load_config(output / rundir.CONFIG, list(overrides))  # --set checked as `finegrain train` checks it
        vars(recovery).pop("explicit")  # every key is set: no recipe, no carried lora: keys
        if recover_epochs:
            results = train(recovery, progress=progress)
        else:
            results = finish_unrecovered(recovery, output, splits, progress)
    except BaseException as exc:
        if not rundir.has_checkpoint(output):  # nothing a --resume could continue: no half-written run left
            shutil.rmtree(output, ignore_errors=True)
            if isinstance(exc, Interrupted):  # its "--resume" hint named what is gone
                raise KeyboardInterrupt from None
        raise
    report["test"] = results.get("test")
    atomic_write_json(output / rundir.PRUNING, report)
    return report


def choose_layers(model: nn.Module, scores: list[float], keep: int | str, validation, reference: float,
                  higher: bool, progress: bool = False) -> list[int]:
    """The indices of the layers to keep: the `keep` highest-scored, or with "auto" all but those
    whose removal, least important first, keeps `validation()` within AUTO_TOLERANCE of `reference`."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))  # least important first; ties: the top layer
    if keep != "auto":
        return sorted(order[len(scores) - keep:])
    backbone, layers, dropped = model.model, model.model.layers, []
    try:
        for i in tqdm(order[:-1], desc="dropping layers", unit="layer", disable=not progress, leave=False):
            trial = set(dropped) | {i}
            backbone.layers = nn.ModuleList(layer for j, layer in enumerate(layers) if j not in trial)
            value = validation()
            if (reference - value if higher else value - reference) > AUTO_TOLERANCE:
                break
            dropped.append(i)
    finally:
        backbone.layers = layers
    return [i for i in range(len(scores)) if i not in dropped]


def parameters(model: nn.Module) -> dict[str, int]:
    """The decoder's parameters: all of them, and those of its layers (the part pruning shrinks)."""
    backbone = model.model
    unique = {id(p): p for p in backbone.parameters()}.values()
    return {"decoder": sum(p.numel() for p in unique), "layers": sum(p.numel() for p in backbone.layers.parameters())}


def recovery_config(config, run_dir: Path, output: Path, epochs: float, distill: bool):
    """The pruned run's config: the unpruned run's data, task and head, a full fine-tune of the
    pruned model (`pruned/`) starting from its head, `epochs` long, distilled from the run if asked."""
    recovery = copy.deepcopy(config)
    pruned = (output / rundir.PRUNED).resolve()
    recovery.model.name, recovery.model.num_layers, recovery.model.quantize = str(pruned), None, None
    recovery.model.dtype = "float32"
    recovery.peft, recovery.lora = PeftSection(method="full"), LoraSection()
    recovery.head.init, recovery.head.weights = "random", str(pruned)
    recovery.train.recipe, recovery.train.lr, recovery.train.head_lr = "off", RECOVERY_LR, None
    if epochs:
        recovery.train.epochs = epochs
    recovery.init_from, recovery.init_labels, recovery.output = None, None, str(output)
    if distill:
        recovery.distill.teacher = str(run_dir.resolve())
    return recovery


def finish_unrecovered(config, output: Path, splits, progress: bool) -> dict[str, Any]:
    """--recover-epochs 0: the pruned model is the run's model; its labels, test metrics and reports."""
    atomic_write_json(output / rundir.LABELS, splits.labels)
    with atomic_dir(output / rundir.MODEL) as tmp:  # the run is finished once model/ is whole
        shutil.copytree(output / rundir.PRUNED, tmp, dirs_exist_ok=True)
    predictor = Predictor(output, progress=progress)
    results: dict[str, Any] = {"task": config.task, "labels": splits.labels, "train": {"examples": 0, "steps": 0}}
    if splits.test:
        results["test"] = predictor.task.metrics(predictor.predict_examples(splits.test), predictor.task.gold(splits.test))
        results["test"]["source"] = splits.origin["test"]
    write_results(output, results, predictor.task, config.train.metric or predictor.task.headline_metric)
    return results


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What `finegrain prune` prints: what was kept, the size and the scores before and after."""
    before, after, metric = report["before"], report["pruned"], report["metric"]
    lines = []
    if "layers" in report:
        kept = report["layers"]["kept"]
        lines.append(f"layers: kept {len(kept)} of {report['layers']['of']} ({', '.join(map(str, kept))})")
    if "kv_groups" in report:
        groups, ffn = report["kv_groups"], report["ffn_channels"]
        lines.append(f"attention: kept {groups['kept']} of {groups['of']} KV groups per layer "
                     f"({groups['kept'] * groups['query_heads_per_group']} query heads); "
                     f"FFN: kept {ffn['kept']} of {ffn['of']} channels per layer")
    lines.append(f"decoder parameters: {after['parameters']['decoder']:,} of {before['parameters']['decoder']:,} "
                 f"({after['parameters']['decoder'] / before['parameters']['decoder']:.0%}); layers alone "
                 f"{after['parameters']['layers'] / max(before['parameters']['layers'], 1):.0%}")
    lines.append(f"validation {metric} ({report['validation_examples']} examples): {before['validation']:.4f} unpruned, "
                 f"{after['validation']:.4f} pruned before recovery")
    if report.get("test"):
        test = flat_metrics(report["test"])
        if metric in test:
            lines.append(f"test {metric} of the pruned run: {test[metric]:.4f}")
    return lines

