"""How selected values travel between workers: the communicators (the only code that touches
``torch.distributed``, and the in-process world of virtual workers), the exchanges built on them
(dense all-reduce, sparse gather-sum, union all-reduce, leader broadcast, tree merge), and the
wire formats and bit packing of what they send."""
