"""Round-to-nearest weight quantization: every group fitted and rounded on its own."""

from __future__ import annotations

import torch

from converter.quantization.grids import (GridSpec, QuantizationError, QuantizedTensor, fit_group_params,
                                          fit_super_block_params, quantize_with_params)


def rtn_quantize(w: torch.Tensor, spec: GridSpec, clip_search: bool = False) -> QuantizedTensor:
    """Quantize w [out, in] in groups of `spec.group_size` consecutive input columns (a last group
    shorter when the group size does not divide `in`).

    Without clip search the codes equal llama.cpp's reference quantizer on the fp16 scales it stores.
    """
    if w.dim() != 2:
        raise QuantizationError(f"{spec.name}: need a 2-D weight (got {tuple(w.shape)})")
    out, n_in = w.shape
    gs = spec.group_for(n_in)
    w = w.detach().float()
    if spec.super_block:
        return _rtn_super_blocks(w, spec, clip_search)
    codes, scales, offsets = [], [], []
    full = n_in // gs * gs
    for start, stop, width in ((0, full, gs), (full, n_in, n_in - full)):
        if stop == start:
            continue
        groups = w[:, start:stop].reshape(-1, width)
        d, m = fit_group_params(groups, spec, clip_search=clip_search)
        q = quantize_with_params(groups, d[:, None], None if m is None else m[:, None], spec)
        codes.append(q.reshape(out, stop - start))
        scales.append(d.reshape(out, -1))
        offsets.append(None if m is None else m.reshape(out, -1))
    offset = None if spec.symmetric else torch.cat(offsets, dim=1)
    return QuantizedTensor(torch.cat(codes, dim=1), torch.cat(scales, dim=1), offset, spec)


def _rtn_super_blocks(w: torch.Tensor, spec: GridSpec, clip_search: bool) -> QuantizedTensor:
    out, n_in = w.shape
    sb, gs = spec.super_block, spec.group_size
    if n_in % sb:
        raise QuantizationError(f"{spec.name} needs the input dim to be a multiple of {sb} (got {n_in})")
    blocks = w.reshape(-1, sb)
    scale, offset, D, Dm = fit_super_block_params(blocks, spec, clip_search=clip_search)
    q = quantize_with_params(blocks, scale.repeat_interleave(gs, dim=1),
                             None if offset is None else offset.repeat_interleave(gs, dim=1), spec)
    per_row = lambda x: None if x is None else x.reshape(out, -1)  # noqa: E731
    return QuantizedTensor(q.reshape(out, n_in), per_row(scale), per_row(offset), spec, per_row(D), per_row(Dm))
