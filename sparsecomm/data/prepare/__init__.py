"""Preparing the benchmark data sets (``prepare_dataset.sh`` = ``python -m sparsecomm.data.prepare``):
what is known of each (:mod:`.catalog`), checks of files (:mod:`.checks`), getting a file from a
mirror or upstream (:mod:`.fetch`), unpacking (:mod:`.unpack`), the procedure for one data set
(:mod:`.pipeline`), the ``.prepared`` manifest a prepared folder carries (:mod:`.manifest`), and
the command line (:mod:`.cli`). Needs only the standard library (and tqdm on a terminal)."""
