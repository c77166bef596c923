"""Orbax checkpoints of a fine-tuning run: the adapter's weights and the optimizer state.

A checkpoint at update `step` holds everything the loop needs to continue exactly as if it
had never stopped: the data order and dropout keys are functions of (seed, step), so the
step number is the rest of the state. The base model is not saved (it is never changed).
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx


def manager(directory: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def save(mngr: ocp.CheckpointManager, step: int, adapters: nnx.Module,
         opt: nnx.Optimizer) -> None:
    state = {"adapters": nnx.to_pure_dict(nnx.state(adapters)),
             "optimizer": nnx.to_pure_dict(nnx.state(opt))}
    mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, adapters: nnx.Module,
                   opt: nnx.Optimizer) -> int:
    """Load the newest checkpoint into adapters and opt; returns its step (0: none)."""
    mngr.wait_until_finished()
    step = mngr.latest_step()
    if step is None:
        return 0
    target = {"adapters": nnx.to_pure_dict(nnx.state(adapters)),
              "optimizer": nnx.to_pure_dict(nnx.state(opt))}
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
    for obj, key in ((adapters, "adapters"), (opt, "optimizer")):
        current = nnx.state(obj)
        nnx.replace_by_pure_dict(current, state[key])
        nnx.update(obj, current)
    return step
