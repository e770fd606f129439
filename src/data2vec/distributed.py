"""Multi-process pretraining under torchrun: DDP or FSDP, rank-0 side effects, RNG per rank.

Every process runs the same `train()`. The hooks here keep the single-process loop intact:

- `setup` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
  gloo on CPU, nccl on CUDA (each rank on `cuda:LOCAL_RANK`).
- `Dist.wrap` puts the model in DistributedDataParallel (only parameters that need gradients,
  i.e. the student, are synchronised; the EMA teacher is a plain copy on every rank and stays
  identical because it follows identical student weights) or, with `train.fsdp`, shards it
  with FSDP2 (`fully_shard` per block, student and teacher alike).
- Data: rank r of N reads micro-batches r, r + N, r + 2N, ... of the stream a single process
  would read (`ResumableBatchSampler` and `AudioBatchSampler` take rank and world size). So N
  processes with `data.batch_size` B and `train.grad_accum` G see exactly the samples, crops
  and masks of one process with batch B and grad_accum N*G: a global batch of N*G*B.
  Gradients are averaged across ranks, as grad_accum averages across micro-batches, so the
  two runs give the same weights up to float rounding (tests/test_distributed.py). Random
  numbers drawn inside the model (dropout, drop-path, the 2.0 decoder's noise) come from each
  rank's own stream, so with those on the runs agree in distribution, not bit for bit.
- Files (log, metrics, checkpoints, plots, summary) are written by rank 0; the others wait at
  a barrier after each checkpoint. Loss metrics are averaged across ranks before anything
  looks at them, so every rank takes the same decision on NaN, collapse and rewind.
- Checkpoints hold every rank's RNG state, so a resumed run continues each rank's stream.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from data2vec.config import ConfigError, RunConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; `Dist()` is a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when `setup` created the process group (and `close` should end it)."""
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ set-up

    def device(self, device: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK (and make it current); cpu unchanged."""
        if self.enabled and device.type == "cuda":
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
            return dev
        return device

    def seed(self, seed: int) -> None:
        """After building the model (identical on every rank): give each rank its own random
        stream for dropout and friends. Rank 0 keeps the single-process stream."""
        if self.enabled and self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    def wrap(self, model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
        """The module the training step calls: `model` itself, a DDP wrapper or (FSDP) `model`
        sharded in place. `find_unused_parameters`: some parameters may get no gradient in a step
        (blocks skipped by LayerDrop; a joint model's other modalities)."""
        if not self.enabled:
            return model
        if self.fsdp:
            shard_model(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )

    # ------------------------------------------------------------------ the step

    def accumulating(self, step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around forward + backward of a micro-batch: skip the gradient all-reduce on all but
        the last micro-batch of an optimizer step (DDP `no_sync`)."""
        no_sync = getattr(step_model, "no_sync", None)
        if self.enabled and not last and no_sync is not None and not self.fsdp:
            cm: contextlib.AbstractContextManager[Any] = no_sync()
            return cm
        return contextlib.nullcontext()

    def mean_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Average the step's metrics over ranks (same keys on every rank), so every rank sees
        the same numbers and takes the same decisions."""
        if not self.enabled:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        values = (t / self.world_size).tolist()
        return {k: float(v) for k, v in zip(keys, values, strict=True)}

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks (e.g. whether any rank received a stop signal)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def grad_norm_value(self, norm: Tensor) -> float:
        """`clip_grad_norm_`'s result as a float (FSDP returns a DTensor)."""
        full = getattr(norm, "full_tensor", None)
        return float(full() if full is not None else norm)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_parts(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """(student weights, teacher weights, optimizer state), whole, for rank 0 to write.
        Collective under FSDP (shards are gathered)."""
        if self.fsdp and self.enabled:
            sd = full_state_dict(model)
            student = {k: v for k, v in sd.items() if not k.startswith("teacher.")}
            teacher = {k: v for k, v in sd.items() if k.startswith("teacher.")}
            return student, teacher, full_optimizer_state(model, optimizer)
        sd = model.state_dict()
        student = {k: v for k, v in sd.items() if not k.startswith("teacher.")}
        teacher = {k: v for k, v in sd.items() if k.startswith("teacher.")}
        return student, teacher, optimizer.state_dict()

    def load_checkpoint(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, Tensor],
        optim_state: dict[str, Any],
    ) -> None:
        """Weights (strict) and optimizer state from a whole checkpoint; every rank reads it."""
        if self.fsdp and self.enabled:
            load_full_state(model, optimizer, weights, optim_state)
            return
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim_state)

    # ------------------------------------------------------------------ side effects

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its (picklable) result to every rank."""
        if not self.enabled:
            return fn()
        box: list[Any] = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        result: T = box[0]
        return result

    def rng_states(self) -> dict[str, Any]:
        """Every rank's CPU (and CUDA) RNG state, for rank 0's checkpoint. Collective."""
        if not self.enabled:
            return {}
        mine: dict[str, Tensor] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            mine["cuda"] = torch.cuda.get_rng_state()
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return {"rng_ranks": everyone}

    def restore_rng(self, state: dict[str, Any]) -> None:
        """After the single-process restore: this rank's own stream, if the checkpoint has it
        (a run resumed with more processes than it had seeds the new ranks afresh)."""
        if not self.enabled:
            return
        ranks = state.get("rng_ranks")
        if ranks and self.rank < len(ranks):
            torch.set_rng_state(ranks[self.rank]["cpu"])
            if "cuda" in ranks[self.rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(ranks[self.rank]["cuda"])
        elif self.rank > 0:
            torch.manual_seed(int(state.get("step", 0)) * 7919 + self.rank)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device, fsdp: bool = False) -> Dist:
    """Join the torchrun process group (or the one the caller already made); single process
    when WORLD_SIZE is unset or 1."""
    if dist.is_available() and dist.is_initialized():
        return Dist(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            False,
            fsdp,
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(fsdp=fsdp)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return Dist(rank, world, local, True, fsdp)


def check_fsdp(cfg: RunConfig, d: Dist, has_init: bool = False) -> None:
    """`train.fsdp` needs a multi-process run (torchrun) and a fresh or resumed run."""
    if not cfg.train.fsdp:
        return
    if not d.enabled:
        raise ConfigError("train.fsdp: needs several processes; launch with torchrun --nproc-per-node N")
    if has_init:
        raise ConfigError("train.fsdp: --init is not supported with FSDP; start with DDP (train.fsdp=false)")


def finish() -> None:
    """End the process group, if any (the CLI, after training). Every rank first waits for the
    others: a gloo rank that tears its group down while a peer is still in a collective (rank 0
    writing the last checkpoint) can abort at exit. Models wrapped in DDP hold the group too;
    when a reference cycle keeps one alive, the group would be freed during interpreter
    shutdown, with gloo's threads still holding tensors, and the rank aborts ("terminate called
    without an active exception"). Collecting first frees them while Python is whole."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or no process group at all."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- FSDP


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    from data2vec.nn.transformer import Block

    for m in module.modules():
        if isinstance(m, Block):
            yield m


def shard_model(model: nn.Module) -> None:
    """FSDP2: each Transformer block (student and teacher) is its own unit, the rest of the
    model one root unit. The teacher's shards line up with the student's, so the EMA update
    works shard by shard without gathering."""
    from torch.distributed.fsdp import fully_shard

    for blk in _blocks(model):
        fully_shard(blk)
    fully_shard(model)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict as plain CPU tensors (FSDP: gathered; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd: dict[str, Any] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd: dict[str, Any] = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return osd


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor], optim_state: dict[str, Any]
) -> None:
    """Load a full (unsharded) checkpoint into a sharded model and its optimizer. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, dict[str, Any](weights), options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
