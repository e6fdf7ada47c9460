"""The Accelerate hook in a plain loop around a sharded model: FSDP1, FSDP2 or a DeepSpeed ZeRO-3 engine.

Usage: ``[torchrun --standalone --nproc_per_node 2] hook_engines.py ENGINE OUTPUT_DIR`` with ENGINE
one of ``plain``, ``fsdp1``, ``fsdp1-orig-params``, ``fsdp2``, ``zero3``. The model is probed at
step 0, trained for two steps and probed again by ``hook.finish``; the main process writes the
values to ``OUTPUT_DIR/mnn_metrics.jsonl``. Nine probe sequences at ``batch_size=2`` give one
process a dummy forward pass, as a shard without work must still take part in the engine's
collectives.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ENGINES = ("plain", "fsdp1", "fsdp1-orig-params", "fsdp2", "zero3")


def wrap(model, engine: str):
    """The model as the loop uses it, and its optimizer."""
    import torch
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    if engine == "zero3":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        }
        engine_model, optimizer, _, _ = deepspeed.initialize(model=model, config=config)
        return engine_model, optimizer
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
            use_orig_params=engine == "fsdp1-orig-params",
            device_id=torch.device("cpu"),
        )
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main(engine: str, output_dir: str) -> None:
    import torch
    from accelerate import Accelerator
    from helpers import random_sequences, tiny_model

    from mnn_callback import MNNAccelerateHook

    if engine not in ENGINES:
        raise SystemExit(f"ENGINE must be one of {', '.join(ENGINES)}; got {engine!r}")
    accelerator = Accelerator(cpu=True, project_dir=output_dir)  # starts the gloo group under torchrun
    model, optimizer = wrap(tiny_model("gpt2", seed=1), engine)
    hook = MNNAccelerateHook(
        accelerator,
        random_sequences(9, 3, 20, seed=3),
        every_n_steps=100,
        batch_size=2,
        strict=True,
        dashboards=False,
        jsonl=os.path.join(output_dir, "mnn_metrics.jsonl"),
    )
    hook.step(model, 0)
    batches = [torch.tensor(ids) for ids in random_sequences(4, 12, 12, seed=10 + accelerator.process_index)]
    for step, ids in enumerate(batches[:2], start=1):
        loss = model(input_ids=ids[None].repeat(2, 1), labels=ids[None].repeat(2, 1)).loss
        if engine == "zero3":
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        hook.step(model, step)
    hook.finish(model, step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
