"""The `finegrain` command line."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import io
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from finegrain.errors import FinegrainError

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "auto (CUDA where torch sees one, else the CPU), cpu, cuda or mps"
SKIP_HELP = "skip malformed rows (and, with labels, rows of labels the run does not know) and count them instead of stopping"
NPROC_HELP = "run in N processes on this machine under torchrun (as `torchrun --nproc-per-node N -m finegrain ...`)"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error that points at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def check_sampling(args: argparse.Namespace) -> None:
    """Refuse sampling flags no generation can use, before the model loads (generate and chat)."""
    checks = [("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
              ("--temperature", args.temperature, 0 <= args.temperature < math.inf, "0 (greedy) or more")]
    if hasattr(args, "top_p"):  # generate's own flags; chat samples with top-p 0.9 and takes none of these
        checks += [("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "at least 1"),
                   ("--top-p", args.top_p, 0 < args.top_p <= 1, "above 0 and at most 1"),
                   ("--repetition-penalty", args.repetition_penalty, 0 < args.repetition_penalty < math.inf, "above 0 (1: none)")]
    for flag, value, ok, need in checks:
        if not ok:
            raise FinegrainError(f"{flag} {value}: must be {need}")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from finegrain.checkpoint.load import load_model
    from finegrain.generation import generate

    check_sampling(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt and not args.chat:
        where = "standard input" if args.prompt == "-" else "--prompt"
        raise FinegrainError(f"{where}: an empty prompt leaves nothing to continue; give some text (or --chat, to answer it as a message)")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=_torch_dtype(args.dtype))
    if args.int8:
        from finegrain.model.quantize import quantize_int8

        quantize_int8(model)
    temperature = 0.0 if args.greedy else args.temperature
    print(prompt if not args.chat else "", end="", flush=True)
    generate(
        model, tokenizer, prompt,
        max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop or (), seed=args.seed, chat=args.chat,
        stream=lambda piece: print(piece, end="", flush=True),
    )
    print()


def cmd_info(args: argparse.Namespace) -> None:
    from finegrain.checkpoint.load import build_model, load_checkpoint

    checkpoint = load_checkpoint(args.model)
    config, tokenizer = checkpoint.config, checkpoint.tokenizer
    model = build_model(config, checkpoint.state_dict)
    info = {
        "source": checkpoint.source["path"],
        "format": checkpoint.source["format"],
        "architecture": config.model_type,
        "parameters": model.num_parameters(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "source tensor types": checkpoint.source["tensor_types"],
        "layers": config.num_layers,
        "hidden size": config.hidden_size,
        "intermediate size": config.intermediate_size,
        "attention heads": config.num_heads,
        "key/value heads": getattr(config, "num_kv_heads", config.num_heads),  # an encoder: one per head
        "head dim": config.head_dim,
        "context length": config.max_position_embeddings,
        "rope theta": getattr(config, "rope_theta", None),  # None: an encoder's learned positions
        "rope scaling": getattr(config, "rope_scaling", None),
        "tied embeddings": config.tie_word_embeddings,
        "tokenizer": {
            "vocabulary": tokenizer.vocab_size,
            "bos": tokenizer.bos_token_id,
            "eos": sorted(tokenizer.eos_token_ids),
            "pad": tokenizer.pad_token_id,
            "adds bos": tokenizer.add_bos,
            "chat template": tokenizer.chat_template is not None,
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        print(f"{key:>20}  {value}")


def cmd_convert(args: argparse.Namespace) -> None:
    from finegrain.checkpoint.load import load_model
    from finegrain.checkpoint.save import save_pretrained

    output = Path(args.output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):  # an empty directory is no loss
        raise FinegrainError(f"{output}: already exists; choose another output directory (convert never overwrites)")
    above = next(parent for parent in output.absolute().parents if parent.exists())
    if not above.is_dir():
        raise FinegrainError(f"{above}: exists and is not a directory; choose another output path")
    model, tokenizer = load_model(args.source, dtype=_torch_dtype(args.dtype))
    out = save_pretrained(model, tokenizer, args.output)
    print(f"saved {model.num_parameters():,} parameters ({args.dtype}) to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from finegrain.config import load_config
    from finegrain.run import train
    from finegrain.tasks import task_class

    if args.nproc is not None:
        return _launch_torchrun(args)
    if args.resume:
        if args.config or args.set or any(getattr(args, flag) is not None for flag in TRAIN_FLAGS):
            raise FinegrainError("--resume continues a run with its saved config.yaml; drop the config file and other options")
        from finegrain.rundir import task_runs

        if task_runs(args.resume):  # a multi-task run (finegrain.multitask)
            return _train_multitask(args.resume)
        results = train(None, resume_dir=args.resume)
    else:
        overrides = list(args.set or [])
        for flag, key in TRAIN_FLAGS.items():
            value = getattr(args, flag)
            if value is not None:
                overrides.append(f"{key}={value}")
        if args.skip_bad_rows:
            overrides.append("data.skip_bad_rows=true")
        config = load_config(args.config, overrides)
        if config.continual.classes or config.continual.tasks:  # a sequence of stages (finegrain.continual)
            from finegrain.continual import train_sequence

            summary = train_sequence(config)["continual"]
            for name, row in zip(summary["stages"], summary["accuracy_matrix"]):
                print(f"after {name}: " + "  ".join(f"{value:.3f}" for value in row))
            forward = f"forward transfer {summary['fwt']:+.3f}, " if "fwt" in summary else ""
            print(f"average accuracy {summary['average_accuracy']:.3f}, backward transfer {summary['bwt']:+.3f}, "
                  f"{forward}{summary['total_seconds']:.0f} s ({config.output}/metrics.json)")
            return
        if config.tasks:  # several tasks on one backbone (finegrain.multitask)
            return _train_multitask(None, config)
        results = train(config)
    if not results:  # a torchrun rank above 0: rank 0 reports
        return
    split = "test" if "test" in results else "validation"
    if split in results:
        metrics = results[split]
        count = f"{metrics.get('num_examples', '?')} examples"
        if "num_sentences" in metrics:  # plain tags: every word is an example
            count = f"{metrics['num_examples']} words in {metrics['num_sentences']} sentences"
        print(f"\n{split} ({count}, {metrics['source']}):")
        print(task_class(results["task"]).report_text(metrics))
    summary = results["train"]
    print(
        f"trained {summary['examples']} examples, {summary['steps']} steps in {summary['train_seconds']:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s); whole run {summary['total_seconds']:.0f} s"
    )
    if summary["skipped_rows"]:
        print(f"skipped {summary['skipped_rows']} bad rows (listed in skipped_rows.txt)")


def _launch_torchrun(args: argparse.Namespace) -> None:
    """`--nproc N`: the same command in N processes under torchrun on this machine (`finegrain.launch`)."""
    from finegrain.launch import launch

    launch(args.command, args.argv, args.nproc, args, TRAIN_FLAGS)


def _train_multitask(resume_dir, config=None) -> None:
    """Train (or resume) a multi-task run and print its table of tasks."""
    from finegrain.multitask import summary_table, train as train_tasks

    results = train_tasks(config, resume_dir=resume_dir)
    print("\n" + summary_table(results), end="")
    print(f"metrics: {resume_dir or config.output}/metrics.json")


# Common options that have their own flag, and the config key each sets.
TRAIN_FLAGS = {
    "model": "model.name", "data": "data.train", "dataset": "data.dataset", "output": "output",
    "epochs": "train.epochs", "lr": "train.lr", "batch_size": "train.batch_size", "seed": "train.seed",
    "device": "train.device",
}


def cmd_probe(args: argparse.Namespace) -> None:
    """Which layers to keep and adapt, from a linear probe of each layer of the frozen model."""
    from finegrain.atomic import atomic_write_json
    from finegrain.config import load_config
    from finegrain.train.probe import probe_layers, probe_text

    result = probe_layers(load_config(args.config, list(args.set or [])), args.examples)
    print(probe_text(result))
    if args.output:
        atomic_write_json(args.output, result)


def cmd_sweep(args: argparse.Namespace) -> None:
    """The config over seeds, k-shot sizes and folds, summarised as mean ± std (finegrain.sweep)."""
    from finegrain.config import load_config
    from finegrain.sweep import TABLE, sweep

    try:
        shots = [int(k) for k in args.shots.split(",")] if args.shots else None
    except ValueError:
        raise FinegrainError(f"--shots: '{args.shots}' is not a list of whole numbers; write e.g. 8,16,32") from None
    try:
        prompted = [int(k) for k in args.prompted.split(",")] if args.prompted else None
    except ValueError:
        raise FinegrainError(f"--prompted: '{args.prompted}' is not a list of whole numbers; write e.g. 0,4") from None
    sweep(load_config(args.config, list(args.set or [])), args.output, seeds=args.seeds, shots=shots, folds=args.folds,
          prompted=prompted)
    print((Path(args.output) / TABLE).read_text(encoding="utf-8"))


def cmd_tune(args: argparse.Namespace) -> None:
    """Hyperparameter search with Optuna, pruning on validation (finegrain.tune)."""
    from finegrain.tune import tune

    summary = tune(args.config, list(args.set or []), list(args.space or []), args.trials, args.output,
                   metric=args.metric, storage=args.storage, seed=args.seed)
    best = summary["best"]
    if best:
        print(f"best trial {best['number']}: validation {summary['metric']} {best['value']:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in best["params"].items()) + f"; its config: {args.output}/best.yaml")


def _load(run_dir: str, device: str | None, skip_bad_rows: bool = False):
    """`finegrain.load(run_dir)`, on `device` when the --device flag names one (else the run's
    train.device); `skip_bad_rows` (--skip-bad-rows): the files it reads skip bad rows."""
    from finegrain import load
    from finegrain.rundir import is_ensemble

    if device is None:
        predictor = load(run_dir)
    elif is_ensemble(run_dir):
        raise FinegrainError(f"--device: {run_dir} is an ensemble, whose runs each predict on their own train.device; drop --device")
    else:
        from finegrain.run import Predictor

        predictor = Predictor(run_dir, device=device)
    if skip_bad_rows:
        predictor.config.data.skip_bad_rows = True  # this command's reading alone: config.yaml is not written
    for run in getattr(predictor, "members", [predictor]):  # a file of thousands of texts takes minutes: show it
        run.progress_bar = "predicting"
    return predictor


def _say_skipped(path: str, count: int, example: str) -> None:
    print(f"skipped {count} bad row{'s' if count > 1 else ''} of {path} (e.g. {example})", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> None:
    """The config trained per model × method (× seed) beside the baselines, as one table (finegrain.compare)."""
    from finegrain.compare import compare

    def names(value: str, flag: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise FinegrainError(f"{flag}: '{value}' names nothing; write e.g. {flag} smollm2-135m,minilm-l6")
        return items

    written = compare(args.config, names(args.models, "--models"), names(args.methods, "--methods"), args.seeds,
                      args.output, list(args.set or []), prompted=not args.no_prompted)
    print(written["markdown"].read_text(encoding="utf-8"))
    print(f"table: {written['markdown']}, {written['html']}; plot: {written['plot']}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from finegrain.sharded import join_job
    from finegrain.train.distributed import launched

    if args.nproc is not None:
        return _launch_torchrun(args)
    if args.robustness and launched():
        raise FinegrainError("--robustness scores the file's copies in one process; drop it under torchrun")
    if args.paraphrase and not args.robustness:
        raise FinegrainError("--paraphrase adds the paraphrased copies to --robustness; add --robustness")
    if args.paraphrase_prompt and not args.paraphrase:
        raise FinegrainError("--paraphrase-prompt asks for the --paraphrase copies; add --robustness --paraphrase")
    if args.paraphrase_prompt and args.paraphrase_prompt.count("{text}") != 1:
        raise FinegrainError("--paraphrase-prompt: holds {text} once, where the text goes; add it")
    if args.data:
        _keep_input(args.data, args.output, "--data")
    join_job(args.run_dir, args.device)
    _evaluate(args)


def _keep_input(source: str, output: str | None, flag: str) -> None:
    """Refuse an --output that is the file being read: writing it would replace the user's data."""
    if output and source != "-" and Path(source).is_file() and Path(output).is_file() and os.path.samefile(source, output):
        raise FinegrainError(f"--output {output}: is the {flag} file, which it would replace; write to another file")


def _evaluate(args: argparse.Namespace) -> None:
    from finegrain.atomic import atomic_write_json
    from finegrain.sharded import evaluate

    predictor = _load(args.run_dir, args.device, args.skip_bad_rows)
    metrics = evaluate(predictor, args.data)  # under torchrun: each rank its shard; None on ranks above 0
    if metrics is None:
        return
    if "skipped_rows" in metrics:
        _say_skipped(args.data, metrics["skipped_rows"], metrics["skipped_example"])
    if "shared_with_training" in metrics:
        from finegrain.data.split import file_shared_line

        print(file_shared_line(metrics["shared_with_training"], args.data), file=sys.stderr)
    print(predictor.task.report_text(metrics))
    if args.robustness:
        from finegrain.data.augment import robustness, robustness_line
        from finegrain.tasks.base import labelled_examples

        rewrite = _paraphraser(predictor, args.paraphrase_prompt) if args.paraphrase else None
        examples, _ = labelled_examples(predictor.task, predictor.config.data, args.data)
        metrics["robustness"] = robustness(predictor, examples, metrics, rewrite)
        print(robustness_line(metrics["robustness"]))
    if args.output:
        atomic_write_json(args.output, metrics)


def _paraphraser(predictor, prompt: str | None) -> Callable[[list], tuple[list, int]]:
    """`evaluate --paraphrase`: examples -> their copies rewritten by the run's `augment.paraphraser`
    (the default model unless it names one), asked by `prompt` or else the run's
    `augment.paraphrase_prompt`; unjudged."""
    from finegrain.paraphrase import paraphrased
    from finegrain.run import load_paraphraser

    augment = predictor.config.augment
    prompt = prompt or augment.paraphrase_prompt
    llama, tokenizer = load_paraphraser(augment.paraphraser, progress=True)
    return lambda examples: paraphrased(examples, llama, tokenizer, prompt, progress=True)


def cmd_predict(args: argparse.Namespace) -> None:
    from finegrain.sharded import join_job
    from finegrain.train.distributed import launched

    if args.nproc is not None:
        return _launch_torchrun(args)
    if args.input == "-" and launched():
        raise FinegrainError("--input -: under torchrun every process reads the input; give a file")
    _keep_input(args.input, args.output, "--input")
    join_job(args.run_dir, args.device)
    _predict(args)


def _predict(args: argparse.Namespace) -> None:
    from finegrain.atomic import atomic_write_text
    from finegrain.data.readers import without_labels
    from finegrain.sharded import predict_examples

    predictor = _load(args.run_dir, args.device, args.skip_bad_rows)
    task, data = predictor.task, predictor.config.data
    if args.input == "-":
        examples = task.examples_from_inputs([line.rstrip("\n") for line in sys.stdin if line.strip()], data)
    else:
        skipped: list[str] = []  # --skip-bad-rows: the rows left out; no label is read, so none is unknown
        examples = without_labels(task.read_file(data, args.input, require_label=False, skipped=skipped))
        if skipped:
            _say_skipped(args.input, len(skipped), skipped[0])
    if not examples:
        source = "standard input" if args.input == "-" else args.input
        raise FinegrainError(f"{source}: no text to label; give one text per line (stdin) or a file with a {data.text_field} field")
    predictions = predict_examples(predictor, examples, args.input)  # under torchrun: rank 0 gathers them in order
    if predictions is None:
        return
    # Each line echoes its row's other fields (an id, say) before the text and the prediction: the rows can be
    # joined back by them, also where --skip-bad-rows left some out.
    lines = [_json_line({**_other_fields(e), **task.input_record(e), **p}, i + 1, args.run_dir)
             for i, (e, p) in enumerate(zip(examples, predictions))]
    if args.output:
        atomic_write_text(args.output, "".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))


def _other_fields(example: object) -> dict[str, object]:
    """The fields of an input row that the task does not read (`extra`; none from standard input)."""
    return {k: v for k, v in getattr(example, "extra", {}).items() if not k.startswith("_")}


def _json_line(record: dict, number: int, run_dir: str) -> str:
    """One JSONL line; a NaN or infinity (which JSON cannot hold) is a one-line error, never written."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise FinegrainError(
            f"input {number}: the model's output is not a finite number; {run_dir}'s adapter or base model "
            f"is damaged: rebuild the adapter with `finegrain train --resume {run_dir}` or train again"
        ) from None


def cmd_export(args: argparse.Namespace) -> None:
    """A finished run as a merged Hugging Face model, a GGUF file or its PEFT adapter (`finegrain.export`)."""
    from finegrain.export import export_note, export_run

    path = export_run(args.run_dir, args.format, args.output, args.dtype, args.model_alone)
    note = export_note(args.run_dir, args.format, args.model_alone)
    print(f"wrote {path}" + (f"; {note}" if note else ""))


def cmd_interpolate(args: argparse.Namespace) -> None:
    """The run's metric between its base (alpha 0) and its tuned weights (alpha 1) (`finegrain.interpolate`)."""
    from finegrain.interpolate import interpolate_run, parse_alphas

    results = interpolate_run(args.run_dir, parse_alphas(args.alphas), args.save)
    print(f"best alpha {results['best_alpha']:g} on validation {results['metric']}; wrote interpolation.json and interpolation.png"
          + (f"; the run at alpha {results['best_alpha']:g} is {results['saved']}" if "saved" in results else ""))


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Fit the run's temperature on validation and store it with the run (`finegrain.calibrate`)."""
    from finegrain.calibrate import calibrate_run, summary_line

    result = calibrate_run(args.run_dir)
    print(f"{summary_line(result)}; wrote {args.run_dir}/temperature.json (predict and serve apply it)")


def cmd_ensemble(args: argparse.Namespace) -> None:
    """Average the probabilities of classification runs into an ensemble directory (`finegrain.ensemble`)."""
    from finegrain.ensemble import create_ensemble, summary_lines

    results = create_ensemble(args.runs, args.output)
    print("\n".join(summary_lines(results)))


def cmd_prune(args: argparse.Namespace) -> None:
    """A smaller run: layers, KV groups and FFN channels removed by importance, then recovered (`finegrain.prune`)."""
    from finegrain.prune import prune_run, summary_lines

    report = prune_run(args.run_dir, args.output, args.layers, args.heads, args.ffn, args.recover_epochs, args.distill,
                       args.examples, list(args.set or []))
    print("\n".join(summary_lines(report)))
    print(f"wrote {args.output} (the pruned model before recovery: {args.output}/pruned, what was kept: pruning.json)")


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive conversation with a `task: instruct` run's adapted model, or a bare `--model`."""
    from finegrain.generation import generate

    if (args.run_dir is None) == (args.model is None):
        raise FinegrainError("give a RUN_DIR of a task: instruct run, or --model for a base model (one of the two)")
    check_sampling(args)
    if args.run_dir is not None:
        from finegrain import load
        from finegrain.run import load_run_config

        task = load_run_config(args.run_dir).task
        if task != "instruct":
            raise FinegrainError(f"{args.run_dir}: a task {task} run does not generate text; chat with a task: instruct run or --model")
        predictor = load(args.run_dir)
        model, tokenizer = predictor.model.llama, predictor.tokenizer
    else:
        from finegrain.checkpoint.load import load_model

        model, tokenizer = load_model(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    limit = model.config.max_position_embeddings
    print("/reset starts a new conversation; /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if text == "/exit":
                break
            if text == "/reset":
                history = list(system)
                print("(conversation cleared)")
            else:
                print(f"unknown command '{text}'; /reset starts a new conversation, /exit quits")
            continue
        history.append({"role": "user", "content": text})
        prompt = tokenizer.chat_prompt(history)  # what the user typed stays text, never a turn marker
        while len(tokenizer.encode(prompt)) + args.max_new_tokens > limit and len(history) > len(system) + 1:
            del history[len(system) : len(system) + 2]  # the oldest exchange no longer fits the context
            prompt = tokenizer.chat_prompt(history)
        print("assistant> ", end="", flush=True)
        reply = generate(
            model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=0.9 if args.temperature > 0 else None, stream=lambda piece: print(piece, end="", flush=True),
        )
        print()
        history.append({"role": "assistant", "content": reply})


def build_parser() -> Parser:
    parser = Parser(prog="finegrain", description="Adapt LLaMA-family models to fine-grained NLP tasks on a CPU.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    parser.commands = sub.choices  # each command's own parser, for its errors (main)

    p = sub.add_parser("generate", help="continue a prompt with a model")
    p.add_argument("--model", default=None, help="smollm2-135m (default), a .gguf file or a Hugging Face directory")
    p.add_argument("--prompt", required=True, help="the prompt text, or - to read it from standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="a string that ends generation (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--int8", action="store_true", help="int8 weights for faster decoding (approximate)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model: architecture, size, quantization, tokenizer")
    p.add_argument("--model", default=None, help="smollm2-135m (default), minilm-l6, a .gguf file or a Hugging Face directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a GGUF file or Hugging Face directory as a Hugging Face directory")
    p.add_argument("source", help="a .gguf file, a Hugging Face directory or smollm2-135m")
    p.add_argument("output", help="the directory to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="fine-tune a model with LoRA or another peft.method (config file and/or options)")
    p.add_argument("config", nargs="?", help="a YAML run config, e.g. examples/rotten_tomatoes.yaml; one with "
                   "tasks: trains several tasks on one backbone (examples/multitask.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (from the beginning, with its config.yaml, "
                        "when it never reached one); rebuilds a damaged adapter")
    p.add_argument("--model", help="base model (sets model.name)")
    p.add_argument("--data", help="training file, JSONL/CSV/TSV (sets data.train)")
    p.add_argument("--dataset", help="a bundled demo dataset (sets data.dataset)")
    p.add_argument("--output", help="the run directory (sets output)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--skip-bad-rows", action="store_true", help=SKIP_HELP)
    p.add_argument("--device", help=DEVICE_HELP + " (sets train.device)")
    p.add_argument("--nproc", type=int, metavar="N", help=NPROC_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("probe", help="propose model.num_layers and lora.layers from a linear probe of every layer")
    p.add_argument("config", nargs="?", help="a YAML run config of a classification task")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. data.train=my.jsonl")
    p.add_argument("--examples", type=int, default=400, help="training and validation examples each (default 400)")
    p.add_argument("--output", help="also write the table and proposal as JSON here")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sweep", help="train a config over seeds, k-shot sizes or folds; mean ± std of every score")
    p.add_argument("config", nargs="?", help="a YAML run config, e.g. examples/rotten_tomatoes.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=2")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for training and the data draw (default 3)")
    p.add_argument("--shots", metavar="K,K,...", help="training examples per class, e.g. 8,16,32,64")
    p.add_argument("--folds", type=int, help="K-fold cross-validation of the training data")
    p.add_argument("--prompted", metavar="K,K,...",
                   help="also score the base model prompted with K examples per class (0: zero-shot), e.g. 0,4")
    p.add_argument("--output", required=True, help="the sweep directory (rerun with the same arguments to continue)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tune", help="search hyperparameters with Optuna (TPE), pruning poor trials on validation")
    p.add_argument("config", nargs="?", help="a YAML run config, e.g. examples/rotten_tomatoes.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every trial")
    p.add_argument("--space", action="append", metavar="KEY=RANGE",
                   help="a key to search: log(LOW,HIGH), float(LOW,HIGH), int(LOW,HIGH) or A|B|C, "
                        "e.g. train.lr=log(1e-5,1e-2) or lora.r=4|8|16 (repeat for more keys)")
    p.add_argument("--trials", type=int, default=20, help="trials in all, those of an earlier run included (default 20)")
    p.add_argument("--metric", help="the validation score to optimise (default: train.metric or the task's headline)")
    p.add_argument("--storage", help="an Optuna storage URL shared by workers (default: OUTPUT/study.db)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--output", required=True, help="the search directory (rerun with the same arguments to continue)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("compare", help="train a config per model and method (and seed): one table and plot with the baselines")
    p.add_argument("config", nargs="?", help="a YAML run config, e.g. examples/rotten_tomatoes.yaml")
    p.add_argument("--models", required=True, metavar="A,B,...", help="models to compare, e.g. smollm2-135m,minilm-l6")
    p.add_argument("--methods", default="lora", metavar="A,B,...", help="peft.method of each run, e.g. lora,full (default lora); MODEL:METHOD for one model, "
                        "e.g. smollm2-135m:lora,minilm-l6:full")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per model and method (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every run")
    p.add_argument("--output", required=True, help="the comparison directory (rerun with the same arguments to continue)")
    p.add_argument("--no-prompted", action="store_true",
                   help="leave out the zero-shot prompted decoder baseline (minutes of a decoder's forward passes on CPU)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a labelled file or its own test split")
    p.add_argument("run_dir", help="a finished run directory (an ensemble's too)")
    p.add_argument("--data", help="a labelled JSONL/CSV/TSV file (default: the run's own test split, the one "
                                  "its metrics.json was scored on)")
    p.add_argument("--skip-bad-rows", action="store_true", help=SKIP_HELP)
    p.add_argument("--output", help="also write the metrics as JSON here")
    p.add_argument("--device", help=DEVICE_HELP + " (default: the run's train.device)")
    p.add_argument("--robustness", action="store_true",
                   help="also score copies of the file with character typos, word deletion and adjacent-word swaps")
    p.add_argument("--paraphrase", action="store_true",
                   help="with --robustness: also score the file's texts as the run's augment.paraphraser rewrites them "
                        "(an instruct model, the default one unless the run names another; minutes on a CPU)")
    p.add_argument("--paraphrase-prompt", metavar="PROMPT",
                   help="what the paraphraser is asked, {text} standing for the text (default: the run's "
                        "augment.paraphrase_prompt); the same prompt gives runs the same copies to compare on")
    p.add_argument("--nproc", type=int, metavar="N", help=NPROC_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label texts with a trained run (JSONL out)")
    p.add_argument("run_dir", help="a finished run directory (an ensemble's too)")
    p.add_argument("--input", required=True, help="a JSONL/CSV/TSV file with a text field, or - for one text per line on stdin")
    p.add_argument("--skip-bad-rows", action="store_true", help=SKIP_HELP)
    p.add_argument("--output", help="write the JSONL here instead of standard output")
    p.add_argument("--device", help=DEVICE_HELP + " (default: the run's train.device)")
    p.add_argument("--nproc", type=int, metavar="N", help=NPROC_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("chat", help="talk with a task: instruct run (or a base model) in the terminal")
    p.add_argument("run_dir", nargs="?", help="a task: instruct run directory (its adapter is applied)")
    p.add_argument("--model", help="chat with this base model instead: smollm2-135m, a .gguf file or a Hugging Face directory")
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 answers greedily; above 0 samples (top-p 0.9)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write a finished run as a merged Hugging Face model, a GGUF file or its adapter",
                       description="hf: the adapter folded into the weights, the head as LlamaForSequenceClassification, "
                                   "LlamaForTokenClassification or LlamaForQuestionAnswering (instruct: LlamaForCausalLM), or on an encoder "
                                   "(minilm-l6) BertForSequenceClassification, BertForTokenClassification or "
                                   "BertForQuestionAnswering; gguf: "
                                   "an instruct run's merged model for llama.cpp/Ollama; peft: the adapter alone. Methods that "
                                   "cannot merge (prompt, prefix, adapter) export with --format peft only. A calibrated "
                                   "run's temperature is divided into the hf head.")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", required=True, choices=("hf", "peft", "gguf"), help="hf, peft or gguf")
    p.add_argument("--dtype", help="hf: f32 (default) or f16; gguf: f16 (default), q8_0 or q4_0")
    p.add_argument("--output", required=True, help="a new directory (gguf: also a FILE.gguf)")
    p.add_argument("--model-alone", action="store_true",
                   help="a run that mixes a TF-IDF model (head.tfidf_mix) or a word-feature model (head.word_mix) into "
                        "its predictions: export its model without the mix (no transformers or PEFT model holds it; "
                        "export refuses such a run otherwise)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("interpolate", help="score the weights between the base (alpha 0) and the tuned run (alpha 1)",
                       description="theta(alpha) = theta_base + alpha (theta_tuned - theta_base) on the run's validation and "
                                   "test splits, the head always the tuned one; writes interpolation.json and interpolation.png "
                                   "into the run directory.")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                   help="comma-separated alphas (default 0,0.25,0.5,0.75,1), or start,second,...,end such as 0,0.1,...,1")
    p.add_argument("--save", metavar="DIR", help="also write the run at the best alpha (on validation) as a new run directory")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("calibrate", help="fit a temperature to a classification run's probabilities on its validation split",
                       description="Temperature scaling: the logits divided by T, fitted by minimising the validation NLL; "
                                   "labels are unchanged. Stores RUN/temperature.json, which predict, evaluate and serve apply, "
                                   "and prints the expected calibration error (15 bins) before and after.")
    p.add_argument("run_dir", help="a finished classification run directory")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ensemble", help="average the probabilities of classification runs with the same labels",
                       description="Writes OUTPUT/ensemble.json naming the runs, the ensemble's and each run's test metrics "
                                   "(metrics.json) and a report; `finegrain evaluate/predict OUTPUT` and finegrain.load(OUTPUT) "
                                   "use it like one run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished classification run directories (at least two)")
    p.add_argument("--output", required=True, help="the ensemble directory (new, or an ensemble to replace)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("prune", help="make a finished run smaller: drop layers, attention heads and FFN channels by importance, then recover",
                       description="Structured pruning of a classification run (its adapter merged first). Layers: each skipped "
                                   "alone, scored by how far the validation predictions move (KL); attention heads (whole KV "
                                   "groups) and FFN channels: gradient x activation on validation batches, the same count kept in "
                                   "every layer (transformers' LlamaConfig has one head count and one FFN width). Then a short full "
                                   "fine-tune recovers it. OUTPUT is an ordinary run (peft.method full) that evaluate, predict, "
                                   "export and finegrain.load take; OUTPUT/pruned and OUTPUT/model load in transformers.")
    p.add_argument("run_dir", help="a finished classification run directory")
    p.add_argument("--layers", help="decoder layers to keep: N, or auto (drop the least important while validation, before "
                                    "recovery, stays within 0.02 of the unpruned run); default: keep all")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads (KV groups) to remove, in [0, 1)")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN channels to remove, in [0, 1)")
    p.add_argument("--recover-epochs", type=float, default=1.0, help="epochs of recovery fine-tuning (default 1; 0: none)")
    p.add_argument("--distill", action="store_true", help="recover from the unpruned run's soft outputs (distill.teacher)")
    p.add_argument("--examples", type=int, default=256, help="validation examples that score importance (default 256)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of the recovery run's config, e.g. train.lr=1e-4 (default 5e-5, every weight trains)")
    p.add_argument("--output", required=True, help="a new directory: the pruned run")
    p.set_defaults(func=cmd_prune)


    from finegrain.serve.cli import add_serve_parser

    add_serve_parser(sub)

    from finegrain.ui.cli import add_ui_parser

    add_ui_parser(sub)
    return parser


def leave_job() -> None:
    """Under torchrun, once this rank's command has succeeded: leave the job with the other ranks,
    then end the process at once with status 0 (after a failure each rank leaves at its exit:
    `init_from_env`).

    Not through the interpreter's teardown: after a job it sometimes aborted in a C++ destructor
    ("terminate called without an active exception", exit -6; in 2 of 23 runs of the two-process
    FSDP test), so torchrun reported a job that had written everything as failed. The command's
    files are closed and renamed into place by now; what is left to do is flush the output.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # distributed.launched(), without importing torch for one process
        from finegrain.train.distributed import shutdown

        shutdown(together=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def os_error_line(e: OSError) -> str:
    """An operating-system refusal the user can mend (a path that cannot be made, no permission,
    a full disk), said as one line rather than as an internal error."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; check the path, its permissions and the disk's free space"


def say(line: str) -> None:
    """One line to stderr in one write: `print` writes the text and its newline apart, and the
    ranks of a torchrun job share one stderr, so their lines would run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def report_crashes() -> None:
    """Where a native crash (a segfault in a C extension, an abort in a C++ destructor) ends the
    process, print each thread's Python stack on stderr first: a torchrun rank killed by a signal
    otherwise leaves nothing but its exit code (-11) to go on."""
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, RuntimeError, ValueError, io.UnsupportedOperation):  # stderr without a file descriptor
            pass


def main(argv: list[str] | None = None) -> int:
    from finegrain.cpu import configure_openmp

    configure_openmp()  # first, before anything imports torch: libgomp reads it once, when it loads
    report_crashes()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name `finegrain --help`: the command's own help lists its flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: what --nproc hands to torchrun
    try:
        args.func(args)
        leave_job()
    except FinegrainError as e:
        if args.debug:
            raise
        say(f"finegrain {args.command}: error: {e}")
        return 1
    except KeyboardInterrupt as e:  # `Interrupted` says how the work goes on
        say(f"finegrain {args.command}: interrupted" + (f"; {e}" if str(e) else ""))
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and (e.filename or e.errno in DISK_ERRNOS):
            say(f"finegrain {args.command}: error: {os_error_line(e)}")
        else:
            say(f"finegrain {args.command}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
