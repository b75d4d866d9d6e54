"""Data-parallel training of a small GPT with memengine on torch.distributed.

    torchrun --nproc-per-node 2 examples/train_ddp.py      # 2 ranks: gloo on CPU, NCCL on GPUs (one per rank)
    python examples/train_ddp.py                           # the same script as a single process

Each rank trains on its own synthetic token batches; memengine.Engine reduces the fp32 gradients across ranks
during the last micro-batch's backward, so every step's gradient is the mean over all tokens of all ranks. With
--shard (the default) each rank keeps the fp32 master weights and optimizer state of its shard only (ZeRO-1).
Needs only torch and memengine.
"""

import argparse
import functools
import gc
import os

import torch
import torch.distributed as dist

import memengine
from memengine.models.gpt import GPT

VOCAB, LENGTH = 256, 64


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per rank per step (default 16)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward/backward (default 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument(
        "--shard", action=argparse.BooleanOptionalAction, default=True, help="ZeRO-1 sharded masters (default on)"
    )
    parser.add_argument("--save", metavar="PATH", help="save a consolidated checkpoint here (from rank 0) at the end")
    return parser.parse_args()


def init_distributed():
    """Joins torchrun's process group (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment)
    or, started without torchrun, makes a group of one, so the training code below is the same either way.
    Returns the device this rank trains on."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # an in-memory store: no address or port to pick for a single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def build_model(device):
    """A small GPT with bf16 parameters (memengine keeps fp32 gradients and fp32 master weights)."""
    return GPT(vocab=VOCAB, width=128, layers=2, heads=4, length=LENGTH).to(device=device, dtype=torch.bfloat16)


def synthetic_batch(rows, generator, device):
    """Learnable token rows: each counts up by one from a random start (modulo VOCAB)."""
    starts = torch.randint(0, VOCAB, (rows, 1), generator=generator)
    return ((starts + torch.arange(LENGTH)) % VOCAB).to(device)


def main():
    args = parse_arguments()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    # Every rank builds the same model; the Engine broadcasts rank 0's parameters anyway, so they start identical.
    torch.manual_seed(0)
    model = build_model(device)
    engine = memengine.Engine(
        model,
        functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.1),
        micro_batch_size=args.micro_batch_size,
        max_norm=1.0,
        process_group=dist.group.WORLD,
        shard=args.shard,
    )

    # Different data on every rank: seeded by the rank.
    generator = torch.Generator().manual_seed(1000 + rank)
    for step in range(1, args.steps + 1):
        tokens = synthetic_batch(args.batch_size, generator, device)
        # The default loss is memengine.causal_lm_loss: next-token cross-entropy, summed, with its token count.
        stats = engine.step(tokens)
        if rank == 0:  # stats["loss"] is the mean over all ranks' tokens: the same number on every rank
            print(
                f"step {step} loss {stats['loss'].item():.4f} grad_norm {stats['grad_norm'].item():.4f} "
                f"tokens {int(stats['tokens'].item())} world {world}",
                flush=True,
            )

    if args.save:
        state = engine.consolidated_state_dict()  # a collective: every rank gathers its shard
        if rank == 0:
            torch.save(state, args.save)  # loads into an Engine on any number of ranks, or a single process
            print(f"saved {args.save}", flush=True)
    # The Engine holds the process group (its reducer and ZeRO-1 optimizer): drop it before destroying the group,
    # so that gloo's objects are not torn down at interpreter exit instead (seen: an abort, "terminate called
    # without an active exception", after a successful run).
    del engine
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
