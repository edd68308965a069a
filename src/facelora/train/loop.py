"""The training loop of one phase: flow matching on cached encodings, checkpoints, resume.

Every random choice comes from generators seeded by `seed` and saved in each checkpoint (data
order, noise, noise levels, dropout), so a run killed at any moment and started again continues
from its last checkpoint at the right step and, on the CPU, ends with the same weights as a run
that was never interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facelora.config import LossesParams, Params
from facelora.errors import EnvironmentProblem, FaceloraError, SettingsError
from facelora.io.atomic import atomic_path, write_json
from facelora.io.live import LiveSeries
from facelora.io.progress import progress
from facelora.models import lora_io
from facelora.models.adapters import FamilyAdapter, load_adapter, resolve_device
from facelora.registry.families import family as get_family
from facelora.train import checkpoint, fsdp
from facelora.train.data import EncodingCache, Sample, read_phase, read_regularization
from facelora.train.objectives import FLOW_MATCHING, DecodedTerms
from facelora.train.optim import make_optimizer, make_scheduler
from facelora.train.regions import landmark_weights, mask_weights, tiled, weighted_mse
from facelora.train.sampling import noisy_latents, sample_sigmas

log = logging.getLogger(__name__)
LOG_COLUMNS = ["step", "loss", "lr", "grad_norm", "sigma_mean", "seconds"]  # + each term's
POOLED_KEPT = 4096  # samples whose latent-grid loss weights stay in memory (64 KB at 1024 px)


class TrainingDiverged(FaceloraError, RuntimeError):
    pass


@dataclass
class DataPosition:
    """Batches consumed so far by the whole group, counted over consecutive epochs."""

    item: int = 0


def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches: a seeded shuffle, samples of one size (bucket) per batch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(samples), generator=g).tolist()
    buckets: dict[tuple, list[int]] = {}
    for i in order:
        key = (samples[i].size, len(samples[i].controls))
        buckets.setdefault(key, []).append(i)
    batches = [
        b[j : j + batch_size] for b in buckets.values() for j in range(0, len(b), batch_size)
    ]
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle]


def paired_epoch_batches(
    samples: list[Sample], groups: list[int], batch_size: int, seed: int, epoch: int
) -> list[tuple[list[int], bool]]:
    """This epoch's batches for the contrastive term: edits of one start image (same group)
    are paired in a seeded order, and a paired batch holds batch_size such pairs side by side
    ([a1, b1, a2, b2, ...]: 2 x batch_size samples); samples left without a partner form plain
    batches. Returns (indices, paired) per batch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(samples), generator=g).tolist()
    waiting: dict[tuple, int] = {}
    pairs: dict[tuple, list[list[int]]] = {}
    singles: dict[tuple, list[int]] = {}
    for i in order:
        key = (samples[i].size, len(samples[i].controls))
        slot = (groups[i], key)
        if slot in waiting:
            pairs.setdefault(key, []).append([waiting.pop(slot), i])
        else:
            waiting[slot] = i
    for slot, i in waiting.items():
        singles.setdefault(slot[1], []).append(i)
    batches = [
        ([i for pair in units[j : j + batch_size] for i in pair], True)
        for units in pairs.values()
        for j in range(0, len(units), batch_size)
    ]
    batches += [
        (units[j : j + batch_size], False)
        for units in singles.values()
        for j in range(0, len(units), batch_size)
    ]
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle]


def start_groups(samples: list[Sample]) -> list[int]:
    """A group number per sample: samples whose start images have the same bytes share one."""
    seen: dict[str, int] = {}
    groups = []
    for s in samples:
        start = s.controls[0] if s.controls else s.target[0]
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        groups.append(seen.setdefault(digest, len(seen)))
    return groups


def fingerprint(
    params: Params, phase: str, data_dir: Path, model_id: str, init: Path | None
) -> str:
    """What makes two runs the same run: settings, data, model, starting LoRA."""
    train = params.train.model_dump(mode="json", exclude={"save_every", "keep_states"})
    if params.train.losses == LossesParams():  # so runs from before the setting still resume
        train.pop("losses")
    settings = {
        "seed": params.seed,
        "lr": params.lr,
        "model": params.model.model_dump(mode="json"),
        "lora": params.lora.model_dump(mode="json"),
        "train": train,
        "phase": params.phase(phase).model_dump(mode="json"),
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update((data_dir / "manifest.jsonl").read_bytes())
    reg = params.train.regularization.folder
    if reg and Path(reg).is_dir():
        for f in sorted(Path(reg).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    h.update(model_id.encode())
    if init is not None:
        h.update(Path(init).read_bytes())
    return h.hexdigest()[:24]


def _rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["noise"])


class Trainer:
    def __init__(
        self,
        phase: str,
        data_dir: Path,
        out: Path,
        params: Params,
        init_lora: Path | None = None,
        cache_dir: Path | None = None,
        live_dir: Path | None = None,
    ):
        self.phase, self.params = phase, params
        self.live_dir = Path(live_dir) if live_dir else None  # DVCLive's folder (None: none)
        self.data_dir, self.out = Path(data_dir), Path(out)
        self.init_lora = Path(init_lora) if init_lora else None
        self.total = params.phase(phase).steps
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        if self.world > 1:  # launched by torchrun / accelerate launch: one process per device
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=resolve_device(params.model.device).type == "cpu")
            self.device = self.accelerator.device
        else:
            self.device = resolve_device(params.model.device)
        self.rank = int(os.environ.get("RANK", "0"))
        torch.manual_seed(params.seed + self.rank)
        np.random.seed((params.seed + self.rank) % 2**32)
        random.seed(params.seed + self.rank)
        self.sharded = self.world > 1 and params.train.distributed == "fsdp"
        self.adapter: FamilyAdapter = load_adapter(
            params.model.family,
            params.model.path,
            params.model.dtype,
            self.device,
            params.model.quantize,
            # FSDP moves it to the device block by block while sharding: never whole there
            transformer_device=torch.device("cpu") if self.sharded else None,
        )
        transformer = self.adapter.transformer
        self.targets = lora_io.add_lora(transformer, params.model.family, params.lora)
        for name, p in transformer.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                p.data = p.data.float()  # LoRA weights and their optimizer state in fp32
        if self.init_lora is not None:
            lora_io.load_into(transformer, self.init_lora, params.lora.rank)
        if params.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if self.sharded:  # FSDP2 in place: the parameters become DTensor shards on the device
            fsdp.shard_transformer(
                transformer, [p for p in transformer.parameters() if p.requires_grad], self.device
            )
        self.module = transformer  # the plain transformer: what is saved
        self.trainable = [p for p in transformer.parameters() if p.requires_grad]
        self.n_transformer = len(self.trainable)
        self.text_encoder = None
        if params.lora.train_text_encoder:
            self.text_encoder = self.adapter.pipe.text_encoder
            lora_io.add_text_encoder_lora(self.text_encoder, params.lora)
            for name, p in self.text_encoder.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_" in name:
                    p.data = p.data.float()
                    self.trainable.append(p)
            if self.world > 1:  # unwrapped: _sync_text_encoder_grads averages its gradients
                with torch.no_grad():
                    for p in self.trainable[self.n_transformer :]:
                        torch.distributed.broadcast(p.data, src=0)
        if self.accelerator is not None and not self.sharded:  # the DDP wrapper
            # Every process loads the same frozen weights: DDP need only broadcast the LoRA
            # (float8 weights could not be broadcast at all: gloo refuses the dtype).
            transformer._ddp_params_and_buffers_to_ignore = [
                n for n, p in transformer.named_parameters() if not p.requires_grad
            ] + [n for n, _ in transformer.named_buffers()]
            self.adapter.transformer = self.accelerator.prepare(transformer)
        train = params.train
        diptych = train.diptych_prefix if train.diptych else None
        self.samples = read_phase(
            self.data_dir, train.resolution, get_family(params.model.family).max_references, diptych
        )
        reg = train.regularization
        self.regularization = (
            read_regularization(reg.folder, reg.caption, train.resolution) if reg.folder else []
        )
        self.cache = EncodingCache(cache_dir if params.train.cache else None, self.adapter)
        model_id = self.adapter.component_identity("transformer")
        self.fingerprint = fingerprint(params, phase, self.data_dir, model_id, self.init_lora)
        self.optimizer = make_optimizer(self.trainable, params.lr, params.train)
        self.scheduler = make_scheduler(self.optimizer, params.train, self.total, params.lr)
        self.noise = torch.Generator().manual_seed(params.seed + 1000 * self.rank)
        self.ema = [p.detach().clone() for p in self.trainable] if params.train.ema_decay else None
        self.step, self.position = 0, DataPosition()
        self._epochs: dict[tuple, list[list[int]]] = {}
        self.regions = train.losses.regions
        self.weighted = not self.regions.uniform  # equal weights: the plain mean, untouched
        self._pooled: dict[tuple, torch.Tensor] = {}
        self.terms = (
            DecodedTerms(params, self.adapter, self.device) if train.losses.decoded_terms else None
        )
        self.term_names = [FLOW_MATCHING, *self.terms.names] if self.terms else []
        self.log_columns = LOG_COLUMNS + self.term_names
        self.left_out = dict.fromkeys(self.term_names[1:], 0)  # non-finite values, this process
        self.groups = None
        if self.terms is not None and "contrastive" in self.terms.names:
            self.groups = start_groups(self.samples)
            if len(set(self.groups)) == len(self.groups):
                raise SettingsError(
                    f"train.losses.contrastive: no two pairs of {self.data_dir} share a start "
                    "image, so there is nothing to contrast; it needs several edits of one "
                    "photo (e.g. synthesis.kinds: [edit] with synthesis.variations > 1 or "
                    "several instructions), or set train.losses.contrastive.weight: 0"
                )
        if self.terms is not None and "identity" in self.terms.names:
            unmarked = sum(s.landmarks is None for s in self.samples)
            if unmarked == len(self.samples):
                raise SettingsError(
                    f"train.losses.identity: no pair of {self.data_dir} has end landmarks "
                    "(phase folders written before they were stored): rerun the pairs and "
                    "select steps, or set train.losses.identity.weight: 0"
                )
            if unmarked:
                log.info(
                    "train.losses.identity: %d of %d pairs have no end landmarks: no identity "
                    "term for them",
                    unmarked,
                    len(self.samples),
                )
        unknown = [s for s in self.samples if s.landmarks is None and s.mask is None]
        if self.weighted and unknown:
            log.info(
                "train.losses.regions: %d of %d pairs of %s have no landmarks nor mask (a phase "
                "folder written before they were stored): their loss weights are all 1; "
                "rerun the pairs and select steps to weight them too",
                len(unknown),
                len(self.samples),
                self.data_dir,
            )

    # -- state -------------------------------------------------------------------------------

    def _lora_tensors(self, values: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = lora_io.lora_state(self.module)
        if values is None:
            return state
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        by_param = dict(zip(names, values[: self.n_transformer], strict=True))
        return {k: by_param[self._param_name(k)].detach().cpu().float().clone() for k in state}

    @staticmethod
    def _param_name(key: str) -> str:
        # peft state keys omit the adapter name that parameter names carry
        return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )

    def resume(self) -> bool:
        found = checkpoint.latest_matching(self.out, self.fingerprint)
        stale = [
            d for _, d in checkpoint.list_checkpoints(self.out) if found is None or d != found[1]
        ]
        if found is None:
            for folder in stale:  # another run's checkpoints: they would mislead evaluation
                shutil.rmtree(folder)
            return False
        step, folder = found
        state = checkpoint.load_state(folder)
        with torch.no_grad():
            for p, value in zip(self.trainable, state["trainable"], strict=True):
                p.copy_(fsdp.like(p, value))
        fsdp.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][self.rank], self.noise)
        if self.ema is not None:
            self.ema = [fsdp.like(p, t) for p, t in zip(self.trainable, state["ema"], strict=True)]
        self.step = step
        self.position = DataPosition(**state["position"])
        if len(state["rng"]) != self.world:
            raise EnvironmentProblem(
                f"{folder} was written by {len(state['rng'])} processes, this run has "
                f"{self.world}: resume with the same number of processes (or delete it)"
            )
        for later_step, later in checkpoint.list_checkpoints(self.out):
            if later_step > step:  # written by the run that died after this checkpoint
                shutil.rmtree(later)
        log.info("resumed %s from step %d (%s)", self.phase, step, folder)
        return True

    def _gather(self, value):
        """value from every process, in rank order (just [value] in a single process)."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def save(self, loss: float) -> Path | None:
        rng = self._gather(_rng_state(self.noise))
        # whole tensors: under FSDP every process gathers them (a collective), in this order
        trainable = [fsdp.full(p).cpu().clone() for p in self.trainable]
        ema = [fsdp.full(t).cpu().clone() for t in self.ema] if self.ema is not None else None
        optimizer = fsdp.full_optimizer_state(self.optimizer)
        if self.rank != 0:
            torch.distributed.barrier()
            return None
        state = {
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "position": vars(self.position).copy(),
            "ema": ema,
        }
        meta = {
            "step": self.step,
            "loss": loss,
            "phase": self.phase,
            "fingerprint": self.fingerprint,
            "family": self.params.model.family,
        }
        metadata = lora_io.adapter_metadata(self.module)
        folder = checkpoint.save(
            self.out,
            self.step,
            type(self.adapter.pipe),
            self._lora_tensors(trainable),
            metadata,
            self.params.lora.scale_alpha,
            state,
            meta,
            self._lora_tensors(ema) if ema is not None else None,
            lora_io.module_lora_state(self.text_encoder) if self.text_encoder is not None else None,
            family=self.params.model.family,
        )
        checkpoint.prune_states(self.out, self.params.train.keep_states)
        if self.world > 1:
            torch.distributed.barrier()
        return folder

    def _sync_text_encoder_grads(self) -> None:
        """Average the text encoder LoRA's gradients over the processes (as DDP/FSDP do for
        the transformer's): one all-reduce of them all, flattened."""
        params = self.trainable[self.n_transformer :]
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _mean(self, value: float) -> float:
        """The value's mean over the whole group (every process has one)."""
        return self._mean_present([value])

    def _mean_present(self, values: list[float]) -> float:
        """The mean of the values over the whole group (NaN where no process has one)."""
        total, count = float(np.sum(values)) if values else 0.0, len(values)
        if self.world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        return total / count if count else float("nan")

    def checksum(self) -> str:
        h = hashlib.sha256()
        for p in self.trainable:  # whole tensors: under FSDP a collective
            h.update(fsdp.full(p).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- steps -------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[list[Sample], bool]:
        """This process's next batch: the group takes `world` consecutive batches of the
        stream, this process the one at its rank (the same data, split, for any world).
        With regularization, every (ratio + 1)-th batch of the stream is a regularization one."""
        item = self.position.item + self.rank
        self.position.item += self.world
        samples = self.samples
        if self.regularization:
            cycle = self.params.train.regularization.ratio + 1
            if item % cycle == cycle - 1:
                samples, item = self.regularization, item // cycle
            else:
                item = item - item // cycle
        per_epoch = len(self._epoch(samples, 0))
        batch, paired = self._epoch(samples, item // per_epoch)[item % per_epoch]
        return [samples[i] for i in batch], paired

    def _epoch(self, samples: list[Sample], epoch: int) -> list[tuple[list[int], bool]]:
        key = (id(samples), epoch)
        if key not in self._epochs:
            size, seed = self.params.train.batch_size, self.params.seed
            if self.groups is not None and samples is self.samples:
                batches = paired_epoch_batches(samples, self.groups, size, seed, epoch)
            else:
                batches = [(b, False) for b in epoch_batches(samples, size, seed, epoch)]
            self._epochs[key] = batches
            if len(self._epochs) > 4:
                self._epochs.pop(next(iter(self._epochs)))
        return self._epochs[key]

    def _loss(
        self, batch: list[Sample], paired: bool = False
    ) -> tuple[torch.Tensor, float, dict[str, float | None]]:
        """The batch's total loss, its mean sigma, and each term's unweighted value (None:
        the term applies to no sample of the batch, or was not finite and left out)."""
        train = self.params.train
        x0 = torch.stack([self.cache.latents(s.target, s.size) for s in batch]).float()
        controls = [
            torch.stack([self.cache.latents(s.controls[k], s.size) for s in batch])
            for k in range(len(batch[0].controls))
        ]
        if self.text_encoder is not None:  # encoded every step, so gradients reach its LoRA
            text = [self._encode_text(s) for s in batch]
        else:
            text = [self.cache.text(s) for s in batch]
        # a paired batch ([a1, b1, a2, b2, ...], the contrastive term) draws noise and sigma
        # once per pair: both edits of a start image see the same ones
        draws = len(batch) // 2 if paired else len(batch)
        noise = torch.randn((draws, *x0.shape[1:]), generator=self.noise)
        if train.noise_offset:
            noise += train.noise_offset * torch.randn(
                draws, x0.shape[1], 1, 1, generator=self.noise
            )
        shift = train.shift if train.shift is not None else self.adapter.default_shift(x0)
        sampling = train.timestep_sampling
        sigma = sample_sigmas(draws, sampling, self.noise, train.sigmoid_scale, shift)
        if paired:
            noise, sigma = noise.repeat_interleave(2, dim=0), sigma.repeat_interleave(2)
        noisy, target = noisy_latents(x0, noise, sigma)
        noisy = noisy.to(self.device)
        pred = self.adapter.predict(noisy, [c.to(self.device) for c in controls], text, sigma)
        weights = self._weights(batch) if self.weighted else None
        loss = weighted_mse(pred.float(), target.to(self.device).float(), weights)
        if self.terms is None:
            return loss, float(sigma.mean()), {}
        parts: dict[str, float | None] = {FLOW_MATCHING: float(loss.detach())}
        for name, value in self.terms(batch, x0, noisy, pred, sigma, paired).items():
            if value is not None and not torch.isfinite(value.detach()):
                log.warning(
                    "phase %s step %d: the %s term is %s on this batch: left out of the loss",
                    self.phase,
                    self.step + 1,
                    name,
                    float(value.detach()),
                )
                self.left_out[name] += 1
                value = None
            parts[name] = None if value is None else float(value.detach())
            if value is not None:
                loss = loss + self.terms.weight(name) * value
        return loss, float(sigma.mean()), parts

    def _weights(self, batch: list[Sample]) -> torch.Tensor:
        """The batch's loss weights, laid out like its latents (see train.regions)."""
        pooled = torch.cat([self._pooled_weights(s) for s in batch])
        return self.adapter.layout_weights(pooled).to(self.device)

    def _pooled_weights(self, sample: Sample) -> torch.Tensor:
        """(1, 1, h, w): the sample's pixel weights averaged over each latent cell (kept:
        they never change during a run)."""
        key = (sample.pair_id, sample.size)
        if key in self._pooled:
            return self._pooled[key]
        if sample.mask is not None:
            from PIL import Image

            with Image.open(sample.mask) as mask:
                mask.load()
            pixels = tiled(sample.size, sample.tiles, lambda s: mask_weights(s, mask, self.regions))
        elif sample.landmarks is not None:
            end_w, end_h = sample.end_size
            points = np.asarray(sample.landmarks, dtype=np.float64)

            def tile(size: tuple[int, int]) -> np.ndarray:
                scaled = points * np.array([size[0] / end_w, size[1] / end_h])
                return landmark_weights(size, scaled, self.regions)

            pixels = tiled(sample.size, sample.tiles, tile)
        else:
            pixels = np.ones(sample.size[::-1], np.float32)
        pooled = self.adapter.pool_weights(torch.from_numpy(pixels)[None, None])
        if len(self._pooled) >= POOLED_KEPT:
            self._pooled.pop(next(iter(self._pooled)))
        self._pooled[key] = pooled
        return pooled

    def _encode_text(self, sample: Sample) -> torch.Tensor:
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in sample.controls]
        return self.adapter.encode_text(sample.caption, images, grad=True)

    def run(self, show_progress: bool = True) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self.rank != 0:  # process 0 fills the cache, the others then read it
            torch.distributed.barrier()
        self.cache.prepare(self.samples + self.regularization)
        if self.world > 1 and self.rank == 0:
            torch.distributed.barrier()
        if self.params.train.cache and self.text_encoder is None:
            # every encoding is on disk now; the decoded-image terms keep the VAE's decoder
            self.adapter.set_encoders_aside(keep_vae=self.terms is not None)
        cache_seconds = time.perf_counter() - started
        resumed = self.resume()
        log_path = self.out / "log.csv"
        rows = _read_log(log_path, upto=self.step) if resumed else []
        live = None
        if self.live_dir is not None and self.rank == 0:
            # rewritten from log.csv's kept rows: the steps a killed run logged after its last
            # checkpoint are gone from both, and the resumed steps follow without a repeat
            live = LiveSeries(self.live_dir)
            live.replay(rows, self.log_columns[1:])
        train = self.params.train
        bar = progress(
            total=self.total,
            initial=self.step,
            desc=f"train {self.phase}",
            unit="step",
            disable=not show_progress or self.rank != 0,
        )
        loss_value, saved = float("nan"), []
        while self.step < self.total:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            total_loss, sigmas, parts = 0.0, [], []
            for _ in range(train.grad_accum):
                loss, sigma_mean, values = self._loss(*self._next_batch())
                (loss / train.grad_accum).backward()
                total_loss += loss.item() / train.grad_accum
                sigmas.append(sigma_mean)
                parts.append(values)
            self._sync_text_encoder_grads()
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, train.max_grad_norm)
            norm = float(fsdp.full(norm))
            total_loss = self._mean(total_loss)  # the group's loss (one process: its own)
            if not math.isfinite(total_loss) or not math.isfinite(norm):
                last = checkpoint.list_checkpoints(self.out)
                raise TrainingDiverged(
                    f"phase {self.phase}: loss {total_loss} / grad norm {norm} at step "
                    f"{self.step + 1}; the last good checkpoint is "
                    f"{last[-1][1] if last else 'none'} (lower lr, or check the data)"
                )
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema, self.trainable, strict=True):
                        e.lerp_(p.detach(), 1.0 - train.ema_decay)
            loss_value = total_loss
            row = {
                "step": self.step,
                "loss": total_loss,
                "lr": lr,
                "grad_norm": norm,
                "sigma_mean": float(np.mean(sigmas)),
                "seconds": time.perf_counter() - t0,
            }
            for name in self.term_names:  # collectives: every process, the same order
                row[name] = self._mean_present([p[name] for p in parts if p[name] is not None])
            rows.append(row)
            if live is not None:
                live.log(self.step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{lr:.2e}")
            if self.step % train.save_every == 0 or self.step == self.total:
                # the log first: a run killed between the two resumes from the previous
                # checkpoint and cuts the log back to it, never past a gap
                if self.rank == 0:
                    _write_log(log_path, rows, self.log_columns)
                saved.append(self.save(total_loss))
        bar.close()
        checksums = self._gather(self.checksum())
        # what each process holds of the transformer (FSDP: about 1/N of it)
        held = self._gather(sum(_local(p).numel() for p in self.module.parameters()))
        if self.rank == 0:
            _write_log(log_path, rows, self.log_columns)
        summary = {
            "phase": self.phase,
            "steps": self.total,
            "final_loss": loss_value,
            "checkpoints": [str(d) for _, d in checkpoint.list_checkpoints(self.out)],
            "init_lora": str(self.init_lora) if self.init_lora else None,
            "fingerprint": self.fingerprint,
            "targets": len(self.targets),
            "trainable_params": sum(p.numel() for p in self.trainable),
            "cache": {
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "prepare_seconds": round(cache_seconds, 3),
            },
            "resumed": resumed,
            "processes": self.world,
            "distributed": self.params.train.distributed if self.world > 1 else None,
            "parameters_per_process": held,
            "in_sync": len(set(checksums)) == 1,
            "rank_checksums": checksums,
        }
        if self.terms is not None:  # how often each term had a value (all logged steps)
            summary["loss_terms"] = {
                name: {
                    "weight": self.terms.weight(name),
                    "steps_with_value": sum(math.isfinite(r.get(name, math.nan)) for r in rows),
                    "left_out_not_finite": self.left_out[name],
                }
                for name in self.terms.names
            }
        return summary


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if fsdp.is_sharded(p) else p


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [
            {k: _cell(k, v) for k, v in row.items()}
            for row in csv.DictReader(fh)
            if int(row["step"]) <= upto
        ]


def _cell(column: str, text: str) -> int | float:
    if column == "step":
        return int(text)
    return float(text) if text not in ("", None) else math.nan


def _write_log(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:  # a term with no value this step (NaN) is an empty cell
            writer.writerow({k: "" if v != v else v for k, v in row.items()})


def plot_loss(log_path: Path, out: Path, title: str) -> None:
    """The loss per step (raw and smoothed); with loss terms on, one panel per term below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_log(log_path, upto=10**12)
    terms = [k for k in (rows[0] if rows else {}) if k not in LOG_COLUMNS]
    panels = ["loss", *[t for t in terms if t != FLOW_MATCHING]]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.2 + 1.6 * len(panels)), sharex=True, squeeze=False
    )
    for ax, column in zip(axes[:, 0], panels, strict=True):
        if column != "loss":
            _plot_series(ax, rows, column, column)
            ax.set_ylabel(column)
        elif not terms:
            _plot_series(ax, rows, column, "loss")
            ax.set_ylabel("flow-matching loss")
        else:  # the total, with its flow-matching part
            _plot_series(ax, rows, column, "total loss")
            _plot_series(ax, rows, FLOW_MATCHING, "flow matching", raw=False, color="C1")
            ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_series(ax, rows, column: str, label: str, raw: bool = True, color: str = "C0"):
    """A column over the steps it has a value at, raw in grey and as a running mean."""
    points = [(r["step"], r[column]) for r in rows if math.isfinite(r.get(column, math.nan))]
    if not points:
        return
    steps, values = map(np.array, zip(*points, strict=True))
    if raw:
        ax.plot(steps, values, color="#bbbbbb", linewidth=0.8, label=label)
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, color=color, label=f"{label}, mean of {window}")


def train_phase(
    phase: str,
    data_dir: Path,
    out: Path,
    params: Params,
    init_lora: Path | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    summary_out: Path | None = None,
    plot_out: Path | None = None,
    live_out: Path | None = None,
) -> dict:
    """Train `phase` into the training folder `out` (checkpoints, log.csv); the summary, the
    loss plot and the DVCLive folder go to `summary_out`, `plot_out` and `live_out` (default:
    train.json, loss.png, dvclive/ in out)."""
    live_out = live_out or Path(out) / "dvclive"
    trainer = Trainer(phase, data_dir, out, params, init_lora, cache_dir, live_out)
    summary = trainer.run(show_progress=show_progress)
    if trainer.rank == 0:
        plot_loss(out / "log.csv", plot_out or out / "loss.png", f"phase {phase}")
        write_json(summary_out or out / "train.json", summary)
    if trainer.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
