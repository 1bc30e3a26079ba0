"""The span attacks' candidate tables are processed a chunk of rows at a time (memory): same results as whole."""

import torch

from fedpeft.attacks import lora_io, span


def _whole_residuals(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    norm = x.norm(dim=-1)
    res = (x - (x @ basis.T) @ basis).norm(dim=-1) / norm.clamp_min(1e-300)
    return torch.where(norm > 1e-12 * float(norm.max()), res, torch.ones_like(res))


def test_chunked_row_computations_equal_the_whole_table(monkeypatch) -> None:
    monkeypatch.setattr(lora_io, "ROW_CHUNK", 7)  # many chunks, a ragged last one
    torch.manual_seed(0)
    x = torch.randn(5, 300, 16)
    x[1, 3] = 0  # a zero input (padding row) stays at residual 1
    basis = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))[0].T
    got = lora_io.residuals(x, basis)
    assert got.shape == (5, 300) and float(got[1, 3]) == 1.0
    torch.testing.assert_close(got, _whole_residuals(x, basis), rtol=0, atol=1e-12)
    w = x.to(torch.float64) ** 2
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    cut = (0.1 + 3 * (0.1 * 0.9 * (w ** 2).sum(-1)).sqrt()).sqrt()
    torch.testing.assert_close(span.dropout_cut(x, 0.1), cut, rtol=0, atol=1e-12)
    a = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(span._through(x, a), x.to(torch.float64) @ a.T, rtol=0, atol=1e-12)
