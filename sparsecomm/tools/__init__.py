"""The tools around training runs, each also a command (``python -m sparsecomm TOOL ...``):
reading run directories (:mod:`.runs`), tables (:mod:`.compare`) and figures (:mod:`.plot`) of
them, grids of runs (:mod:`.sweep`, :mod:`.grid`), the cost model and its predictor
(:mod:`.costmodel`, :mod:`.predict`), and test hosts with real links (:mod:`.netlab`)."""
