"""Experiments on top of the methods: one run (:mod:`.run`), grids of runs (:mod:`.sweep`), the files
they leave (:mod:`.results`), Table 1 and the figures (:mod:`.report`), the paper's experiments as one
command (:mod:`.reproduce`) and the bridge to :mod:`theory`'s instruments (:mod:`.measure`)."""
