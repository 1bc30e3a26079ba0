"""The attacks' candidate tables are processed a chunk of rows at a time (memory): same results as whole."""

import torch

from fedpeft.attacks import lora_io, sign_span, span, subspace_opt


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


def _rows_and_table() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    cands = torch.randn(3, 200, 16)
    rows = torch.randn(6, 16, dtype=torch.float64)
    return rows / rows.norm(), cands


def test_subspace_scores_chunked_equal_the_whole_table_formulas(monkeypatch) -> None:
    rows, cands = _rows_and_table()
    x = cands.to(torch.float64).reshape(-1, 16)
    x = x - x.mean(0)  # the centring mean is over the whole table, not a chunk's
    unit = x / x.norm(dim=-1, keepdim=True)
    energy = ((unit @ rows.T) ** 2).sum(-1).reshape(3, 200)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    proj = (((x @ vh[:4].T) ** 2).sum(-1) / (x ** 2).sum(-1)).reshape(3, 200)
    monkeypatch.setattr(lora_io, "ROW_CHUNK", 7)
    torch.testing.assert_close(subspace_opt.energy_scores(rows, cands), energy, rtol=0, atol=1e-12)
    torch.testing.assert_close(subspace_opt.projection_scores(rows, cands, 4), proj, rtol=0, atol=1e-12)
    chunked = subspace_opt.wiener_scores(rows, cands, 4)
    monkeypatch.setattr(lora_io, "ROW_CHUNK", 1 << 20)
    torch.testing.assert_close(chunked, subspace_opt.wiener_scores(rows, cands, 4), rtol=0, atol=1e-12)


def test_sparse_codes_over_the_pool_find_the_planted_inputs(monkeypatch) -> None:
    _, cands = _rows_and_table()
    planted = [(0, 5), (1, 50), (2, 120)]
    inputs = torch.stack([cands[p, v] for p, v in planted]).to(torch.float64)
    rows = torch.randn(6, 3, dtype=torch.float64) @ inputs  # rows of a dL/dA: combinations of the inputs
    flat_ids = {p * 200 + v for p, v in planted}
    whole = subspace_opt.sparse_scores(rows, cands, 3, 0.01, 200)
    monkeypatch.setattr(subspace_opt, "SPARSE_POOL", 40)
    pooled = subspace_opt.sparse_scores(rows, cands, 3, 0.01, 200)
    assert int((pooled > 0).sum()) <= 40  # only the pool gets mass
    for scores in (whole, pooled):
        assert set(torch.topk(scores.flatten(), 3).indices.tolist()) == flat_ids


def test_sign_pursuit_is_the_same_a_chunk_at_a_time(monkeypatch) -> None:
    torch.manual_seed(2)
    cands = torch.randn(2, 150, 16)
    targets = torch.sign(torch.randn(8, 2) @ cands[0, [3, 77]] + 0.01 * torch.randn(8, 16)).to(torch.float64)
    whole = sign_span.pursuit(targets, cands, per_position=4, max_picks=3)
    monkeypatch.setattr(lora_io, "ROW_CHUNK", 11)
    chunked = sign_span.pursuit(targets, cands, per_position=4, max_picks=3)
    assert chunked[0] == whole[0] and chunked[1] == whole[1]
    torch.testing.assert_close(chunked[2], whole[2], rtol=0, atol=1e-12)
