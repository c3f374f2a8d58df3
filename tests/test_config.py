"""Run configs: YAML, overrides, unknown keys with the nearest valid key."""

import re

import pytest

from finegrain.cli import main
from finegrain.config import load_config, to_dict
from finegrain.errors import FinegrainError
from finegrain.rundir import read_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\ntrain:\n  lr: 0.001\n  epochs: 2\n")
    config = load_config(path, ["train.lr=5e-4", "lora.targets=all-linear", "lora.layers=[-2, -1]"])
    assert config.train.lr == 5e-4 and config.train.epochs == 2.0
    assert config.lora.targets == "all-linear" and config.lora.layers == [-2, -1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian:\n  lr: 1\n", "unknown key 'trian'; did you mean 'train'"),
        ("train:\n  learning_rate: 1\n", "unknown key 'train.learning_rate'"),
        ("train:\n  lrr: 1\n", "did you mean 'train.lr'"),
        ("train:\n  epochs: two\n", "'train.epochs' must be float"),
        ("data: [1, 2\n", r"c.yaml:\d+: not valid YAML"),
        ("train:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n", r"c.yaml:4: 'train.lr' is set twice \(also at .*c.yaml:2\); keep one"),
        ("task: classification\ntask: ner\n", r"c.yaml:2: 'task' is set twice"),
        ("- task: classification\n", "a run config is a mapping of sections .*not a list"),
        ("train:\n  schedule: sawtooth\ndata:\n  dataset: trec\n", "'train.schedule' must be linear, cosine or constant"),
        ("train:\n  lr: 0.1\n", "no training data"),
        ("train:\n  micro_batch_tokens: big\ndata:\n  dataset: trec\n", "'train.micro_batch_tokens' must be auto"),
        ("train:\n  micro_batch_tokens: 0\ndata:\n  dataset: trec\n", "'train.micro_batch_tokens' must be auto"),
        ("data:\n  dataset: trec\n  max_train_examples: -5\n", "'data.max_train_examples' must be at least 1"),
        ("data:\n  dataset: trec\n  max_eval_examples: 0\n", "'data.max_eval_examples' must be at least 1"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FinegrainError, match=message):
        load_config(path)


def test_a_runs_hand_edited_config_gets_the_same_errors(tmp_path):
    (tmp_path / "config.yaml").write_text("task: classification\n\tdata: x\n")
    with pytest.raises(FinegrainError, match=r"config.yaml:2: not valid YAML"):
        read_config(tmp_path)
    (tmp_path / "config.yaml").write_text("data:\n  dataset: trec\n  dataset: sst2\n")
    with pytest.raises(FinegrainError, match=r"config.yaml:3: 'data.dataset' is set twice"):
        read_config(tmp_path)
    (tmp_path / "config.yaml").write_text("data:\n  dataset: trec\ntrain:\n  lr: fast\n")
    with pytest.raises(FinegrainError, match=r"config.yaml:4: 'train.lr' must be float"):
        read_config(tmp_path)


def test_bad_override():
    with pytest.raises(FinegrainError, match="expected key=value"):
        load_config(None, ["train.lr"])


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("trian: {}\n")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'train'" in err


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("examples/*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.split=[a,b,c]", r"--set data.split=\[a,b,c\]: 'data.split\[0\]' must be float, not 'a'"),
        ("lora.layers=[x]", r"--set lora.layers=\[x\]: 'lora.layers\[0\]' must be int, not 'x'"),
        ("train.epochs=.inf", r"--set train.epochs=.inf: 'train.epochs' must be a finite number"),
        ("train.lr=.nan", r"--set train.lr=.nan: 'train.lr' must be a finite number"),
        ("head.class_weights={ham: abc}", r"'head.class_weights.ham' must be float, not 'abc'"),
        ("lora.targets=[q_proj, 3]", r"'lora.targets\[1\]' must be str"),
    ],
)
def test_wrongly_typed_items_name_the_key(override, message):
    with pytest.raises(FinegrainError, match=message):
        load_config(None, ["data.dataset=sms_spam", override])


def test_label_names_are_for_classification_alone():
    with pytest.raises(FinegrainError, match=re.escape("'data.label_names' must be null for this task: it names the label "
                                                       "ids of classification and relation files (task: ner has data.tag_names)")):
        load_config(None, ["data.dataset=vader", "task=regression", "data.label_names=[neg,pos]"])


@pytest.mark.parametrize(
    "override, expected",
    [("train.eval_batch_size=0", "at least 1"), ("train.head_lr=-1", "above 0, or null"),
     ("train.warmup_ratio=2", "in [0, 1]"), ("train.warmup_ratio=-0.1", "in [0, 1]"),
     ("train.weight_decay=-1", "at least 0"), ("train.max_grad_norm=0", "above 0, or null"),
     ("train.patience=0", "at least 1 validation"), ("train.eval_every=-3", "at least 0"),
     ("train.checkpoint_every=0", "at least 1"), ("train.seed=-1", "in [0, 2**32 - 1]"),
     ("train.threads=0", "at least 1, or null"), ("train.prefix_cache_ram_mb=-5", "at least 0"),
     ("head.threshold=2", "a probability in (0, 1)"),
     ("data.text_field=label", "a column other than data.label_field ('label'): the model would read the label"),
     ("data.labels=[ham,spam,ham]", "a list of labels, each once"), ("data.labels=[]", "a list of labels, each once"),
     ("data.tag_names=[O,B-PER,O]", "a list of tags, each once, in id order"), ("data.tag_names=[]", "a list of tags"),
     ("data.label_names=[neg,neg]", "a list of names, each once, in id order")],
)
def test_numbers_out_of_range_are_refused_with_the_config(override, expected):
    """Each was accepted: a ZeroDivisionError at the first step (checkpoint_every 0), an optimizer's
    or numpy's ValueError (weight_decay, seed), or a run that went on as if it made sense (the label
    column read as the text: every label learnt from itself; a label listed twice: a head output no
    example trains)."""
    key = override.split("=")[0]
    with pytest.raises(FinegrainError, match=re.escape(f"--set {override}: '{key}' must be ") + ".*" + re.escape(expected)):
        load_config(None, ["data.dataset=sms_spam", override])


@pytest.mark.parametrize("override, expected", [
    ("data.template=Review: {text} Verdict:", "the value is not valid YAML (expected <block end>, but found '<scalar>'); "
                                              "a text holding ': ', '{' or '[' goes in quotes: --set 'data.template=\"...\"'"),
    ("data.template=Review: {text}", "'data.template' must be str or null, not {'Review': {'text': None}}; a text holding "
                                     "': ', '{' or '[' goes in quotes, e.g. \"Review: {text}\""),
])
def test_a_text_read_as_yaml_structure_says_to_quote_it(override, expected):
    with pytest.raises(FinegrainError, match=re.escape(f"--set {override}: {expected}")):
        load_config(None, ["data.dataset=sms_spam", override])
    quoted = override.replace("=", '="', 1) + '"'
    assert load_config(None, ["data.dataset=sms_spam", quoted]).data.template == override.split("=", 1)[1]


def test_item_types_accept_good_values():
    config = load_config(None, ["data.dataset=sms_spam", "data.split=[0.5, 0.25, 0.25]", "head.class_weights={ham: 1, spam: 2.5}"])
    assert config.data.split == [0.5, 0.25, 0.25] and config.head.class_weights == {"ham": 1.0, "spam": 2.5}


def test_yaml_errors_name_the_line_not_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\nhead:\n  class_weights: {ham: abc}\ntrain:\n  lrr: 1\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:4: 'head.class_weights.ham' must be float") as info:
        load_config(path)
    assert "--set" not in str(info.value)
    path.write_text("data:\n  dataset: sms_spam\ntrain:\n  epochs: 1\n  lrr: 1\n")
    for overrides in ([], ["train.lr=0.1"]):  # a --set of another key does not move the blame
        with pytest.raises(FinegrainError, match=r"c.yaml:5: unknown key 'train.lrr'") as info:
            load_config(path, overrides)
        assert "--set" not in str(info.value)
    with pytest.raises(FinegrainError, match=r"--set train.lrr=1: unknown key 'train.lrr'"):
        load_config(None, ["data.dataset=sms_spam", "train.lrr=1"])
    path.write_text("data:\n  dataset: sms_spam\n  split: [0.5, 0.6, 0.1]\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:3: 'data.split' must be three fractions"):
        load_config(path)


def test_model_dtype_reaches_the_loaded_model(tiny_model_dir):
    import torch

    from finegrain.run import build

    for dtype in ("float32", "bfloat16"):
        config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", f"model.dtype={dtype}"])
        model, _, task, _ = build(config, ["a", "b"], progress=False)
        assert model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
        head = model.get_submodule(task.head_modules[0])  # stays float32 and takes the backbone's states
        assert head(torch.ones(1, 64, dtype=getattr(torch, dtype))).dtype == torch.float32


def test_peft_method_defaults_to_lora_and_an_old_lora_section_still_reads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\nlora:\n  r: 4\n  targets: all-linear\n")
    config = load_config(path)
    assert config.peft.method == "lora" and config.lora.r == 4 and config.lora.targets == "all-linear"
    assert load_config(path, ["peft.method=lora"]).lora.r == 4


def test_lora_options_under_peft_land_in_the_lora_section_and_keep_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\nlora:\n  r: 4\n  alpha: 8\npeft:\n  method: lora\n  r: 16\n  layers: [-1]\n")
    config = load_config(path)
    assert (config.lora.r, config.lora.alpha, config.lora.layers, config.peft.options) == (16, 8, [-1], {})
    assert {"lora.r", "lora.layers"} <= config.explicit  # the recipe leaves them alone
    assert load_config(None, ["data.dataset=sms_spam", "peft.r=2"]).lora.r == 2
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  r: many\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:4: 'lora.r' must be int"):
        load_config(path)


def test_another_methods_options_are_kept_for_the_peft_layer_and_written_back(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: ia3\n  layers: [-2, -1]\n")
    config = load_config(path)  # the method and its keys are checked by finegrain.peft (tests/test_peft.py)
    assert config.peft.method == "ia3" and config.peft.options == {"layers": [-2, -1]}
    assert to_dict(config)["peft"] == {"method": "ia3", "layers": [-2, -1]}
    assert load_config(None, ["data.dataset=sms_spam", "peft.method=ia3", "peft.layers=[-1]"]).peft.options == {"layers": [-1]}
