"""One process of a 2-process mask-training run on a tiny model; launched by ``tests/test_distributed.py``.

``accelerate launch --multi_gpu --num_processes 2 tests/distributed_train.py OUT_DIR ddp|fsdp2`` (without GPUs the
processes run on the CPU with the gloo backend). ``ddp``: ``Trainer`` under Accelerate; ``fsdp2``: ``fully_shard``
in a plain loop. Every rank writes ``OUT_DIR/rank<r>.pt`` with its logits before and after training; rank 0 saves
the adapter (with logits) to ``OUT_DIR/adapter``. A checkpoint of the last step, written with ``save_logits=False``
and completed with the float logits by ``MaskScheduleCallback`` (``ddp``: ``OUT_DIR/trainer/checkpoint-<STEPS>``)
or by ``save_checkpoint_logits`` on every rank (``fsdp2``: ``OUT_DIR/checkpoint``), holds the logits too.
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer

from conftest import tiny_llama
from sparse_peft import MaskConfig, MaskScheduleCallback, update_mask_schedule
from sparse_peft.schedule import save_checkpoint_logits
from sparse_peft.training import mask_training_arguments


def logits_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "maskllm_logits" in n}


def build_model():
    return get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM", save_logits=True))


def token_rows() -> list[list[int]]:
    return torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0)).tolist()


def train_with_trainer(out_dir: Path) -> None:
    """DDP through ``Trainer`` + Accelerate (on CPU: gloo)."""
    model = build_model()
    model.peft_config["default"].save_logits = False  # the checkpoint gets its logits from MaskScheduleCallback
    dataset = Dataset.from_dict({"input_ids": token_rows(), "labels": token_rows()})
    args = mask_training_arguments(
        str(out_dir / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=STEPS,
    )
    initial = logits_of(model)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[MaskScheduleCallback()])
    trainer.train()
    report(out_dir, trainer.args.process_index, type(trainer.model_wrapped).__name__, initial, logits_of(trainer.model))
    model.peft_config["default"].save_logits = True
    trainer.save_model(str(out_dir / "adapter"))  # writes from the main process only


def train_with_fsdp2(out_dir: Path) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder block, in a plain loop (Trainer cannot shard on
    CPU)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model()
    initial = logits_of(model)
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    rows = torch.tensor(token_rows())
    model.train()
    for step in range(STEPS):
        update_mask_schedule(model, step, STEPS)
        batch = rows[2 * (step * world + rank) : 2 * (step * world + rank) + 2]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # gathered on every rank
    final = {n: t.detach().cpu().clone() for n, t in full.items() if "maskllm_logits" in n}
    report(out_dir, rank, type(model).__name__, initial, final)
    if rank == 0:
        model.save_pretrained(str(out_dir / "adapter"), state_dict=full)
        model.peft_config["default"].save_logits = False
        model.save_pretrained(str(out_dir / "checkpoint"), state_dict=full)
    dist.barrier()
    save_checkpoint_logits(model, out_dir / "checkpoint", is_main_process=rank == 0)  # gathers: every rank calls it
    dist.barrier()
    dist.destroy_process_group()


def report(out_dir: Path, rank: int, wrapper: str, initial: dict, final: dict) -> None:
    torch.save({"wrapper": wrapper, "initial": initial, "final": final}, out_dir / f"rank{rank}.pt")


STEPS = 4

if __name__ == "__main__":
    {"ddp": train_with_trainer, "fsdp2": train_with_fsdp2}[sys.argv[2]](Path(sys.argv[1]))
