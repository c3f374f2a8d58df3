"""The recipe from the data (finegrain.train.recipe) and the trainer's metric direction, on the tiny model."""

import json
import math
import random

import pytest
import yaml

from finegrain.cli import main
from finegrain.config import explicit_keys, load_config
from finegrain.train.recipe import Recipe, percentile
from finegrain.train.trainer import validation_line

WORDS = {"sport": ["goal", "match", "team", "score"], "money": ["bank", "rate", "loan", "price"],
         "rare": ["volcano", "lava", "ash", "crater"]}


def write_topics(path, counts: dict[str, int], seed: int = 0, words: int = 6):
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS[label]) for _ in range(words + rng.randrange(words))), "label": label}
            for label, n in counts.items() for _ in range(n)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_explicit_keys_are_the_dotted_keys_a_config_sets():
    values = {"data": {"train": "x", "dataset_options": {"fine": True}}, "head": {"class_weights": {"a": 2}}, "task": "ner"}
    assert explicit_keys(values) == {"data.train", "data.dataset_options", "head.class_weights", "task"}


def test_recipe_fills_only_unset_keys_from_the_data(tiny_model_dir, tmp_path):
    data = write_topics(tmp_path / "train.jsonl", {"sport": 120, "money": 60, "rare": 20})
    config = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "train.lr=0.02"])
    from finegrain.checkpoint.load import load_model
    from finegrain.tasks import task_class

    splits = task_class("classification").load_splits(config.data)
    llama, tokenizer = load_model(config.model.name, progress=False)
    choices = {c.key: c for c in Recipe(config, config.explicit).plan(splits, tokenizer, llama, progress=False)}
    assert "train.lr" not in choices and config.train.lr == 0.02  # given: left alone
    # Imbalanced (120/60/20 before the split): square-root inverse-frequency weights, rarest heaviest.
    counts = {label: sum(e.label == label for e in splits.train) for label in WORDS}
    weights = config.head.class_weights
    for label, n in counts.items():
        assert math.isclose(weights[label], math.sqrt(len(splits.train) / (3 * n)), abs_tol=1e-4)
    # 20 validation texts: too few to choose a checkpoint by; every epoch, the last three averaged
    assert config.train.metric == "macro_f1" and config.train.patience is None and config.train.average_last == 3
    assert config.head.init == "probe", choices["head.init"].reason  # the rarest class has 10 or more training examples
    lengths = [len(ids) for ids in tokenizer.encode_batch([e.text for e in splits.train])]
    assert config.data.max_length == max(32, 16 * math.ceil(percentile(lengths, 0.95) / 16))
    # 160 examples: 2,000 seen needs 13 epochs, capped at 10.
    assert config.train.epochs == 10
    assert config.model.num_layers in (1, 2) and config.head.pooling in ("last", "mean")
    assert config.lora.layers == list(range(-config.model.num_layers, 0))
    assert all(c.reason for c in choices.values())


def evaluation_plan(tiny_model_dir, validation: int, epochs: int = 10, *options: str):
    """The config after `Recipe._evaluation` for 90 training examples and `validation` validation ones."""
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", *options])
    config.train.epochs = epochs
    recipe = Recipe(config, config.explicit)
    recipe._evaluation(90, validation)
    return config, {c.key: c for c in recipe.choices}


def test_a_small_validation_split_averages_the_last_epochs_instead_of_choosing_one(tiny_model_dir):
    config, choices = evaluation_plan(tiny_model_dir, 10)
    assert (config.train.patience, config.train.average_last) == (None, 3)
    assert "10 validation examples are too few to choose a checkpoint by" in choices["train.average_last"].reason
    config, _ = evaluation_plan(tiny_model_dir, 100)  # enough to choose by: the best checkpoint, early stopping
    assert (config.train.patience, config.train.average_last) == (2, None)
    config, _ = evaluation_plan(tiny_model_dir, 10, 2)  # two evaluations: too few to average three
    assert (config.train.patience, config.train.average_last) == (2, None)
    config, _ = evaluation_plan(tiny_model_dir, 10, 10, "train.patience=4")  # given: kept
    assert (config.train.patience, config.train.average_last) == (4, 3)
    config, choices = evaluation_plan(tiny_model_dir, 10, 10, "train.average_last=5")
    assert (config.train.patience, config.train.average_last) == (2, 5) and "train.average_last" not in choices


class HeldOut:  # 100 validation and 100 test examples, as the budget counts them
    validation, test = [None] * 100, [None] * 100


def planned_budget(tiny_model_dir, examples: int, rarest: int, epochs: int, seconds: float, *options: str,
                   scores=(0.5,) * 8 + (0.85,) * 4 + (0.88,) * 8 + (0.90,) * 11, cut: int = 20):
    """The config after `Recipe._budget` for `examples` texts of 400 tokens (512 allowed), `cut` kept of
    30 layers, `epochs` epochs and `seconds` per layer-token, and the recipe. By default the probe peaks
    at layer 20 (0.90), with layer 12 within 0.03 of it and layer 8 further."""
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", *options])
    recipe = Recipe(config, config.explicit)
    recipe.lengths, recipe.scores = [400] * examples, list(scores)
    config.train.epochs, config.data.max_length = epochs, 512
    if "model.num_layers" not in config.explicit:
        config.model.num_layers = cut
    recipe._budget(examples, rarest, {"seconds_per_layer_token": seconds}, 30, HeldOut)
    return config, recipe


def test_recipe_shrinks_the_run_to_the_time_budget(tiny_model_dir):
    # 40 us per layer-token: 1,000 x 400 tokens x (20 layers, 4 epochs ...) is far beyond one minute.
    config, recipe = planned_budget(tiny_model_dir, 1000, 100, 4, 4e-5, "train.time_budget=1")
    assert config.lora.layers == [-2, -1]  # the fewest adapted layers tried
    assert config.train.epochs == 1  # then fewer epochs
    assert config.model.num_layers == 12  # then the lowest layer within 0.03 of the best
    assert config.data.max_length == 128  # then shorter texts, down to 128 (1,000 examples: no sample)
    keys = [c.key for c in recipe.choices]
    assert keys == ["train.epochs", "model.num_layers", "data.max_length", "lora.layers"]  # one entry per key
    assert "min of layer passes" in recipe.choices[-1].reason
    assert recipe.choices[2].reason.count("shorter texts") == 1  # halved twice, said once


def test_the_cut_comes_down_the_plateau_with_the_adapted_layers(tiny_model_dir):
    """The probe peaks at layer 7 and stays within 0.01 of it up to 13 (the cut for 6 adapted layers).
    Under the budget the cut follows fewer adapted layers down (at most that many above the best), so
    the epochs are kept; a cut the config fixes stays, and an epoch goes instead."""
    plateau = (0.5,) * 3 + (0.9,) * 4 + (0.98,) + (0.975,) * 6 + (0.9,) * 17
    # 6e-6 s x 400 tokens x (1,000 x (7 frozen + (3 x 2 + 1) x 2 adapted) + 200 held out x 9 layers) = 55 s
    config, recipe = planned_budget(tiny_model_dir, 1000, 100, 2, 6e-6, "train.time_budget=1", scores=plateau, cut=13)
    assert (config.model.num_layers, config.lora.layers, config.train.epochs) == (9, [-2, -1], 2)
    assert "at most 2 above the probe's best" in next(c.reason for c in recipe.choices if c.key == "model.num_layers")
    config, _ = planned_budget(tiny_model_dir, 1000, 100, 2, 6e-6, "train.time_budget=1", "model.num_layers=13",
                               scores=plateau)
    assert (config.model.num_layers, config.lora.layers, config.train.epochs) == (13, [-2, -1], 1)


def test_a_large_training_set_is_sampled_for_fine_tuning_before_texts_are_cut(tiny_model_dir):
    """10,000 long texts: after fewer adapted layers, one epoch and the lower cut, the recipe fine-tunes
    on the largest stratified sample that fits the budget, keeping the texts' length."""
    config, recipe = planned_budget(tiny_model_dir, 10_000, 1_000, 4, 3e-5)  # the 15-min budget
    assert config.lora.layers == [-2, -1] and config.train.epochs == 1 and config.model.num_layers == 12
    # 3e-5 s x (200 held out x 400 tokens x 12 layers + n x 400 x (10 frozen + (3 + 1) x 2 adapted)) <= 900 s
    fixed, per_example = 3e-5 * 200 * 400 * 12, 3e-5 * 400 * 18
    assert config.train.fine_tune_examples == int((900 - fixed) / per_example) == 4033
    assert config.data.max_length == 512  # kept
    assert [c.key for c in recipe.choices] == ["train.epochs", "model.num_layers", "train.fine_tune_examples", "lora.layers"]
    # A sample keeps 40 of the rarest class: with 100 of 10,000 in it, no sample under 4,000 (then shorter texts).
    config, _ = planned_budget(tiny_model_dir, 10_000, 100, 1, 3e-5, "train.time_budget=5")
    assert config.train.fine_tune_examples == 4_000 and config.data.max_length < 512


def test_fine_tune_examples_samples_training_alone(tiny_model_dir, tmp_path):
    """train.fine_tune_examples: the model trains on a stratified sample; the TF-IDF baseline and mix
    learn from every training example; the option is refused for other tasks."""
    data = write_topics(tmp_path / "train.jsonl", {"sport": 60, "money": 40, "rare": 20})
    test = write_topics(tmp_path / "test.jsonl", {"sport": 10, "money": 10, "rare": 10}, seed=1)
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir),
                 "--set", f"data.test={test}", "--set", "data.split=[0.9,0.1,0.0]", "--set", "train.epochs=1",
                 "--set", "train.threads=1", "--set", "train.fine_tune_examples=30", "--set", "head.tfidf_mix=0"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["examples"] == metrics["train"]["rows"] == 30
    assert metrics["train"]["sampled_from"] == 108  # 90% of 120
    assert metrics["train"]["steps"] == 2  # 30 examples in batches of 16
    assert metrics["baselines"]["train_examples"] == 108
    from finegrain.errors import FinegrainError
    with pytest.raises(FinegrainError, match="train.fine_tune_examples"):
        load_config(None, ["data.dataset=wnut16", "task=ner", "train.fine_tune_examples=10"])


def test_cli_train_without_a_config_prints_and_saves_the_recipe(tiny_model_dir, tmp_path, capsys):
    data = write_topics(tmp_path / "train.jsonl", {"sport": 60, "money": 30, "rare": 14})
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir),
                 "--set", "train.epochs=1", "--set", "train.threads=1"]) == 0
    out = capsys.readouterr().out
    assert "recipe chosen from the data" in out and "data.max_length" in out
    assert "differ only in case" not in out
    saved = (run_dir / "config.yaml").read_text()
    assert saved.startswith("# finegrain train chose these keys from the data")
    config = yaml.safe_load(saved)
    assert config["train"]["epochs"] == 1  # the override stays
    assert config["train"]["metric"] == "macro_f1" and isinstance(config["head"]["class_weights"], dict)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"]["train.metric"]["value"] == "macro_f1"
    assert "train.epochs" not in metrics["recipe"]
    # The recipe is off on request: the defaults of before.
    off = tmp_path / "off"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(off),
                 "--set", "train.recipe=off", "--set", "train.epochs=1"]) == 0
    assert "recipe" not in json.loads((off / "metrics.json").read_text())
    assert yaml.safe_load((off / "config.yaml").read_text())["data"]["max_length"] == 64


def test_the_recipe_trains_data_without_a_validation_split(tiny_model_dir, tmp_path, capsys):
    """The layer probe needs validation examples: without them it is left out (it was "data: the
    probe scores layers on validation examples"), unless the config asks for it by an auto key."""
    data = write_topics(tmp_path / "train.jsonl", {"sport": 20, "money": 20})
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--set", "data.split=[1, 0, 0]",
            "--set", "train.epochs=1"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["examples"] == 40 and "model.num_layers" not in metrics["recipe"]
    capsys.readouterr()
    assert main([*args, "--set", "model.num_layers=auto", "--output", str(tmp_path / "auto")]) == 1
    assert "model.num_layers: auto asks the layer probe" in capsys.readouterr().err
    assert not (tmp_path / "auto").exists()


def test_lower_is_better_metrics_select_their_lowest_value(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(["good", "bad", "fine", "dull"]) for _ in range(4)), "label": rng.uniform(-2, 2)}
            for _ in range(80)]
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "task": "regression", "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 16},
        "lora": {"layers": [-1]},
        "train": {"epochs": 4, "lr": 0.05, "batch_size": 8, "eval_every": 2, "metric": "rmse", "threads": 1},
    }))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r.get("split") == "validation"]
    best = min(validations, key=lambda r: (r["rmse"], r["step"]))
    assert len({r["rmse"] for r in validations}) > 1  # a real choice was made
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["best_step"] == best["step"]


def test_validation_line_shows_the_lowest_recalls_first():
    metrics = {"per_class": {"a": {"recall": 0.9}, "b": {"recall": 0.0}, "c": {"recall": 0.5}}}
    line = validation_line(10, "macro_f1", 0.4567, metrics)
    assert line.startswith("validation at step 10: macro_f1 0.4567")
    assert line.index("b 0.00") < line.index("c 0.50") < line.index("a 0.90")


def test_fit_softmax_equals_scikit_learns_logistic_regression():
    import torch
    from sklearn.linear_model import LogisticRegression

    from finegrain.train.linear_probe import fit_softmax

    torch.manual_seed(0)
    x = torch.randn(300, 6, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()  # three classes, one rare
    weights = torch.tensor([1.0, 1.5, 3.0])
    l2 = 1e-2
    w = fit_softmax(x, y, 3, weights, l2=l2, steps=500)
    # scikit-learn: 0.5 |w|^2 + C * sum of weighted losses; ours: weighted mean loss + l2 / 2 |w|^2,
    # where the weighted mean divides by the sum of the sample weights.
    sample_weight = weights[y].numpy()
    reference = LogisticRegression(C=1 / (l2 * sample_weight.sum()), fit_intercept=False, tol=1e-10, max_iter=10_000)
    reference.fit(x.numpy(), y.numpy(), sample_weight=sample_weight)
    torch.testing.assert_close(w, torch.from_numpy(reference.coef_), atol=1e-4, rtol=1e-4)


def test_head_init_probe_starts_training_from_the_fitted_head(tiny_model_dir, tmp_path):
    data = write_topics(tmp_path / "train.jsonl", {"sport": 40, "money": 40, "rare": 16})
    runs = {}
    for init in ("random", "probe"):
        run_dir = tmp_path / init
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir),
                     "--set", "train.recipe=off", "--set", f"head.init={init}", "--set", "train.epochs=1",
                     "--set", "lora.layers=[-1]", "--set", "train.threads=1"]) == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if init == "probe":  # the fitted head alone is validated before the first step: a candidate for the best
            assert records[0]["step"] == 0 and records[0]["split"] == "validation"
            records = records[1:]
        runs[init] = records[0]["train_loss"]
    assert runs["probe"] < runs["random"]  # the first step's loss: the fitted head already separates the topics


def test_fit_head_chooses_its_l2_on_validation():
    import torch
    from torch import nn

    from finegrain.train.linear_probe import L2, fit_head, fit_softmax

    torch.manual_seed(0)
    x, y = torch.randn(24, 40), torch.randint(0, 3, (24,))  # labels at random: a close fit is all noise
    model = nn.Module()
    model.head = nn.Linear(40, 3, bias=False)
    assert fit_head(model, "head", x, y) == L2  # no validation: the default strength
    l2 = fit_head(model, "head", x, y, validation=(torch.randn(200, 40), torch.randint(0, 3, (200,))))
    assert l2 == 1.0  # the strongest: on noise, the flattest head predicts unseen examples best
    torch.testing.assert_close(model.head.weight, fit_softmax(x, y, 3, l2=1.0).float())


def test_the_head_starts_at_random_where_the_rarest_class_is_too_small(tiny_model_dir):
    from collections import Counter

    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl"])
    recipe = Recipe(config, config.explicit)
    recipe._head_init(Counter({"a": 40, "b": 3}))
    assert config.head.init == "random" and "3 training example" in recipe.choices[0].reason


def test_head_init_probe_is_for_single_label_classification_only(tiny_model_dir):
    from finegrain.errors import FinegrainError

    for override in ("task=regression", "data.multi_label=true"):
        with pytest.raises(FinegrainError, match="head.init"):
            load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "head.init=probe", override])


@pytest.mark.parametrize("mean_gain, pooling, said", [
    (0.2, "mean", "the probe's mean-pooled states scored 0.900 macro-F1 at layer 2, last-token 0.700"),
    (0.01, "last", "(0.710 macro-F1) beat the last token's (0.700) by less than 0.03: keep the last token"),
    (-0.1, "last", "(0.600 macro-F1) scored no more than the last token's (0.700): keep the last token"),
])
def test_mean_pooling_only_where_the_probe_prefers_it_clearly(tiny_model_dir, monkeypatch, mean_gain, pooling, said):
    last = [0.3, 0.6, 0.7, 0.7, 0.5]
    mean = [min(1.0, f + mean_gain) for f in last]
    result = {"macro_f1": last, "mean_macro_f1": mean, "best_layer": 2, "best_pooling": "mean", "train_examples": 9,
              "validation_examples": 9, "seconds_per_layer_token": 1e-6}
    monkeypatch.setattr("finegrain.train.recipe.probe_layers", lambda *args: result)
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl"])
    recipe = Recipe(config, config.explicit)
    recipe.lengths = [10] * 10

    class Llama:
        model = type("Backbone", (), {"layers": [None] * 4})()

    recipe._probe(None, None, Llama, progress=False)
    assert config.head.pooling == pooling
    assert said in next(c.reason for c in recipe.choices if c.key == "head.pooling")
    assert config.model.num_layers == 3  # the highest of the layers within 0.01 of the best (2 and 3)
