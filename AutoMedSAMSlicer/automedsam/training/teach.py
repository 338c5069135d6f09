"""Teach classes in a running session: train a prompt network from labels drawn on the session's
volume (a few slices are enough) with the session engine's own backbone. :meth:`Engine.teach
<automedsam.engine.Engine.teach>` runs it (in this process, or in a worker for a remote engine)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ..contract import DEFAULT_PROMPT_NETWORK, TEACH_DECODER_LR, TEACH_EPOCHS, TEACH_NAME, TEACH_VAL_SLICES
from ..errors import InvalidInputError
from ..framing import frame_slices, teaching_framing
from ..orientation import CANONICAL
from ..preprocess import IntensityConfig
from .data import Case
from .loop import TrainConfig, TrainEvent, train


def labelled_slices(labels: np.ndarray) -> list[int]:
    """Slices k of a ``(K, J, I)`` label map that carry any label."""
    return [int(k) for k in np.nonzero(np.asarray(labels).reshape(labels.shape[0], -1).any(axis=1))[0]]


def teach_config(engine, classes: dict[str, int], *, prompt_network: str = DEFAULT_PROMPT_NETWORK,
                 epochs: int = TEACH_EPOCHS, train_slices: str | None = None, val_slices: str | None = TEACH_VAL_SLICES,
                 lr: float | None = None, decoder_lr: float = TEACH_DECODER_LR, name: str = TEACH_NAME) -> TrainConfig:
    """A :class:`TrainConfig` on ``engine``'s backbone (same id, same weights or random seed)."""
    weights = engine.backbone.weights_fingerprint
    random = weights.startswith("random:")
    return TrainConfig(
        classes=dict(classes), prompt_network=prompt_network, backbone=engine.backbone.id,
        weights="random" if random else None, device=str(engine.backbone.device), epochs=epochs, lr=lr,
        decoder_lr=decoder_lr, train_slices=train_slices, val_slices=None if train_slices else val_slices, name=name,
        seed=int(weights.split("=")[1]) if random else 0, intensity=engine.intensity or IntensityConfig.ct())


def teach(engine, labels: np.ndarray, config: TrainConfig, cancel=None) -> Iterator[TrainEvent]:
    """Train on ``engine``'s volume with ``labels`` (``(K, J, I)`` label values on its grid).

    Training runs on the engine's own backbone and reads the embeddings the engine already has
    (slices it has not encoded yet are encoded into its store, so a later segment finds them). The
    final ``done`` event carries the bundle; nothing in ``engine`` changes but its embeddings (see
    :meth:`automedsam.engine.Engine.teach`, which saves the bundle and switches to it).
    """
    volume = engine.require_volume()
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape[:3]:
        raise InvalidInputError(f"labels {labels.shape} are not on the volume grid {volume.array.shape[:3]}")
    labels = volume.with_array(labels.astype(np.uint16))
    name = volume.name or "session"
    store = engine.store
    if engine.slice_orientation == CANONICAL:
        o = engine.orientation
        case = Case(store.volume, o.volume(labels), name, o)
    else:  # a bundle taught before orientation was recorded: its slices are not the new bundle's
        case = Case(volume, labels, name)
    # Learn at the pixel size the session's slices are shown at, so the new bundle keeps them.
    framing = (store.framing if store.framing.pixel_mm is not None
               else teaching_framing([case.canonical().image], engine.backbone.input_size))
    config = dataclasses.replace(config, framing=framing)
    framed = frame_slices(engine.backbone, store.volume, framing, store.intensity)
    shared = (engine.slice_orientation == CANONICAL and store.intensity == config.intensity
              and framed.describe() == store.transform.describe())
    # Where the engine's model slices are the ones training learns from, it reads their embeddings.
    yield from train(config, [case], cancel=cancel, backbone=engine.backbone, stores=[store] if shared else None)
