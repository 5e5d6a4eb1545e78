"""``cellfluxrl prepare cellpose-model``: train small Cellpose models offline, from scratch."""

from __future__ import annotations

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, Folder
from cellfluxrl.commands.vocabulary import renamed


@click.command("cellpose-model", **renamed(renames={"--gpu": ["--device", "cuda"], "--cpu": ["--device", "cpu"]},
                                           positional_out=1))
@click.argument("dataset", type=Folder("dataset"))
@click.option("--out", type=Folder("models"), required=True, metavar="DIR", help="Folder for the trained model(s).")
@click.option("--target", type=click.Choice(["nuclei", "cyto", "both"]), default="both", show_default=True,
              help="Which model(s) to train: nucleus (DNA) and/or whole-cell (actin + tubulin, DNA).")
@click.option("--n-images", type=click.IntRange(min=1), default=128, show_default=True,
              help="Training crops, drawn at random from the train split.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True, help="Passes over those crops.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda or gpu (= cuda).")
def cellpose_model(dataset, out, target, n_images, epochs, seed, batch_size, device):
    """Train Cellpose 3 model(s) from scratch on DATASET's ground-truth masks into --out DIR.

    No download is involved: the networks start from random weights. DATASET must carry masks
    (a synthetic dataset). Use the results with
    `make_segmenter("cellpose", nuclei_model=OUT/cellpose_nuclei, cyto_model=OUT/cellpose_cyto)`.
    On a 2-core CPU, 256 crops x 100 epochs take roughly 5-8 hours per model (96 crops x 15 epochs:
    27 min, nucleus AP@0.5 0.92 on synthetic crops); a GPU takes minutes.
    """
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.rewards.segmentation.cellpose_backend import train_cellpose
    from cellfluxrl.rundir import hold

    gpu = None if device == "auto" else device.startswith("cuda")  # Cellpose takes a CUDA switch
    targets = ("nuclei", "cyto") if target == "both" else (target,)
    written = []
    with hold(out, "prepare cellpose-model"), StopSignals(graceful=False) as stop:  # one writer, as every prepare
        try:
            for t in targets:
                path = train_cellpose(dataset, out, target=t, n_images=n_images, n_epochs=epochs, seed=seed,
                                      batch_size=batch_size, gpu=gpu)
                written.append(str(path))
                click.echo(f"{t}: {path}")
        except KeyboardInterrupt:
            stop.exit(f"prepare cellpose-model stopped by {stop.name}: "
                      f"{'kept ' + ', '.join(written) if written else 'no model was finished'}; the model being "
                      f"trained is lost (run the same command to train it again)")
