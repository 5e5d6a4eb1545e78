"""Datasets: the on-disk layout (:mod:`.layout`), pairing (:mod:`.pairing`) and the three sources."""
