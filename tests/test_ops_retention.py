"""CellFM's linear retention: Q (KᵀV) pinned to the quadratic (QKᵀ) V with padding masked."""

import pytest
import torch

from hf_scfm.modeling.cellfm.retention import linear_retention, linear_retention_reference

F64 = torch.float64


def make(batch=3, heads=2, length=11, d_k=4, d_v=5, dtype=F64, grad=False):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, heads, length, d, generator=g, dtype=dtype).requires_grad_(grad)
        for d in (d_k, d_k, d_v)
    ]


def mask_for(lengths, length):
    return (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()


def test_matches_explicit_sum():
    q, k, v = make(batch=1, heads=1, length=3, d_k=2, d_v=2)
    expected = torch.stack([sum((q[0, 0, i] @ k[0, 0, j]) * v[0, 0, j] for j in range(3)) for i in range(3)])
    torch.testing.assert_close(linear_retention(q, k, v)[0, 0], expected)


@pytest.mark.parametrize("length", [1, 11, 32])
def test_fast_matches_quadratic_reference_with_padding(length):
    q, k, v = make(length=length)
    mask = mask_for([length, max(1, length - 4), 1], length)
    out = linear_retention(q, k, v, mask)
    torch.testing.assert_close(out, linear_retention_reference(q, k, v, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_retention(q, k, v), linear_retention_reference(q, k, v), rtol=1e-12, atol=1e-12)


def test_padding_is_invisible_to_real_positions_and_zero_in_output():
    q, k, v = make(length=11)
    mask = mask_for([11, 7, 2], 11)
    out = linear_retention(q, k, v, mask)
    noisy = [t + 100.0 * (1 - mask)[:, None, :, None] for t in (q, k, v)]
    torch.testing.assert_close(linear_retention(*noisy, mask), out)
    for i, n in enumerate([11, 7, 2]):
        alone = linear_retention(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
        torch.testing.assert_close(out[i : i + 1, :, :n], alone)
        assert torch.count_nonzero(out[i, :, n:]) == 0


def test_float32_and_gradcheck():
    q, k, v = make(length=50)
    mask = mask_for([50, 31, 9], 50)
    ref = linear_retention_reference(q, k, v, mask)
    out = linear_retention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    small = make(batch=2, heads=1, length=4, d_k=2, d_v=3, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: linear_retention(a, b, c, mask_for([4, 2], 4)), small)


def test_bad_shapes_raise():
    q, k, v = make()
    with pytest.raises(ValueError, match="attention_mask must be"):
        linear_retention(q, k, v, torch.ones(3, 5))
    with pytest.raises(ValueError, match="q and k must share"):
        linear_retention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="must be \\[batch, heads, length, dim\\]"):
        linear_retention(q[0], k, v)
