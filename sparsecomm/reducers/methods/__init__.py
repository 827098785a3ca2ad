"""One module per method family; importing them registers every method."""
from . import exact, partitioned, randomk, sage, thresh, topk  # noqa: F401
