"""Gradient reducers: one contract, many compression methods.

    from sparsecomm import reducers
    reducers.available()
    r = reducers.build("exdyna", density=0.001)
    avg = r.reduce(grads)    # a collective: every rank calls it, in the same order
    r.residual, r.stats, r.state_dict(), r.load_state_dict(state)
"""
from .base import RESIDUAL_DTYPES, Reducer, ReduceCall
from .comm.communicator import Communicator, ProcessGroupCommunicator, SoloCommunicator, make_communicator
from .comm.exchange import LayoutMismatchError, NonFiniteGradientError
from .layout import Layout, bind_flat_gradients
from .registry import available, build, is_per_tensor, lookup, method_options, register
from . import methods  # noqa: F401  (registers every method)

__all__ = ["available", "build", "is_per_tensor", "lookup", "method_options", "register", "Reducer", "ReduceCall", "Communicator",
           "ProcessGroupCommunicator", "SoloCommunicator", "make_communicator", "LayoutMismatchError",
           "NonFiniteGradientError", "Layout", "bind_flat_gradients", "RESIDUAL_DTYPES"]
