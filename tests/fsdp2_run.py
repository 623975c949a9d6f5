"""One FSDP2 run for tests/test_fsdp2.py: ``torch.distributed.run --nproc_per_node N tests/fsdp2_run.py OUT METHOD``.

Every rank builds the same tiny Llama and method, shards the decoder layers and then the whole
``PStarModel`` with torch's ``fully_shard`` (gloo, CPU), trains 3 steps on its share of a fixed
8-row mixed-task batch, and saves the adapter through the library's gathered save while recording
every DTensor gathered. Rank 0 writes OUT/adapter.safetensors and OUT/run.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(out: Path, method: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pstar_plugins import build_model
    from pstar_plugins.mechanisms import distributed
    from pstar_plugins.testing.architectures import tiny_model
    from tests.helpers import METHOD_OPTIONS, random_batch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    options = {**METHOD_OPTIONS[method], "num_tasks": 2}
    if method == "prompt-tuning":
        options["init"] = "vocab"  # reads embedding rows (before sharding, as Accelerate builds then prepares)

    def sharded():
        torch.manual_seed(0)
        model = build_model(tiny_model("llama"), method, **options).train()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        # the root group: embeddings, final norm, LM head and the method's tensors. The prompt is
        # read inside PStarModel.forward, whose pre-forward hook unshards the root group.
        fully_shard(model, mesh=mesh)
        return model

    model = sharded()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(isinstance(p, DTensor) for p in trainable + frozen), "fully_shard made every parameter a DTensor"
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = random_batch(8, 9, seed=0)
    task_ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    labels = torch.arange(8) % 3 if method == "p-tuning-v2" else ids  # its head takes classes
    losses = []
    for _ in range(3):
        loss = model(
            input_ids=ids[mine], attention_mask=torch.ones_like(ids[mine]), labels=labels[mine], task_ids=task_ids[mine]
        ).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients (their mean over the ranks)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)

    # the save gathers the method's DTensors and nothing else
    gathered_shards = []
    kept = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        gathered_shards.append(self.to_local().untyped_storage().data_ptr())
        return kept(self, *args, **kwargs)

    DTensor.full_tensor = recording
    try:
        state = model.trainable_state()
    finally:
        DTensor.full_tensor = kept
    frozen_shards = {p.to_local().untyped_storage().data_ptr() for p in frozen}
    trainable_shards = {p.to_local().untyped_storage().data_ptr() for p in trainable}

    # rows of the sharded embedding, read without gathering it
    embedding = model.base_model.get_input_embeddings()
    rows = distributed.embedding_rows(embedding, torch.tensor([5, 0, 95, 40]))
    whole = embedding.weight.full_tensor()  # for the comparison only
    rows_exact = bool(torch.equal(rows, whole[[5, 0, 95, 40]].float()))

    # a fresh sharded model takes the saved state back (resume / load_adapter)
    again = sharded()
    again.load_trainable_state(state)
    reloaded = again.trainable_state()
    reload_exact = all(torch.equal(reloaded[k], state[k]) for k in state)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter.safetensors"))
        (out / "run.json").write_text(
            json.dumps(
                {
                    "world": world,
                    "losses": losses,
                    "gathered": len(gathered_shards),
                    "gathered_frozen": len(set(gathered_shards) & frozen_shards),
                    "gathered_trainable": len(set(gathered_shards) & trainable_shards),
                    "trainable": len(trainable),
                    "rows_exact": rows_exact,
                    "reload_exact": reload_exact,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
