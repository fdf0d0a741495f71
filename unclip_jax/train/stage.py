"""The stage contract: what a stage gives the trainer — its model, its loss, its batches and
its record — nothing else. It lives beside the trainer; the stages (`unclip_jax.stages`) import
it, and nothing here imports them: `train(stage, config, workdir)` is handed its stage.

A stage never imports another stage; a stage that needs another's model (the prior and the
decoder need CLIP) reads that stage's checkpoint directory as *frozen* inputs.
"""
from __future__ import annotations

import abc
import json
from typing import Any, Iterator

import flax.linen as nn
import numpy as np

from unclip_jax.workdir import StageRecord


class Stage(abc.ABC):
    """One trainable part of unCLIP.

    Batches are dicts of numpy arrays with a leading batch axis. The trainer shards them over the
    mesh's (data, fsdp) axes and calls `loss` inside its jitted step.
    """

    name: str = "stage"

    def __init__(self, config):
        self.config = config

    def config_json(self) -> dict[str, Any]:
        """The training config as JSON (kept in the stage record)."""
        return json.loads(self.config.to_json_best_effort())

    # -- model ------------------------------------------------------------------------------
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The Flax module whose params are trained."""

    @abc.abstractmethod
    def record(self) -> StageRecord:
        """The stage record written beside the checkpoints (model config, sampling defaults,
        data facts, paths, the training config): what loading the trained stage needs."""

    @abc.abstractmethod
    def init_variables(self, rng, batch: dict[str, Any]) -> dict[str, Any]:
        """`model().init(...)` on a (dummy) batch: the boxed variables, {'params': ...}."""

    def trainable(self, params) -> Any | None:
        """A bool tree (True = trained) or None when every parameter is trained."""
        return None

    def post_init(self, params, batches: Iterator[dict]) -> Any:
        """Host-side adjustment of freshly (randomly) initialised params (e.g. data
        statistics). Never called on imported params (`config.init_from`): their statistics
        are the source's."""
        return params

    def write_files(self, stage_dir: str) -> None:
        """Write the stage's own files into its directory (e.g. the AR prior's codebook taken
        from its `config.init_from` source). The trainer calls it once every check of the run
        has passed (the import of `config.init_from` included), before it writes the record."""

    # -- frozen inputs ----------------------------------------------------------------------
    def frozen(self) -> tuple[Any, Any] | None:
        """(boxed abstract variables, params) of frozen models used by the loss, or None."""
        return None

    # -- loss -------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params, batch: dict[str, Any], rng, frozen) -> tuple[Any, dict[str, Any]]:
        """Scalar loss and a dict of scalar metrics, for one (micro-)batch. Pure, jit-able."""

    # -- data -------------------------------------------------------------------------------
    @abc.abstractmethod
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (zeros)."""

    @abc.abstractmethod
    def batches(self, *, batch_size: int, seed: int, start_step: int, process_index: int,
                process_count: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Host-local batches (batch_size = per-host size) from `start_step` on, in the same
        order a run from step 0 would see them, each with the number of examples skipped
        (undecodable / empty) while it was made."""

    # -- pictures ---------------------------------------------------------------------------
    def sample_images(self, params, frozen, rng) -> np.ndarray | None:
        """A few generated images (float [N, H, W, 3] in [0, 1]) for the logs, or None.
        Sampled as the pipeline samples the trained stage (its record's sampling defaults)."""
        return None

    def flops_per_example(self) -> float | None:
        """Model FLOPs of one training example (forward + backward), or None to use XLA's
        cost analysis of the compiled step."""
        return None
