"""Round-to-nearest weight quantization: every group fitted and rounded on its own."""

from __future__ import annotations

import torch

from converter.quantization.grids import (GridSpec, QuantizationError, QuantizedTensor, fit_group_params,
                                          quantize_with_params)


def rtn_quantize(w: torch.Tensor, spec: GridSpec, clip_search: bool = False) -> QuantizedTensor:
    """Quantize w [out, in] in groups of `spec.group_size` consecutive input columns.

    Without clip search the codes equal llama.cpp's reference quantizer on the fp16 scales it stores.
    """
    if w.dim() != 2 or w.shape[1] % spec.group_for(w.shape[1]):
        raise QuantizationError(f"{spec.name}: need a 2-D weight whose input dim is a multiple of "
                                f"{spec.group_size} (got {tuple(w.shape)})")
    out, n_in = w.shape
    gs = spec.group_for(n_in)
    n_groups = n_in // gs
    groups = w.detach().float().reshape(out * n_groups, gs)
    d, m = fit_group_params(groups, spec, clip_search=clip_search)
    codes = quantize_with_params(groups, d[:, None], None if m is None else m[:, None], spec)
    offset = None if m is None else m.reshape(out, n_groups)
    return QuantizedTensor(codes.reshape(out, n_in), d.reshape(out, n_groups), offset, spec)
