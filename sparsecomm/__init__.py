"""sparsecomm: a harness for communication-efficient distributed deep learning.

Gradient compression methods (top-k, thresholds, SAGE, MiCRO, ExDyna, ...) share one
reducer interface (:mod:`sparsecomm.reducers`) and one meaning for every metric.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
