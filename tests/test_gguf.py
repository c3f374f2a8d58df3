"""GGUF reading: dequantization of every supported type, llama.cpp's q/k permutation, errors, the real model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import (
    hf_to_gguf_tensors,
    llama_cpp_permute,
    model_metadata,
    real_gguf_path,
    requires_real_gguf,
    tiny_vocab_metadata,
    write_gguf,
)

from finegrain.checkpoint.gguf import SUPPORTED_TYPES, load_gguf, permute_rope, read_gguf_metadata, unpermute_rope
from finegrain.errors import FinegrainError
from finegrain.model.llama import Llama

HEADS, KV_HEADS, HIDDEN = 4, 2, 64


def _random_hf_model(tied: bool, bias: bool = False, arch: str = "llama", seed: int = 0):
    """A tiny transformers model with weights large enough that a q/k row mix-up shows in the logits."""
    kwargs = dict(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=bias, **kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.3)
    return model.eval()


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _write_from_hf(path, hf_model, tied: bool, arch: str = "llama", permute: bool = True):
    tensors = hf_to_gguf_tensors(hf_model.state_dict(), HEADS, KV_HEADS, tied, permute=permute)
    meta = {k.replace("llama.", f"{arch}."): v for k, v in model_metadata().items()}
    return write_gguf(path, {**meta, **tiny_vocab_metadata()}, tensors, arch=arch)


def _our_model(checkpoint) -> Llama:
    model = Llama(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model


# ----- permutation -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4 * 16, 64), (2 * 16, 64), (4 * 16,)])
def test_unpermute_inverts_llama_cpp_permute(shape):
    heads = shape[0] // 16
    weight = torch.randn(shape)
    stored = torch.from_numpy(llama_cpp_permute(weight.numpy(), heads))
    assert not torch.equal(stored, weight)
    assert torch.equal(permute_rope(weight, heads), stored)
    assert torch.equal(unpermute_rope(stored, heads), weight)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_f32_gguf_logits_match_transformers(tmp_path, tied, bias):
    hf_model = _random_hf_model(tied, bias)
    path = _write_from_hf(tmp_path / "tiny.gguf", hf_model, tied)

    checkpoint = load_gguf(path, progress=False)
    config = checkpoint.config
    sizes = (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads)
    assert sizes == (2, HIDDEN, HEADS, KV_HEADS)
    assert config.tie_word_embeddings is tied
    assert config.attention_bias is bias and config.attention_out_bias is bias
    assert all(t.dtype == torch.float32 for t in checkpoint.state_dict.values())
    assert checkpoint.tensor_types == {"F32": len(hf_to_gguf_tensors(hf_model.state_dict(), HEADS, KV_HEADS, tied))}

    ids = _input_ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        ours = _our_model(checkpoint)(ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)

    # The test can see a permutation mistake: the rows as stored give clearly different logits.
    as_stored = dict(checkpoint.state_dict)
    for name in as_stored:
        if "q_proj" in name:
            as_stored[name] = permute_rope(as_stored[name], HEADS)
        elif "k_proj" in name:
            as_stored[name] = permute_rope(as_stored[name], KV_HEADS)
    wrong = Llama(checkpoint.config).eval()
    wrong.load_state_dict(as_stored)
    with torch.no_grad():
        assert (wrong(ids) - expected).abs().max() > 1e-2


def test_exported_file_matches_transformers_gguf_loader(tmp_path):
    """The test's export is what llama.cpp writes: transformers' own GGUF loader undoes it too."""
    hf_model = _random_hf_model(tied=False)
    path = _write_from_hf(tmp_path / "tiny.gguf", hf_model, tied=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = _input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, hf_model(ids).logits, atol=1e-4, rtol=0)
        ours = _our_model(load_gguf(path, progress=False))(ids)
    torch.testing.assert_close(ours, reference(ids).logits, atol=1e-4, rtol=0)


def test_qwen2_gguf_is_not_permuted(tmp_path):
    hf_model = _random_hf_model(tied=True, arch="qwen2")
    path = _write_from_hf(tmp_path / "qwen.gguf", hf_model, tied=True, arch="qwen2", permute=False)
    checkpoint = load_gguf(path, progress=False)
    assert checkpoint.config.model_type == "qwen2"
    assert checkpoint.config.attention_bias and not checkpoint.config.attention_out_bias
    ids = _input_ids()
    with torch.no_grad():
        torch.testing.assert_close(_our_model(checkpoint)(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


# ----- tensor types ------------------------------------------------------------------------

# A model with hidden size 256, so that every row holds whole 256-value blocks of the K-quants.
WIDE = dict(hidden=256, layers=1, heads=4, kv_heads=2, ffn=256, vocab=128)
WIDE_TYPES = {
    "token_embd.weight": (Q.Q8_0, (128, 256)),
    "blk.0.attn_q.weight": (Q.Q4_K, (256, 256)),
    "blk.0.attn_k.weight": (Q.Q6_K, (128, 256)),
    "blk.0.attn_v.weight": (Q.Q4_0, (128, 256)),
    "blk.0.attn_output.weight": (Q.Q4_1, (256, 256)),
    "blk.0.ffn_gate.weight": (Q.BF16, (256, 256)),
    "blk.0.ffn_up.weight": (Q.F16, (256, 256)),
    "blk.0.ffn_down.weight": (Q.F32, (256, 256)),
    "blk.0.attn_norm.weight": (Q.F32, (256,)),
    "blk.0.ffn_norm.weight": (Q.Q8_0, (256,)),
    "output_norm.weight": (Q.F32, (256,)),
    "output.weight": (Q.Q6_K, (128, 256)),
}
# Offsets of the float16 scales inside a block: Q4_K starts with d and dmin, Q6_K ends with d.
_F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def _raw_tensor(qtype, shape, rng) -> np.ndarray:
    """The stored form of a random tensor: quantized by gguf where it can, else random valid blocks."""
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype in (Q.F32, Q.F16):
        return values
    if qtype in _F16_FIELDS:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(values.size // block_size, type_size), dtype=np.uint8)
        for offset in _F16_FIELDS[qtype]:
            scale = rng.uniform(0.001, 0.05, size=len(blocks)).astype(np.float16)
            blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)
    return gguf.quants.quantize(values, qtype)


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {name: (_raw_tensor(qtype, shape, rng), qtype) for name, (qtype, shape) in WIDE_TYPES.items()}
    path = tmp_path_factory.mktemp("wide") / "wide.gguf"
    write_gguf(path, {**model_metadata(**WIDE), **tiny_vocab_metadata()}, tensors)
    return path, tensors


def test_every_supported_type_dequantizes_like_gguf(wide_file):
    path, tensors = wide_file
    checkpoint = load_gguf(path, progress=False)
    assert {t.name for t, _ in WIDE_TYPES.values()} == set(SUPPORTED_TYPES)
    assert sum(checkpoint.tensor_types.values()) == len(WIDE_TYPES)
    assert checkpoint.tensor_types["Q8_0"] == 2 and checkpoint.tensor_types["Q6_K"] == 2
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    for name, (raw, qtype) in tensors.items():
        hf_name = names.get(name) or _hf_layer_name(name)
        ours = checkpoint.state_dict[hf_name].numpy()
        shape = WIDE_TYPES[name][1]
        assert ours.shape == shape and ours.dtype == np.float32, name
        if qtype in (Q.F32, Q.F16):
            expected = raw.astype(np.float16 if qtype == Q.F16 else np.float32).astype(np.float32)
        else:
            expected = gguf.quants.dequantize(raw, qtype).reshape(shape)
        if ".attn_q." in name:
            ours = llama_cpp_permute(ours, 4)
        elif ".attn_k." in name:
            ours = llama_cpp_permute(ours, 4, 2)
        assert np.isfinite(expected).all(), name
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    # The whole thing runs as a model.
    with torch.no_grad():
        assert torch.isfinite(_our_model(checkpoint)(_input_ids())).all()


def _hf_layer_name(name: str) -> str:
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    _, index, part, kind = name.split(".")
    return f"model.layers.{index}.{parts[part]}.{kind}"


@pytest.mark.parametrize(
    "qtype, tolerance", [(Q.Q8_0, 0.02), (Q.Q4_0, 0.25), (Q.Q4_1, 0.25), (Q.BF16, 0.02), (Q.F16, 2e-3)]
)
def test_quantized_weights_stay_close_to_the_originals(tmp_path, qtype, tolerance):
    values = np.random.default_rng(1).standard_normal((128, 64)).astype(np.float32)
    stored = values if qtype == Q.F16 else gguf.quants.quantize(values, qtype)
    path = write_gguf(tmp_path / "q.gguf", {**model_metadata(), **tiny_vocab_metadata()},
                      {"token_embd.weight": (stored, qtype)})
    ours = load_gguf(path, progress=False).state_dict["model.embed_tokens.weight"].numpy()
    assert np.abs(ours - values).max() < tolerance * np.abs(values).max()


# ----- metadata and progress ---------------------------------------------------------------


def test_metadata_is_plain_python(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {**model_metadata(), **tiny_vocab_metadata(), "general.name": "tiny"},
                      {"token_embd.weight": (np.zeros((128, 64), np.float32), None)})
    meta = read_gguf_metadata(path)
    assert meta == load_gguf(path, progress=False).metadata
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert type(meta["llama.block_count"]) is int and type(meta["llama.rope.freq_base"]) is float
    assert type(meta["tokenizer.ggml.add_bos_token"]) is bool
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.merges"] == ["Ġ t", "h e"]
    assert not any(key.startswith("GGUF.") for key in meta)


def test_progress_bar_goes_to_stderr_and_can_be_disabled(wide_file, capsys):
    path, _ = wide_file
    load_gguf(path, progress=False)
    assert capsys.readouterr().err == ""
    load_gguf(path, progress=True)
    captured = capsys.readouterr()
    assert "wide.gguf" in captured.err and captured.out == ""


# ----- errors ------------------------------------------------------------------------------


@pytest.fixture
def tiny_file(tmp_path):
    hf_model = _random_hf_model(tied=True)
    return _write_from_hf(tmp_path / "tiny.gguf", hf_model, tied=True)


def _error(path) -> str:
    with pytest.raises(FinegrainError) as info:
        load_gguf(path, progress=False)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_directory(tmp_path):
    assert "directory" in _error(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 not a gguf at all", b"{\"model_type\": \"llama\"}"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert "not a GGUF file" in _error(path)


@pytest.mark.parametrize("keep", [8, 40, 600, 0.5, -100])
def test_truncated_file(tiny_file, keep):
    data = tiny_file.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    tiny_file.write_bytes(data[:cut])
    assert "truncated or corrupt" in _error(tiny_file)


def test_unsupported_architecture(tmp_path):
    meta = {k.replace("llama.", "bert."): v for k, v in model_metadata().items()}
    path = write_gguf(tmp_path / "bert.gguf", meta, {"token_embd.weight": (np.zeros((128, 64), np.float32), None)},
                      arch="bert")
    message = _error(path)
    assert "'bert'" in message and "not supported" in message


def test_unsupported_tensor_type(tmp_path):
    values = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "q5.gguf", {**model_metadata(), **tiny_vocab_metadata()},
                      {"token_embd.weight": (gguf.quants.quantize(values, Q.Q5_0), Q.Q5_0)})
    message = _error(path)
    assert "token_embd.weight" in message and "Q5_0" in message and "Q4_K" in message


def test_unknown_tensor(tmp_path):
    path = write_gguf(tmp_path / "moe.gguf", model_metadata(),
                      {"blk.0.ffn_gate_exps.weight": (np.zeros((4, 64), np.float32), None)})
    assert "blk.0.ffn_gate_exps.weight" in _error(path)


# ----- the real default model --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_models():
    path = real_gguf_path()
    checkpoint = load_gguf(path, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return checkpoint, _our_model(checkpoint), reference.eval()


@pytest.mark.real_model
@requires_real_gguf
def test_real_gguf_config(real_models):
    checkpoint, _, _ = real_models
    config = checkpoint.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    assert abs(config.rms_norm_eps - 1e-5) < 1e-9
    assert checkpoint.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert checkpoint.metadata["tokenizer.ggml.pre"] == "smollm"
    assert len(checkpoint.metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.real_model
@requires_real_gguf
def test_real_gguf_logits_match_transformers(real_models):
    from finegrain.tokenizer import Tokenizer

    checkpoint, ours, reference = real_models
    tokenizer = Tokenizer.from_gguf(checkpoint.metadata)
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "北京是中国的首都，上海 🚀 123"]
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)])
            torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-3, rtol=0)
        ids = tokenizer.encode("The capital of France is")
        for _ in range(2):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert tokenizer.decode(ids).startswith("The capital of France is Paris")
