"""A tiny GPT-2 trained by PyTorch Lightning with MNNLightningCallback (or without: --no-monitor).

Usage: ``python lightning_run.py OUT [--no-monitor]``, or under ``torchrun --nproc_per_node 2``
(Lightning's DDP strategy, gloo on CPU). Writes ``OUT/weights.pt`` (the trained weights, rank 0).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(out: str, monitor: bool) -> None:
    import lightning
    import torch
    from helpers import PROBE_DATA, random_sequences, tiny_lightning_module

    from mnn_callback.adapters.lightning import MNNLightningCallback

    lightning.seed_everything(0, verbose=False)
    data = torch.tensor(random_sequences(48, 12, 12, seed=1))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    callbacks = [MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=3, batch_size=2)] if monitor else []
    trainer = lightning.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = tiny_lightning_module()
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        os.makedirs(out, exist_ok=True)
        torch.save(module.model.state_dict(), os.path.join(out, "weights.pt"))


if __name__ == "__main__":
    main(sys.argv[1], "--no-monitor" not in sys.argv)
