"""The int8 weight-difference codec that ships the fine-tuned zoo default (salience.zoo.weight_delta)."""

from __future__ import annotations

import pytest
import torch

from salience.errors import ModelLoadError
from salience.zoo.weight_delta import UNCHANGED_ROW_TOLERANCE, base_checksums, decode_delta, encode_delta


def fine_tuned_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and a 'fine-tuned' state: every weight decayed by the same factor (AdamW's weight
    decay), rows 1 and 4 of the embedding moved by ~1 % (the words seen in training), every row of
    the dense weight moved, a bias changed, a new classifier."""
    gen = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(6, 8, generator=gen), "dense.weight": torch.randn(5, 8, generator=gen),
            "dense.bias": torch.randn(5, generator=gen)}
    decay = 0.9998
    tuned = {name: decay * t for name, t in base.items()}
    tuned["emb.weight"][[1, 4]] += 0.01 * torch.randn(2, 8, generator=gen)
    tuned["dense.weight"] += 0.02 * torch.randn(5, 8, generator=gen)
    tuned["dense.bias"] += 0.1
    tuned["classifier.weight"] = torch.randn(2, 8, generator=gen)
    return tuned, base


def test_round_trip_within_half_a_quantisation_step() -> None:
    tuned, base = fine_tuned_pair()
    packed = encode_delta(tuned, base)
    rebuilt = decode_delta(packed, base)
    assert set(rebuilt) == set(tuned)
    for name in ("emb.weight", "dense.weight"):
        step = torch.zeros(tuned[name].shape[0])
        step[packed[f"{name}.rows"].long()] = packed[f"{name}.q_scale"]
        # round to nearest: each weight within half a step of its row (+ float32 rounding of the rebuild)
        assert ((rebuilt[name] - tuned[name]).abs() <= step[:, None] / 2 + 1e-6).all()
    # stored whole: 1-D tensors and tensors the base does not have
    for name in ("dense.bias", "classifier.weight"):
        assert torch.equal(rebuilt[name], tuned[name])


def test_rows_only_decayed_are_not_stored() -> None:
    tuned, base = fine_tuned_pair()
    packed = encode_delta(tuned, base)
    assert packed["emb.weight.rows"].tolist() == [1, 4]  # the rest are 0.9998 x base, within tolerance
    assert packed["dense.weight.rows"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(packed["emb.weight.decay"], torch.tensor([0.9998]), rtol=0, atol=1e-7)
    unchanged = [0, 2, 3, 5]
    error = (decode_delta(packed, base)["emb.weight"][unchanged] - tuned["emb.weight"][unchanged]).abs()
    assert error.max() <= UNCHANGED_ROW_TOLERANCE * base["emb.weight"][unchanged].abs().max()
    assert packed["emb.weight.q"].dtype == torch.int8


def test_decoding_refuses_a_delta_that_does_not_fit() -> None:
    tuned, base = fine_tuned_pair()
    packed = encode_delta(tuned, base)
    with pytest.raises(ModelLoadError, match="dense.weight does not fit the base model"):
        decode_delta(packed, {**base, "dense.weight": torch.randn(5, 3)})
    with pytest.raises(ModelLoadError, match="the weight delta of emb.weight is incomplete"):
        decode_delta({k: v for k, v in packed.items() if k != "emb.weight.q_scale"}, base)


def test_decoding_checks_the_base_it_was_made_against() -> None:
    tuned, base = fine_tuned_pair()
    packed = encode_delta(tuned, base)
    checksums = base_checksums(packed, base)
    assert sorted(checksums) == ["dense.weight", "emb.weight"]  # the tensors rebuilt from the base
    torch.testing.assert_close(decode_delta(packed, base, checksums)["dense.weight"], decode_delta(packed, base)["dense.weight"])
    other = {**base, "emb.weight": base["emb.weight"] * 1.001}  # another version of the pretrained model
    with pytest.raises(ModelLoadError, match=r"the base weights differ from those the delta was made against \(emb.weight"):
        decode_delta(packed, other, checksums)
