"""The frozen diffusion prior: a Stable Diffusion VAE, UNet and noise schedule, loaded with diffusers.

`load_prior` reads a diffusers-format folder (`vae/`, `unet/`, `scheduler/`, `text_encoder/`, `tokenizer/`)
or a hub id, computes the empty-prompt embedding once with the text encoder, and drops the text encoder.
The built-in `tiny` preset is made of the same diffusers classes at tiny sizes; it is written with
`save_pretrained` and read back through the very same loader a real sd-turbo folder uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .files import atomic_write

PRIOR_SUBFOLDERS = ("vae", "unet", "scheduler")

# Config keys that describe where a file came from, not what the model is.
_VOLATILE_KEYS = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


class PriorError(ValueError):
    """The prior cannot be loaded; the message names what and where."""


def unirestore_home() -> Path:
    """Where built-in artifacts (the tiny prior, downstream models) and the hashes of weight files are cached."""
    return Path(os.environ.get("UNIRESTORE_HOME") or Path.home() / ".cache" / "unirestore").expanduser()  # "" = unset


# --------------------------------------------------------------------------------------------------
# The tiny preset: the sd-turbo architecture at a size that trains on a CPU in minutes.

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    # Three levels (a 4× VAE, as Stable Diffusion's ×4 upscaler has) with 16 latent channels: 16 × 16 × 16
    # numbers per 64² image. An 8× VAE keeps too little of a 64² image for the downstream models: after 2400
    # stage-0 steps its reconstructions of clean scenes classify and segment worse than the corrupted inputs
    # (mIoU 0.51 / 0.44 against 0.56 / 0.53); this one, after 1500 steps, better (0.69 / 0.65): BENCHMARKS.md.
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    # No resnets in the down blocks (one per up block): a shallow VAE learns colour and shapes about twice as
    # fast per CPU second as [16, 32, 64, 64] with one resnet each, which stays desaturated blobs at equal time.
    "block_out_channels": [32, 32, 32],
    "layers_per_block": 0,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

# sd-turbo's UNet blocks, level by level: the tiny preset keeps them and shrinks only the widths.
SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_UNET = {
    "sample_size": 16,  # 64² images through the 4× VAE
    "in_channels": 16,  # = TINY_VAE latent_channels
    "out_channels": 16,
    **SD_UNET_BLOCKS,  # the kinds of block that sd-turbo's UNet has, at every level
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 2, 4, 4],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}

# sd-turbo's schedule (scaled-linear betas, 1000 steps); denoising always runs DDIM with trailing spacing.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
}

# The tiny preset predicts v (as Stable Diffusion 2.x at 768² does) rather than ε. sd-turbo reaches a clean
# latent in one step from t = 999 because it was adversarially distilled; an ε-predictor that was not must
# divide its error by √ᾱ_999 ≈ 0.068 (×14.7) to get ẑ0, while a v-predictor's error reaches ẑ0 unamplified
# (ẑ0 = √ᾱ·z_t − √(1−ᾱ)·v̂). Everything downstream reads the prediction type from the scheduler config.
TINY_SCHEDULER = dict(SD_SCHEDULER, prediction_type="v_prediction")

TINY_TEXT_ENCODER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


@dataclass
class Prior:
    """A frozen prior: every parameter has requires_grad False and every module is in eval mode."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    empty_prompt_embeds: torch.Tensor  # (1, tokens, cross_attention_dim)
    name: str
    fingerprint: str
    # The tiny prior only (its weights are trained here, and stage 0 may train them again): a hash of its VAE
    # and UNet weight files, so that a checkpoint is not loaded onto other weights of the same architecture.
    weights: str | None = None
    # A prior read from a folder (the tiny one too) or by hub id from the Hugging Face cache: what
    # `weight_file_digests` says of the VAE and UNet weight files it read, the same check for a real prior's
    # gigabytes, which are read whole once per version of a file rather than at every load.
    weight_files: dict[str, dict] | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be a multiple of this: the VAE factor × the UNet's total downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return _native_size(self.vae.config.block_out_channels, self.unet.config.sample_size)

    def identity(self) -> dict:
        identity = {"name": self.name, "fingerprint": self.fingerprint}
        if self.weights is not None:
            identity["weights"] = self.weights
        if self.weight_files is not None:
            identity["weight_files"] = self.weight_files
        return identity

    def to(self, device=None, dtype=None) -> Prior:
        self.vae.to(device=device, dtype=dtype)
        self.unet.to(device=device, dtype=dtype)
        self.empty_prompt_embeds = self.empty_prompt_embeds.to(device=device, dtype=dtype)
        return self


def _clean_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if k not in _VOLATILE_KEYS and not k.startswith("_")}


def fingerprint_configs(vae_config, unet_config, scheduler_config) -> str:
    """A short hash of what the prior is (its architecture and schedule), independent of where it lies."""
    payload = json.dumps(
        {
            "vae": _clean_config(vae_config),
            "unet": _clean_config(unet_config),
            "scheduler": {
                k: v
                for k, v in _clean_config(scheduler_config).items()
                if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
            },
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_digest(folder: Path) -> str:
    """A short hash of a prior folder's VAE and UNet weight files (cheap for the tiny prior's few MB)."""
    files = sorted((folder / "vae").glob("*.safetensors")) + sorted((folder / "unet").glob("*.safetensors"))
    parts = []
    for file in files:
        with open(file, "rb") as handle:
            parts.append(f"{file.parent.name}/{file.name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# 16 slices of 64 KiB: 1 MiB read of each weight file, however large.
_SAMPLED_SLICES, _SLICE_BYTES = 16, 64 * 1024

# A first hash of a file this large takes seconds: a note says so.
_NOTED_BYTES = 2**30


def weight_file_digests(folder: Path) -> dict[str, dict]:
    """The VAE and UNet weight files that `load_prior` reads from `folder`, each as `{"size": bytes, "sha256": the
    hash of the whole file, "sample": a hash of 16 slices of 64 KiB spread evenly from its first byte to its last
    (of the whole of a smaller file)}`.

    A file is read whole once per version of it (`file_sha256` keeps its hash), so every byte is compared and a
    load of a 5 GB sd-turbo folder stays cheap after the first. The sample is what checkpoints written before
    whole files were hashed record, and is compared with those alone: weights changed in a few layers only (a
    fine-tune of part of the UNet, a merged LoRA) may fall between its slices.
    """
    files = {}
    for subfolder in ("vae", "unet"):
        half = bool(_weights_variant(str(folder), subfolder))  # only fp16 files there: diffusers reads those
        paths = [path for path in (folder / subfolder).iterdir()
                 if path.name.endswith((".safetensors", ".bin")) and (".fp16." in path.name) == half]  # fmt: skip
        if any(path.suffix == ".safetensors" for path in paths):  # diffusers prefers them to .bin files
            paths = [path for path in paths if path.suffix == ".safetensors"]
        for path in sorted(paths):
            files[f"{subfolder}/{path.name}"] = {
                "size": path.stat().st_size,
                "sha256": file_sha256(path),
                "sample": _sample_digest(path),
            }
    return files


def file_sha256(path: Path) -> str:
    """The sha256 of the whole file at `path`, read once per version of it: the hash is kept under
    `unirestore_home()/digests`, keyed by the file's resolved path, size, mtime, ctime and inode, and the file
    is read again once any of them has changed. A kept hash that cannot be read is computed again, and one
    that cannot be written is not kept; neither is an error."""
    record, version = _digest_record(path)
    digest = _kept_digest(record, version)
    if digest is not None:
        return digest
    if version["size"] >= _NOTED_BYTES:
        from rich.markup import escape

        from .console import make_console

        make_console(stderr=True).print(
            f"[yellow]note[/yellow]: hashing {escape(str(path))} ({version['size'] / 1e9:.1f} GB) once, to tell "
            "its weights apart from others; later loads reuse the hash"
        )
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if _digest_record(path)[1] == version:  # a file that changed while it was read is read again next time
        kept = json.dumps({**version, "sha256": digest})
        try:
            atomic_write(record, lambda temporary: Path(temporary).write_text(kept))
        except OSError:  # a read-only home: the file is read whole at every load
            pass
    return digest


def _digest_record(path: Path) -> tuple[Path, dict]:
    """Where `file_sha256` keeps the hash of `path` as it is now, and what tells that version of it apart."""
    resolved = path.resolve()  # a Hugging Face snapshot's files are links to its blobs
    stat = resolved.stat()
    version = {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        # changed by any write, also by a copy over the file that carries its source's mtime (cp -p, rsync -t)
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }
    key = hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:32]
    return unirestore_home() / "digests" / f"{key}.json", version


def _kept_digest(record: Path, version: dict) -> str | None:
    """The hash kept in `record` for this version of a file, or None: none kept, or one unreadable or damaged."""
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError):  # missing, a folder, not UTF-8, not JSON
        return None
    if not isinstance(kept, dict) or any(kept.get(key) != value for key, value in version.items()):
        return None
    digest = kept.get("sha256")
    return digest if isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest) else None


def hub_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of hub id `repo_id` at the revision its `main` ref names (the
    files diffusers reads), or None where the cache does not hold one. Nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "unet/config.json")  # HF_HUB_CACHE (or HF_HOME/hub) as diffusers
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parents[1]
    return snapshot if all((snapshot / sub).is_dir() for sub in ("vae", "unet")) else None


def _sample_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _SAMPLED_SLICES * _SLICE_BYTES:
            digest.update(handle.read())
        else:
            for index in range(_SAMPLED_SLICES):
                handle.seek(index * (size - _SLICE_BYTES) // (_SAMPLED_SLICES - 1))
                digest.update(handle.read(_SLICE_BYTES))
    return digest.hexdigest()[:16]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def _weights_variant(source: str, subfolder: str) -> dict:
    """from_pretrained's extra arguments for a local folder that holds only half-precision weights
    (`diffusion_pytorch_model.fp16.safetensors`, as a download of just sd-turbo's fp16 files leaves it):
    that variant, upcast to fp32. Nothing for a hub id or a folder with full-precision weights."""
    folder = Path(source) / subfolder
    if not folder.is_dir():
        return {}
    weights = [p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    if weights and all(".fp16." in name for name in weights):
        return {"variant": "fp16", "torch_dtype": torch.float32}
    return {}


def _check_weights(name: str, source: str) -> None:
    """A local folder's VAE and UNet weights, named before diffusers looks for them (it prints a hub fetch
    error and a pickle warning before its own error)."""
    for subfolder in ("vae", "unet"):
        folder = Path(source) / subfolder
        if folder.is_dir() and not any(p.name.endswith((".safetensors", ".bin", ".index.json")) for p in folder.iterdir()):
            raise PriorError(
                f"prior '{name}': {folder} holds no weights (diffusion_pytorch_model.safetensors, or its .fp16 "
                "variant); copy them from the model's download"
            )


def _check_text_encoder(name: str, source: str) -> None:
    """A local folder's text encoder and tokenizer, named before transformers looks for them: it reports
    missing text-encoder weights as missing from the folder itself, and a missing tokenizer/ only as a
    traceback when the tokenizer it made without one runs."""
    missing = [sub for sub in ("text_encoder", "tokenizer") if not (Path(source) / sub).is_dir()]
    if missing:
        raise PriorError(
            f"prior folder {source} lacks {', '.join(sub + '/' for sub in missing)}, with which the empty prompt is "
            "encoded when a run starts; copy it from the model's download"
        )
    folder = Path(source) / "text_encoder"
    if not any(p.name.endswith((".safetensors", ".bin", ".index.json")) for p in folder.iterdir()):
        raise PriorError(
            f"prior '{name}': {folder} holds no weights (model.safetensors, or its .fp16 variant); copy them from "
            "the model's download"
        )


def _encode_empty_prompt(source: str, local_only: bool, device) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
    text_encoder = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", local_files_only=local_only, **_weights_variant(source, "text_encoder")
    )
    tokens = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids.to(text_encoder.device))[0]
    return embeds.to(device).float()


def _locate(name: str) -> tuple[str, bool, bool]:
    """(what diffusers loads from, whether it is a local folder, whether downloads are off) for a prior name;
    a `PriorError` for a folder that is not a diffusers prior or a name that is neither a folder nor a hub id."""
    source = str(ensure_tiny_prior()) if name == "tiny" else name
    path = Path(source).expanduser()
    local = path.exists()
    if path.is_file():
        raise PriorError(
            f"prior {path} is a single file; give a diffusers-format folder (convert it once with diffusers: "
            f"StableDiffusionPipeline.from_single_file('{path}').save_pretrained('FOLDER'))"
        )
    if local:
        missing = [sub for sub in PRIOR_SUBFOLDERS if not (path / sub).is_dir()]
        if missing:
            raise PriorError(
                f"prior folder {path} lacks {', '.join(s + '/' for s in missing)}; "
                "give a diffusers-format Stable Diffusion folder (vae/, unet/, scheduler/, text_encoder/, tokenizer/)"
            )
        source = str(path.resolve())
    elif "/" not in name or name.startswith((".", "/", "~")):
        raise PriorError(
            f"prior '{name}' is neither a folder on disk nor a hub id (owner/name); "
            "use --prior tiny, a diffusers-format folder, or a hub id such as stabilityai/sd-turbo"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return source, local, offline


@contextmanager
def _loading(name: str, local: bool, offline: bool) -> Iterator[None]:
    """diffusers' errors while reading prior `name` as one-line `PriorError`s that say what to do."""
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it deprecated: a warning printed before every message
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    except PriorError:
        raise
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if offline and not local:
            raise PriorError(
                f"cannot load the prior '{name}': downloads are off (HF_HUB_OFFLINE=1) and the Hugging Face "
                f"cache does not hold it; give its local diffusers folder (--prior /path/to/folder) or allow "
                f"downloads ({first})"
            ) from None
        raise PriorError(f"cannot load the prior from '{name}': {first}") from None


def prior_native_size(name_or_path: str | os.PathLike = "tiny") -> int:
    """A prior's `Prior.native_size` from its VAE and UNet configs alone (no weights are read)."""
    name = str(name_or_path)
    if name == "tiny":
        return tiny_native_size()
    source, local, offline = _locate(name)
    with _loading(name, local, offline):
        vae, unet = _architecture(name, source, local or offline)
    return _native_size(vae["block_out_channels"], unet["sample_size"])


def _architecture(name: str, source: str, local_only: bool) -> tuple[dict, dict]:
    """The VAE and UNet configs of prior `name`, checked to be a text-to-image Stable Diffusion 1.x/2.x
    pair (what the Controller, SC-Tuners and one-step denoising are built for) before any weight is read."""
    vae = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=local_only)
    unet = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=local_only)
    extra = {key: unet.get(key) for key in ("addition_embed_type", "class_embed_type") if unet.get(key)}
    if extra:
        setting = ", ".join(f"{key}={value}" for key, value in extra.items())
        raise PriorError(
            f"prior '{name}': its UNet needs extra conditioning ({setting}, as SDXL's does); UniRestore runs on "
            "Stable Diffusion 1.x/2.x-type priors such as stabilityai/sd-turbo"
        )
    if unet["in_channels"] != vae["latent_channels"]:
        raise PriorError(
            f"prior '{name}': its UNet takes {unet['in_channels']} input channels but its VAE makes "
            f"{vae['latent_channels']}-channel latents (an inpainting or upscaling UNet); give a text-to-image "
            "prior such as stabilityai/sd-turbo"
        )
    return vae, unet


def _native_size(vae_block_out_channels: Sequence[int], sample_size: int | Sequence[int]) -> int:
    """The image side of the UNet's `sample_size` latents: the VAE downsamples by 2 per block after the first."""
    if isinstance(sample_size, (list, tuple)):
        sample_size = min(sample_size)
    return int(sample_size) * 2 ** (len(vae_block_out_channels) - 1)


def load_prior(
    name_or_path: str | os.PathLike = "tiny",
    *,
    device: str | torch.device = "cpu",
    empty_prompt_embeds: torch.Tensor | None = None,
) -> Prior:
    """Load and freeze a prior: `tiny`, a diffusers-format folder, or a hub id (read from the Hugging Face cache,
    downloaded into it unless HF_HUB_OFFLINE is set).

    `empty_prompt_embeds`, when given (a checkpoint stores it), skips the text encoder entirely.
    """
    name = str(name_or_path)
    source, local, offline = _locate(name)
    local_only = local or offline
    with _loading(name, local, offline):
        _architecture(name, source, local_only)
        if local:
            _check_weights(name, source)
            if empty_prompt_embeds is None:
                _check_text_encoder(name, source)
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", local_files_only=local_only, **_weights_variant(source, "vae")
        )
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", local_files_only=local_only, **_weights_variant(source, "unet")
        )
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only)
        if empty_prompt_embeds is None:
            empty_prompt_embeds = _encode_empty_prompt(source, local_only, device)
    scheduler = _ddim(scheduler_config)
    vae = freeze(vae).to(device)
    unet = freeze(unet).to(device)
    return Prior(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        empty_prompt_embeds=empty_prompt_embeds.detach().to(device).float(),
        **_identity(name, source, local, vae.config, unet.config, scheduler.config),
    )


def prior_identity(name_or_path: str | os.PathLike = "tiny") -> dict:
    """What `load_prior(name_or_path).identity()` gives, which a checkpoint trained on it records, from the
    prior's configs and the hashes of its weight files alone (no weights are loaded): whether a checkpoint
    loads onto a prior is known before a job that would load both (a sweep's) starts."""
    name = str(name_or_path)
    source, local, offline = _locate(name)
    local_only = local or offline
    with _loading(name, local, offline):
        vae_config, unet_config = _architecture(name, source, local_only)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only)
    with torch.device("meta"):  # the configs with every default filled in, as the loaded models' are
        vae, unet = AutoencoderKL.from_config(vae_config), UNet2DConditionModel.from_config(unet_config)
    identity = _identity(name, source, local, vae.config, unet.config, _ddim(scheduler_config).config)
    return {key: value for key, value in identity.items() if value is not None}


def _ddim(scheduler_config: dict) -> DDIMScheduler:
    """DDIM with trailing spacing whatever scheduler the folder names (sd-turbo ships Euler)."""
    return DDIMScheduler.from_config(
        scheduler_config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
    )


def _identity(name: str, source: str, local: bool, vae_config, unet_config, scheduler_config) -> dict:
    """The `Prior` fields that say which prior it is."""
    weights_folder = Path(source) if local else hub_snapshot(name)  # a hub id: its snapshot in the cache
    return {
        # a folder by its absolute path: a checkpoint records it, and is read from any working directory
        "name": "tiny" if name == "tiny" else source if local else name,
        "fingerprint": fingerprint_configs(vae_config, unet_config, scheduler_config),
        "weights": weights_digest(Path(source)) if name == "tiny" else None,
        "weight_files": weight_file_digests(weights_folder) if weights_folder is not None else None,
    }


# --------------------------------------------------------------------------------------------------
# Writing the tiny preset


def _write_tiny_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(folder)


def build_tiny_prior(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write an untrained tiny prior in diffusers format to `folder` (stage 0 trains it)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # no "Writing model shards" bars before a one-line error
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    DDIMScheduler(**TINY_SCHEDULER).save_pretrained(folder / "scheduler")
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)).save_pretrained(folder / "text_encoder")
    _write_tiny_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "vae": ["diffusers", "AutoencoderKL"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
            },
            indent=2,
        )
    )
    return folder


def tiny_prior_path() -> Path:
    return unirestore_home() / "priors" / "tiny"


def _is_current_tiny(folder: Path) -> bool:
    """True when the cached tiny prior has this version's architecture (a cache from an older one is rebuilt)."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    def same(config: dict, preset: dict) -> bool:  # scaling_factor is set by stage 0, not the architecture
        return all(config.get(key) == value for key, value in preset.items() if key != "scaling_factor")

    return same(vae, TINY_VAE) and same(unet, TINY_UNET)


def tiny_native_size() -> int:
    """The tiny preset's native image side (its `Prior.native_size`) without loading it."""
    return _native_size(TINY_VAE["block_out_channels"], TINY_UNET["sample_size"])


def ensure_tiny_prior() -> Path:
    """The cached tiny prior; written (untrained) on first use, atomically, if absent or of another architecture.

    `unirestore train` replaces it with the stage-0 trained prior when that has not run yet.
    """
    target = tiny_prior_path()
    if all((target / sub).is_dir() for sub in PRIOR_SUBFOLDERS) and _is_current_tiny(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
    try:
        build_tiny_prior(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# A prior from configs alone (random weights): for benchmarks and structure checks at real scale.

# The architecture of stabilityai/sd-turbo (Stable Diffusion 2.1 at 512²).
SD_TURBO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

SD_TURBO_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    **SD_UNET_BLOCKS,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "norm_num_groups": 32,
    "use_linear_projection": True,
}


def build_prior_from_configs(
    vae_config: dict, unet_config: dict, name: str = "random", device: str | torch.device = "cpu", tokens: int = 77
) -> Prior:
    """A frozen prior with random weights built from config dicts (on `device`, which may be `meta`)."""
    with torch.device(device):
        vae = AutoencoderKL(**vae_config)
        unet = UNet2DConditionModel(**unet_config)
        embeds = torch.zeros(1, tokens, unet.config.cross_attention_dim)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    return Prior(
        vae=freeze(vae),
        unet=freeze(unet),
        scheduler=scheduler,
        empty_prompt_embeds=embeds,
        name=name,
        fingerprint=fingerprint_configs(vae.config, unet.config, scheduler.config),
    )
