"""Segmentation artefacts of sampled images: spurious nuclei and DNA-channel speckle (RESULTS.md,
"Longer RL, finer sampling and the collapse").

    cellfluxrl sample RUN --n 64 --out samples.npz
    python experiments/nucleus_artefacts.py samples.npz [more.npz ...] [--targets]

For each ``cellfluxrl sample`` file (and with ``--targets`` also its real target images), segments
the images with the classical segmenter and prints: nuclei per image, the share of nuclei under
``--small`` px, the share of nuclei lying mostly (> 50 % of their pixels) outside every cell, and the
DNA channel's high-frequency energy, the mean of ``|DNA - its 3x3 box mean|`` on the [-1, 1] scale
(noise speckle raises it; real crops of the synthetic data: about 0.03).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage


def artefacts(nuclei: np.ndarray, cells: np.ndarray, dna: np.ndarray, small: int) -> dict[str, float]:
    """Statistics of one batch: label images ``(B, H, W)`` int, DNA channel ``(B, H, W)`` float in [-1, 1]."""
    counts, areas, outside = [], [], []
    for nuc, cell in zip(nuclei, cells):
        labels = np.unique(nuc)
        labels = labels[labels > 0]
        counts.append(labels.size)
        for label in labels:
            mask = nuc == label
            areas.append(int(mask.sum()))
            outside.append(float((cell[mask] == 0).mean()) > 0.5)
    areas_arr = np.asarray(areas)
    high = np.abs(dna - ndimage.uniform_filter(dna, size=(1, 3, 3))).mean()
    return {"nuclei_per_image": float(np.mean(counts)),
            "small_share": float((areas_arr < small).mean()) if areas_arr.size else float("nan"),
            "outside_share": float(np.mean(outside)) if outside else float("nan"),
            "dna_high_freq": float(high)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", type=Path, nargs="+", help="files written by `cellfluxrl sample --out`")
    p.add_argument("--targets", action="store_true", help="also measure the real targets of the first file")
    p.add_argument("--small", type=int, default=30, help="area (px) under which a nucleus counts as a fragment")
    args = p.parse_args(argv)
    from cellfluxrl.rewards.segmentation.factory import make_segmenter

    segmenter = make_segmenter("classical")
    jobs = [(str(f), "generated") for f in args.samples]
    if args.targets:
        jobs.insert(0, (str(args.samples[0]), "targets"))
    print(f"| images | nuclei / image | nuclei < {args.small} px | nuclei mostly outside cells | DNA high-freq |")
    print("|---|---|---|---|---|")
    for path, key in jobs:
        x = np.load(path)[key].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        nuclei, cells = segmenter.segment(x)
        a = artefacts(nuclei, cells, x[:, 2], args.small)
        print(f"| {path} {key} | {a['nuclei_per_image']:.2f} | {a['small_share']:.2f} | {a['outside_share']:.2f} | "
              f"{a['dna_high_freq']:.3f} |")


if __name__ == "__main__":
    main()
