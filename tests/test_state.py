"""Reducer state: a reducer restored mid-run continues exactly as the original."""
import pytest
import torch

import reducer_scenarios as sc
from sparsecomm import reducers

METHODS = reducers.available()


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_restored_reducer_continues_bit_exactly(clusters, name, P):
    assert all(clusters(P).run(sc.resume_matches, name))


def test_state_survives_weights_only_loading_and_holds_the_residual(tmp_path):
    r = reducers.build("exdyna", density=0.1)
    for t in range(3):
        r.reduce(sc.make_grads(sc.SHAPES, 0, t))
    path = tmp_path / "state.pt"
    torch.save(r.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["method"] == "exdyna" and state["steps"] == 3
    assert torch.equal(state["residual"], sc.flat(r.residual))
    assert set(state["method_state"]) == {"control", "partitions"}
    assert sum(state["method_state"]["partitions"]["blocks"]) > 0


def test_state_of_another_method_or_setting_is_refused():
    a = reducers.build("micro", density=0.1)
    a.reduce([torch.randn(30)])
    state = a.state_dict()
    with pytest.raises(ValueError, match="method: saved 'micro', this reducer 'exdyna'"):
        reducers.build("exdyna", density=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="density: saved 0.1, this reducer 0.2"):
        reducers.build("micro", density=0.2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a sparsecomm reducer state"):
        reducers.build("micro").load_state_dict({"weights": 1})


def test_restored_state_must_match_the_gradients():
    a = reducers.build("topk", density=0.1)
    a.reduce([torch.randn(30)])
    b = reducers.build("topk", density=0.1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["steps"] == 1  # a pending state is reported back as is
    with pytest.raises(reducers.LayoutMismatchError, match="do not match the restored reducer state"):
        b.reduce([torch.randn(31)])


def test_state_before_the_first_step_round_trips():
    a = reducers.build("randomk", density=0.1, seed=5)
    b = reducers.build("randomk", density=0.1, seed=5)
    b.load_state_dict(a.state_dict())
    g = [torch.randn(40)]
    assert torch.equal(a.reduce(g)[0], b.reduce(g)[0])
