"""Teaching a class: train a prompt network (and optionally the mask decoder) on a frozen encoder.

``train(config, cases)`` is a generator of :class:`TrainEvent` (prepare, encode, step, epoch,
validate, checkpoint, done / cancelled). Validation runs the engine's automatic segmentation
(:class:`~automedsam.automatic.LearnedPrompts`) on the held-out slices with the weights of the
moment, so the reported DSC/NSD are exactly what ``automedsam segment --no-cleanup`` reproduces
with the written bundle (the best epoch's weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..classes import canonical_class_mapping, check_classes_present
from ..contract import DEFAULT_PROMPT_NETWORK, TEACH_DECODER_LR, TEACH_EPOCHS, TEACH_VAL_SLICES, TrainEvent
from ..errors import InvalidInputError, TrainingFailedError
from ..framing import Framing, teaching_framing
from ..models import DEFAULT_BACKBONE
from ..preprocess import IntensityConfig
from ..rescue import rescue_folder
from .data import AugmentConfig, Case, encode_training_items, split_slices

if TYPE_CHECKING:
    from ..backbones import Backbone
    from ..embeddings import EmbeddingStore

log = logging.getLogger(__name__)

RECIPES = {
    # Class-map network: per-pixel CE + Dice, no decoder in the loop (see generators/classmap.py).
    "classmap": {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8},
    # Sam2Rad sec. 4.3: AdamW, weight decay 0.1, lr 1e-4 (PPN) and 1e-5 (decoder), batch 4.
    "ppn": {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8},
    # AutoMedSAM: AdamW lr 5e-4, betas (0.9, 0.999), eps 1e-8; reduce-on-plateau factor 0.9, patience 5.
    "diffusion": {"lr": 5e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8},
}


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Attributes:
        classes: class name -> label value in the label maps.
        prompt_network: ``"classmap"`` (default), ``"ppn"`` or ``"diffusion"``.
        backbone: backbone id (default LiteMedSAM); ``weights``: "random", None (cached) or a file.
        cpu_runtime: how the CPU runs the frozen image encoder while training encodes slices
            (:class:`~automedsam.backbones.registry.Runtime`; ``auto``: the compiled one segmentation
            uses, whose embeddings are checked against PyTorch's when it is compiled); the prompt
            network and the decoder in the loop always run in PyTorch.
        val_slices: held-out slice selection (``0::3``) applied to every case; ``val_cases``:
            indices of cases held out whole; ``train_slices``: instead, the slices to learn from
            (all others validate: "teach from a few slices").
        lr: prompt network learning rate (None: the recipe's); ``decoder_lr`` when ``finetune_decoder``
            (off by default: the frozen pretrained decoder measured best, see the README).
        negative_ratio: absent-class samples per present-class sample (objectness training).
        framing: the model pixel size to learn at (None: the coarsest at which every case's slices
            fit whole, :func:`automedsam.framing.teaching_framing`); recorded in the bundle, which
            frames every volume it segments the same way.
    """

    classes: dict[str, int]
    prompt_network: str = DEFAULT_PROMPT_NETWORK
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    device: str = "auto"
    cpu_runtime: str = "auto"
    epochs: int = TEACH_EPOCHS
    batch_size: int = 4
    lr: float | None = None
    decoder_lr: float = TEACH_DECODER_LR
    finetune_decoder: bool = False
    val_slices: str | None = TEACH_VAL_SLICES
    val_cases: tuple[int, ...] = ()
    train_slices: str | None = None
    negative_ratio: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig.ct)
    framing: Framing | None = None
    seed: int = 0
    cache_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    validate_every: int = 1
    tolerance_mm: float = 2.0
    name: str = "automedsam-model"

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", canonical_class_mapping(self.classes))
        if self.prompt_network not in RECIPES:
            raise InvalidInputError(f"prompt_network must be one of {', '.join(RECIPES)}, got {self.prompt_network!r}")
        if self.prompt_network == "classmap" and self.finetune_decoder:
            raise InvalidInputError("the classmap prompt network trains without the mask decoder in the loop, so it "
                                    "cannot fine-tune it; keep the decoder frozen or use ppn / diffusion")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInputError("epochs and batch size must be >= 1")
        if self.resume and not self.checkpoint_dir:
            raise InvalidInputError("--resume continues from a checkpoint: give the --checkpoint-dir an earlier run "
                                    "wrote its checkpoints to")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["intensity"] = self.intensity.to_dict()
        return d


def check_checkpoint_dir(folder: str | Path | None, resume: bool = False) -> Path | None:
    """Check the checkpoint folder before any work (it is created if missing): a folder that can
    be written, and with ``resume`` one that holds ``last.pt`` (else the run would start over
    without saying so).

    Raises:
        InvalidInputError: says what to change.
    """
    if folder is None:
        return None
    from ..io import writable_folder

    path = writable_folder(folder, "--checkpoint-dir", "the checkpoints")
    if resume and not (path / "last.pt").is_file():
        raise InvalidInputError(f"--resume: {path} holds no checkpoint (last.pt); run without --resume to start, or "
                                "give the folder an earlier run wrote to")
    return path


def train_cache_dir(config: TrainConfig) -> Path:
    """Where encoded training items are kept (``cache_dir`` or ``$AUTOMEDSAM_HOME/train-cache``)."""
    from ..models import automedsam_home

    return Path(config.cache_dir) if config.cache_dir else automedsam_home() / "train-cache"


def embedding_cache_dir(config: TrainConfig) -> Path:
    """The engine embedding cache shared by validation and later segmentation of the same volumes."""
    return train_cache_dir(config) / "embeddings"


def _samples(labels: np.ndarray, values: list[int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(item, class) pairs: every present pair, plus ``ratio`` x as many absent pairs."""
    present = np.stack([(labels == v).any(axis=(1, 2)) for v in values], axis=1)  # (n, C)
    pos = np.argwhere(present)
    neg = np.argwhere(~present)
    n_neg = min(len(neg), round(ratio * len(pos)))
    if n_neg:
        neg = neg[rng.choice(len(neg), n_neg, replace=False)]
    pairs = np.concatenate([pos, neg[:n_neg]]) if n_neg else pos
    return pairs[rng.permutation(len(pairs))]


def train(config: TrainConfig, cases: list[Case], cancel=None, *, backbone: Backbone | None = None,
          stores: Sequence[EmbeddingStore | None] | None = None) -> Iterator[TrainEvent]:
    """Train and yield events; the final ``done`` event carries the bundle (best validation epoch).

    ``backbone``: the backbone to learn on (a session's; default: the registry's ``config.backbone``
    with PyTorch throughout). It is not changed: training works on its
    :meth:`~automedsam.backbones.base.Backbone.trainable` view. ``stores``: per case, the embeddings
    already at hand (a session's store of the case's canonical image, same intensity), which training
    and validation read instead of encoding those slices again; None where there are none.
    """
    import torch

    from ..automatic import LearnedPrompts
    from ..backbones.registry import Runtime, default_registry
    from ..bundle import create_bundle
    from ..classes import resolve_class
    from ..embeddings import EmbeddingStore
    from ..prompt_networks import build_prompt_network, default_config
    from .losses import DIFFUSION_TERMS, UncertaintyWeights

    check_checkpoint_dir(config.checkpoint_dir, config.resume)  # before hours of encoding, not after
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    cases = [case.canonical() for case in cases]  # the slices the bundle's manifest says it learnt from
    names, values = list(config.classes), list(config.classes.values())
    classes = [resolve_class(n) for n in names]
    lateral = any(c.type_modifier is not None for c in classes)
    for case in cases:
        missing = [n for n, v in config.classes.items() if not (case.labels.array == v).any()]
        if len(missing) == len(names):
            raise InvalidInputError(f"none of the classes {names} (values {values}) occurs in {case.name}'s labels")
    check_classes_present(config.classes, [c.labels.array for c in cases],
                          "the label maps" if len(cases) > 1 else f"{cases[0].name}'s label map")
    split = split_slices(cases, config.val_slices, list(config.val_cases), config.train_slices)
    if backbone is None:
        # The encoder segmentation uses (compiled on the CPU: 5-8x faster than PyTorch's here, and
        # the features the bundle will be applied to); gradients go through PyTorch's decoder.
        backbone = default_registry().backbone(config.backbone, weights=config.weights, seed=config.seed,
                                               runtime=Runtime(config.device, config.cpu_runtime))
    if config.prompt_network != "classmap":
        # Gradients flow through the decoder (PyTorch's); a fine-tuned one is the view's own copy.
        # The class map learns without the decoder, so validation decodes with the compiled one
        # (PyTorch's single-threaded decoder took 1.3 s a slice here, most of an epoch).
        backbone = backbone.trainable(config.finetune_decoder)
    stores = list(stores) if stores is not None else [None] * len(cases)
    if len(stores) != len(cases):
        raise ValueError(f"{len(stores)} embedding stores for {len(cases)} cases")
    device = backbone.device
    framing = config.framing or teaching_framing([c.image for c in cases], backbone.input_size)
    yield TrainEvent("prepare", epochs=config.epochs, message=f"{config.prompt_network} on {backbone.id} ({device})")

    cache_root = train_cache_dir(config)
    result = None
    t_encode = time.perf_counter()
    by_case = {id(case): store for case, store in zip(cases, stores, strict=True)}
    known = [by_case.get(id(s.case)) for s in split]
    for item in encode_training_items(split, backbone, config.intensity, framing, config.augment, lateral,
                                      config.seed, cache_root, known):
        if isinstance(item[0], int):
            yield TrainEvent("encode", step=item[0], steps=item[1], message="encoding training slices")
            if cancel is not None and cancel.is_set():
                yield TrainEvent("cancelled", message="cancelled while encoding; no bundle written")
                return
        else:
            result = item
    data, labels, _meta = result
    encode_seconds = round(time.perf_counter() - t_encode, 1)

    kind = config.prompt_network
    prompt_network = build_prompt_network(kind, default_config(kind, backbone, len(names))).to(device)
    weighting = UncertaintyWeights(DIFFUSION_TERMS).to(device) if config.prompt_network == "diffusion" else None
    recipe = RECIPES[config.prompt_network]
    groups = [{"params": list(prompt_network.parameters()), "lr": config.lr or recipe["lr"]}]
    if weighting is not None:
        groups[0]["params"] += list(weighting.parameters())
    if config.finetune_decoder:
        groups.append({"params": list(backbone.mask_decoder.parameters()), "lr": config.decoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe["weight_decay"], betas=recipe["betas"],
                                  eps=recipe["eps"])
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.9, patience=5)
                 if config.prompt_network == "diffusion" else None)
    validators = []
    for s, at_hand in zip(split, known, strict=True):
        if s.val_slices:
            if at_hand is not None:  # the session's embeddings, decoded with the decoder being trained
                store = at_hand.sharing(backbone)
            else:
                # Same intensity as training; embeddings cached on disk, so a later segment of the
                # same volume (the demo, a rerun) does not encode the held-out slices again.
                store = EmbeddingStore(backbone, cache_dir=str(embedding_cache_dir(config)))
                store.set_volume(s.case.image, config.intensity, framing)
            validators.append((LearnedPrompts(store, result_cache_bytes=0), s))

    start_epoch, best, history = 1, None, []
    run = {"classes": config.classes, "generator": config.prompt_network, "backbone": backbone.id,
           "weights": backbone.weights_fingerprint, "finetune_decoder": config.finetune_decoder}
    ckpt_path = Path(config.checkpoint_dir) / "last.pt" if config.checkpoint_dir else None
    if config.resume and ckpt_path is not None and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, run)
        try:
            prompt_network.load_state_dict(state["generator"])
            if config.finetune_decoder:  # else the decoder is the shared backbone's own: never written
                backbone.mask_decoder.load_state_dict(state["decoder"])
            if weighting is not None:
                weighting.load_state_dict(state["weighting"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InvalidInputError(f"checkpoint {ckpt_path} does not fit this run ({exc}); resume with the options "
                                    "it was written with, or give another --checkpoint-dir") from None
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        yield TrainEvent("checkpoint", epoch=state["epoch"], epochs=config.epochs, message=f"resumed from {ckpt_path}")

    def checkpoint(epoch: int) -> dict:
        return {"generator": prompt_network.state_dict(),
                "decoder": backbone.mask_decoder.state_dict() if config.finetune_decoder else {},
                "weighting": weighting.state_dict() if weighting is not None else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else {},
                "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state, "epoch": epoch,
                "best": best, "history": history, "run": run}

    saved_epoch = trained_epoch = start_epoch - 1
    snapshot = None
    try:
        pe = backbone.dense_pe().detach()
        if config.prompt_network == "classmap":
            step_fn = _ClassMapSteps(prompt_network, data, labels, values, device)
        else:
            step_fn = _PairSteps(prompt_network, backbone, data, labels, values, device, pe, weighting, config)
        t0 = time.perf_counter()
        for epoch in range(start_epoch, config.epochs + 1):
            prompt_network.train()
            batches = step_fn.batches(rng, config.batch_size)
            steps = len(batches)
            sums: dict[str, float] = {}
            for step, batch in enumerate(batches):
                if cancel is not None and cancel.is_set():
                    yield TrainEvent("cancelled", epoch, config.epochs, step, steps, "cancelled; no bundle written")
                    return
                losses = step_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                mean = {k: round(v / (step + 1), 5) for k, v in sums.items()}
                yield TrainEvent("step", epoch, config.epochs, step + 1, steps, losses=mean)
            record = {"epoch": epoch, "losses": mean, "seconds": round(time.perf_counter() - t0, 1)}
            if validators and (epoch % config.validate_every == 0 or epoch == config.epochs):
                metrics = _validate(validators, prompt_network, classes, config, names)
                record["validation"] = metrics
                score = float(np.mean([m["dsc"] for m in metrics.values()]))
                if scheduler is not None:
                    scheduler.step(1.0 - score)
                if best is None or score > best["score"]:
                    best = {"score": score, "epoch": epoch, "metrics": metrics, "generator": _cpu_copy(prompt_network),
                            "decoder": _cpu_copy(backbone.mask_decoder) if config.finetune_decoder else None}
                yield TrainEvent("validate", epoch, config.epochs, steps, steps, losses=mean, metrics=metrics)
            history.append(record)
            yield TrainEvent("epoch", epoch, config.epochs, steps, steps, losses=mean,
                             metrics=record.get("validation", {}))
            trained_epoch = epoch
            # A CPU copy of the finished epoch: what a failure later on keeps (the live weights may
            # be half-way through the next epoch, or on a GPU that just failed).
            snapshot = _to_cpu(checkpoint(epoch))
            if ckpt_path is not None:
                _save_checkpoint(snapshot, ckpt_path)
                saved_epoch = epoch
                yield TrainEvent("checkpoint", epoch, config.epochs, message=str(ckpt_path))

        if best is not None:  # the bundle holds the best validation epoch
            prompt_network.load_state_dict(best["generator"])
            if config.finetune_decoder:
                backbone.mask_decoder.load_state_dict(best["decoder"])
        training = {
            "recipe": config.prompt_network, "config": config.to_dict(), "cases": [c.name for c in cases],
            "train_slices": {s.case.name: s.train_slices for s in split},
            "val_slices": {s.case.name: s.val_slices for s in split},
            "best_epoch": best["epoch"] if best else config.epochs, "history": history,
            "seconds": round(time.perf_counter() - t0, 1), "encode_seconds": encode_seconds, "device": str(device),
            "validation_kind": validation_kind(split), "framing": framing.to_dict(),
        }
        bundle = create_bundle(backbone, prompt_network.eval(), classes, config.intensity, name=config.name,
                               framing=framing, decoder_finetuned=config.finetune_decoder, training=training,
                               metrics={"validation": best["metrics"] if best else {},
                                        "tolerance_mm": config.tolerance_mm})
        yield TrainEvent("done", config.epochs, config.epochs, message="done", metrics=best["metrics"] if best else {},
                         bundle=bundle)
    except GeneratorExit:  # the caller stopped reading: a cancel, not a failure
        raise
    except BaseException as exc:
        if trained_epoch < 1 or isinstance(exc, InvalidInputError):  # nothing trained yet, or diverged weights
            raise
        # Never lose finished epochs: keep the last one (and the best epoch so far), from the
        # checkpoint already on disk or in a rescue folder, and say where.
        if ckpt_path is None or saved_epoch != trained_epoch:
            try:
                ckpt_path = rescue_folder(config.name) / "last.pt"
                _save_checkpoint(snapshot, ckpt_path)
            except Exception as again:
                raise TrainingFailedError(
                    f"training failed after epoch {trained_epoch}: {type(exc).__name__}: {exc}; keeping its state "
                    f"failed too ({type(again).__name__}: {again})") from exc
        how = (f"run the same command with --checkpoint-dir {ckpt_path.parent} --resume to finish "
               f"(epoch {trained_epoch} of {config.epochs} is kept in {ckpt_path})")
        if not isinstance(exc, Exception):  # Ctrl-C: stop as asked, but say how to go on
            log.warning("training interrupted; %s", how)
            raise
        raise TrainingFailedError(f"training failed after epoch {trained_epoch}: {type(exc).__name__}: {exc}. "
                                  f"Nothing is lost: {how}.") from exc


def validation_kind(split) -> str:
    """What the validation figures measure: slices of the volumes taught on (interpolation within a
    patient) or whole volumes never taught on (transfer to other cases)."""
    slices = any(s.train_slices and s.val_slices for s in split)
    cases = any(s.val_slices and not s.train_slices for s in split)
    if slices and cases:
        return "held-out slices of the taught volumes and whole held-out volumes"
    if cases:
        return "whole held-out volumes (other cases)"
    return "held-out slices of the taught volume (within-volume, not other cases)" if slices else "none"


def _cpu_copy(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _to_cpu(value):
    """A deep copy with every tensor cloned to the CPU (a checkpoint that later steps cannot change)."""
    import copy

    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _save_checkpoint(state: dict, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, run: dict) -> dict:
    """A checkpoint of this run (same classes, prompt network, backbone and weights), else a clear error."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InvalidInputError(f"cannot read checkpoint {path}: {exc}") from None
    theirs = state.get("run") if isinstance(state, dict) else None
    if theirs is not None and theirs != run:
        diff = ", ".join(f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in run.items() if theirs.get(k) != v)
        raise InvalidInputError(f"checkpoint {path} belongs to another run: {diff}. Resume with the same options, or "
                                "give another --checkpoint-dir to start afresh")
    return state


class _ClassMapSteps:
    """Class-map training: batches of training items, every class of an item at once, per-pixel
    loss on the L x L grid (no decoder in the loop)."""

    def __init__(self, prompt_network, data, labels: np.ndarray, values: list[int], device):
        import torch

        self.prompt_network, self.data, self.labels, self.device = prompt_network, data, labels, device
        lut = np.zeros(int(max(int(labels.max()), *values)) + 1, np.int64)  # label value -> class index + 1
        for index, value in enumerate(values):
            lut[value] = index + 1
        self.targets = torch.from_numpy(lut[labels])

    def batches(self, rng: np.random.Generator, batch_size: int) -> list[np.ndarray]:
        order = rng.permutation(len(self.labels))
        return [np.sort(order[n:n + batch_size]) for n in range(0, len(order), batch_size)]

    def __call__(self, items: np.ndarray) -> dict:
        from ..prompt_networks.classmap import classmap_loss

        feats = self.data.features(items, self.device)
        logits = self.prompt_network.upsampled_logits(feats.embeddings)
        return classmap_loss(logits, self.targets[items].to(self.device))


class _PairSteps:
    """PPN / diffusion training: batches of (item, class) pairs (present pairs plus a share of
    absent ones for objectness), decoded through the mask decoder."""

    def __init__(self, prompt_network, backbone, data, labels: np.ndarray, values: list[int], device, pe, weighting,
                 config: TrainConfig):
        self.prompt_network, self.backbone, self.data, self.labels = prompt_network, backbone, data, labels
        self.values, self.device, self.pe, self.weighting, self.config = values, device, pe, weighting, config

    def batches(self, rng: np.random.Generator, batch_size: int) -> list[np.ndarray]:
        pairs = _samples(self.labels, self.values, self.config.negative_ratio, rng)
        return [pairs[n:n + batch_size] for n in range(0, max(len(pairs), 1), batch_size)]

    def __call__(self, batch: np.ndarray) -> dict:
        import torch

        from ..prompt_networks import decoder_prompts
        from .losses import boxes_from_masks, diffusion_loss, ppn_loss

        backbone, device = self.backbone, self.device
        items, cls = batch[:, 0], batch[:, 1]
        order = np.argsort(items)  # memory-mapped reads in file order
        items, cls = items[order], cls[order]
        feats = self.data.features(items, device)
        lab = torch.from_numpy(self.labels[items].astype(np.int64)).to(device)
        class_idx = torch.from_numpy(cls).to(device)
        target = (lab == torch.tensor(self.values, device=device)[class_idx][:, None, None]).float()
        present = target.flatten(1).amax(1)
        with backbone.autocast():
            gen = self.prompt_network(feats.embeddings, self.pe, class_idx)
            sparse, dense = decoder_prompts(backbone, gen)
            out = backbone.decode(feats, sparse, dense)
        final = out.mask_logits[:, 0].float()
        if self.config.prompt_network == "ppn":
            return ppn_loss(gen, final, target, present)
        with torch.no_grad():
            t_sparse, t_dense = backbone.embed_prompts(boxes=boxes_from_masks(target) * backbone.input_size)
        return diffusion_loss(gen, final, target, present, t_sparse, t_dense, self.weighting)


def _validate(validators, prompt_network, classes, config: TrainConfig, names) -> dict:
    """Automatic segmentation of the held-out slices with the current weights, as the engine's
    (without 3-D cleanup); DSC/NSD per class over the stack of held-out slices (z spacing = the
    median gap between them, in mm)."""
    import torch

    from ..metrics import dice, normalized_surface_dice

    was_training = prompt_network.training
    prompt_network.eval()
    scores: dict[str, dict[str, list[float]]] = {n: {"dsc": [], "nsd": []} for n in names}
    for learned, split in validators:
        learned.use(prompt_network, classes)  # new weights: nothing memoised is valid
        ks = split.val_slices
        volume = split.case.image
        predicted = {n: np.zeros((len(ks), *volume.array.shape[1:3]), bool) for n in names}
        with torch.no_grad():
            for start in range(0, len(ks), learned.store.batch_size):
                learned.store.encode(ks[start:start + learned.store.batch_size])
            for row, k in enumerate(ks):
                for name, mask in learned.slice_masks(k, names, 0.0, 0.0).items():
                    predicted[name][row] = mask
        gap = float(np.median(np.diff(ks))) if len(ks) > 1 else 1.0
        spacing = (volume.spacing[2] * gap, volume.spacing[1], volume.spacing[0])
        for name, value in config.classes.items():
            pred = predicted[name]
            ref = split.case.labels.array[ks] == value
            scores[name]["dsc"].append(dice(pred, ref))
            scores[name]["nsd"].append(normalized_surface_dice(pred, ref, spacing, config.tolerance_mm))
    prompt_network.train(was_training)
    return {n: {m: round(float(np.mean(v)), 4) for m, v in s.items()} for n, s in scores.items()}
