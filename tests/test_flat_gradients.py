"""Gradients kept as views of one flat buffer: backward writes there, and a reducer reads them
in place and builds the average there (no flatten copy), with results identical to the
tensor-by-tensor path."""
import pytest
import torch

from sparsecomm import reducers
from sparsecomm.reducers.layout import Layout, bind_flat_gradients

SHAPES = [(6, 5), (5,), (0,), (3, 2, 2), (4,)]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_backward_accumulates_into_the_flat_buffer():
    net = model()
    params = list(net.parameters())
    flat = bind_flat_gradients(params)
    loss = net(torch.randn(4, 10)).square().sum()
    loss.backward()
    layout = Layout.of([p.grad for p in params])
    view = layout.flat_view([p.grad for p in params])
    assert view is not None and view.data_ptr() == flat.data_ptr() and view.numel() == flat.numel()
    reference = model()
    reference(torch.randn(4, 10))  # same parameters; gradients through the default path
    torch.manual_seed(1)
    x = torch.randn(4, 10)
    for p in params:
        p.grad.zero_()
    net(x).square().sum().backward()
    reference.zero_grad()
    reference(x).square().sum().backward()
    assert torch.equal(flat, torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))


def test_flat_view_refuses_what_is_not_one_buffer_in_order():
    flat = torch.arange(20.0)
    parts = [flat[0:6].view(2, 3), flat[6:6], flat[6:20]]
    layout = Layout.of(parts)
    assert layout.flat_view(parts).data_ptr() == flat.data_ptr()
    assert layout.flat_view([flat[0:6].view(2, 3), flat[6:6], torch.arange(14.0)]) is None  # another buffer
    swapped = Layout.of([flat[14:20], flat[0:14]])
    assert swapped.flat_view([flat[14:20], flat[0:14]]) is None  # out of order
    strided = torch.arange(40.0)[::2]
    assert Layout.of([strided[:6], strided[6:]]).flat_view([strided[:6], strided[6:]]) is None


@pytest.mark.parametrize("name", reducers.available())
@pytest.mark.parametrize("error_feedback", [True, False])
def test_flat_gradients_give_the_same_average_and_residual(name, error_feedback):
    """Five steps on one worker: gradients as separate tensors, and as views of one flat buffer
    reduced in place (out=grads), agree bit for bit."""
    # OMGS/AGTF would otherwise choose their grouping from timings, which differ between two reducers
    options = {"groups": [2, 3]} if name in ("omgs", "agtf") else {}
    a = reducers.build(name, density=0.1, error_feedback=error_feedback, **options)
    b = reducers.build(name, density=0.1, error_feedback=error_feedback, **options)
    flat = torch.zeros(sum(torch.Size(s).numel() for s in SHAPES))
    views = Layout.of([torch.zeros(s) for s in SHAPES]).split(flat)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        expected = [t.clone() for t in a.reduce(grads)]
        torch._foreach_copy_(views, grads)
        got = b.reduce(views, out=views)
        assert all(g.data_ptr() == v.data_ptr() for g, v in zip(got, views))
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
        for ma, mb in zip(a.residual, b.residual):
            assert torch.equal(ma, mb)


def test_exact_reduces_flat_gradients_in_place_without_a_copy():
    r = reducers.build("exact")
    flat = torch.randn(30)
    views = [flat[:10], flat[10:]]
    before = flat.clone()
    r.reduce(views, out=views)
    assert torch.equal(flat, before)  # one worker: the average is the gradient, left where it was
    assert "output" not in r.workspace.buffers  # nothing was copied through the reducer's own buffer
