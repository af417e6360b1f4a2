"""Ship a fine-tuned model as a small int8 difference from the pretrained weights it started from.

A model fine-tuned in full changes every weight by ~1-3 % (AdamW, a few hundred steps), so its
difference from the base quantises well: :func:`encode_delta` stores, per 2-D tensor,

* ``<name>.decay``: one float32 scale ``s``, the median of ``tuned / base``, applied to the whole
  base tensor (AdamW's weight decay shrinks every row by the same factor, also rows that never
  received a gradient, such as the embeddings of words absent from the training set);
* ``<name>.rows`` (int32), ``<name>.q`` (int8, rows x columns), ``<name>.q_scale`` (float32 per
  row): the residual ``tuned - s * base`` of the rows it is not negligible in, quantised per row
  symmetrically (``q = round(residual / q_scale)``, ``q_scale = max|residual row| / 127``).

Tensors with fewer than two dimensions or missing from the base (a new classifier) are stored
whole in float32 as ``<name>.full``. :func:`decode_delta` rebuilds ``s * base`` + the dequantised
rows; each rebuilt weight is within ``q_scale / 2`` of the tuned one (round to nearest).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from salience.errors import ModelLoadError

FORMAT = "salience-int8-row-delta/1"
UNCHANGED_ROW_TOLERANCE = 1e-5  # a row is left out when max|residual| <= this x max|base row|


def encode_delta(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encode ``tuned`` as its difference from ``base`` (see the module docstring for the layout).

    Args:
        tuned: the fine-tuned state dict (floating tensors).
        base: the state dict it was trained from; names absent here are stored whole.

    Returns:
        The tensors to write with ``safetensors.torch.save_file`` (contiguous, CPU).
    """
    packed: dict[str, torch.Tensor] = {}
    for name, weight in tuned.items():
        weight = weight.detach().to("cpu", torch.float32)
        start = base.get(name)
        if start is None or weight.ndim != 2 or start.shape != weight.shape:
            packed[f"{name}.full"] = weight.contiguous()
            continue
        start = start.detach().to("cpu", torch.float32)
        nonzero = start != 0
        decay = torch.median(weight[nonzero] / start[nonzero]) if nonzero.any() else torch.tensor(1.0)
        residual = weight - decay * start
        row_max = residual.abs().amax(dim=1)
        kept = torch.nonzero(row_max > UNCHANGED_ROW_TOLERANCE * start.abs().amax(dim=1)).flatten()
        q_scale = (row_max[kept] / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(residual[kept] / q_scale[:, None]).clamp(-127, 127).to(torch.int8)
        packed[f"{name}.decay"] = decay.reshape(1).to(torch.float32)
        packed[f"{name}.rows"] = kept.to(torch.int32).contiguous()
        packed[f"{name}.q"] = q.contiguous()
        packed[f"{name}.q_scale"] = q_scale.contiguous()
    return packed


def base_checksums(packed: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The float64 sum of |w| of every base tensor the delta ``packed`` is applied to: recorded
    when packing, checked when decoding (a different base would rebuild a different model)."""
    names = sorted({key.rsplit(".", 1)[0] for key in packed if key.endswith(".q")})
    return {name: _checksum(base[name]) for name in names if name in base}


def _checksum(tensor: torch.Tensor) -> float:
    return float(tensor.double().abs().sum())


def decode_delta(packed: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                 checksums: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Rebuild the fine-tuned float32 state dict from :func:`encode_delta`'s tensors and ``base``.

    ``checksums``: :func:`base_checksums` of the base the delta was made against; each must match
    to 1e-9 (relative), else the base is another model's.

    Raises:
        ModelLoadError: a quantised tensor's base is missing, has another shape or fails its
            checksum, or a part of an entry is missing.
    """
    for name, expected in (checksums or {}).items():
        found = _checksum(base[name]) if name in base else None
        if found is None or abs(found - expected) > 1e-9 * max(abs(expected), 1.0):
            raise ModelLoadError(f"the base weights differ from those the delta was made against ({name}: sum |w| "
                                 f"{found} instead of {expected}); install the pinned base model")
    state: dict[str, torch.Tensor] = {}
    names = {key.rsplit(".", 1)[0] for key in packed}
    for name in sorted(names):
        if f"{name}.full" in packed:
            state[name] = packed[f"{name}.full"].to(torch.float32)
            continue
        parts = [f"{name}.{part}" for part in ("decay", "rows", "q", "q_scale")]
        if any(part not in packed for part in parts):
            raise ModelLoadError(f"the weight delta of {name} is incomplete (needs {', '.join(parts)})")
        start = base.get(name)
        q = packed[f"{name}.q"]
        if start is None or start.ndim != 2 or start.shape[1] != q.shape[1]:
            raise ModelLoadError(f"the weight delta of {name} does not fit the base model "
                                 f"(base {None if start is None else tuple(start.shape)}, delta rows of {q.shape[1]})")
        weight = packed[f"{name}.decay"].to(torch.float32) * start.to(torch.float32)
        rows = packed[f"{name}.rows"].to(torch.long)
        weight[rows] += q.to(torch.float32) * packed[f"{name}.q_scale"][:, None]
        state[name] = weight
    return state
