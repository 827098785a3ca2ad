#!/usr/bin/env python3
"""Train a CNN or LSTM benchmark: `python cnn-lstm/train.py --preset NAME [options]`.

A thin entry point over `python -m sparsecomm.train` (the same options; `--help` lists them,
`--list-presets` the presets in cnn-lstm/presets and ncf/presets).
"""
import sys

from sparsecomm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
