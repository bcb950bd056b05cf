"""``python -m fastdl.train MODEL --data ...``: also what torchrun starts (``-m fastdl.train``)."""

from .cli import main

main()
