"""Text conditioning: transformers T5 / CLIP text encoders from a local folder, or fixed label embeddings.

Every conditioner turns a batch of prompts into `(embeddings (B, L, dim) float32, mask (B, L) bool)`, the
context a DiT cross-attends to, and gives the embedding of the empty prompt for classifier-free guidance
and caption dropout. Nothing is downloaded: models and tokenizers load from `text_encoder.path` only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from videosys.distributed.collectives import CommGroup, broadcast_tensors
from videosys.errors import ConfigError
from videosys.precision import DTYPES

TEXT_ENCODERS = ("none", "t5", "clip")

# Files of which at least one marks a folder as holding a saved tokenizer (fast, sentencepiece or BPE).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
# config.json `model_type` values each encoder loads.
_MODEL_TYPES = {"t5": ("t5",), "clip": ("clip_text_model", "clip")}


@dataclass
class TextEncoderConfig:
    name: str = "none"  # none (label tokens) | t5 | clip
    # Local folder with config.json + weights + tokenizer files, or a diffusers pipeline root that has
    # text_encoder/ and tokenizer/ subfolders. Required for t5 and clip.
    path: str | None = None
    # Tokens per prompt (Open-Sora 300, CogVideoX 226, Latte 120; CLIP caps at 77). For name=none, the label
    # tokens per prompt that encode() and null() give (set it to the data's label token count).
    max_length: int = 300
    dtype: str = "bf16"  # encoder weights and compute: fp32 | bf16 | fp16 (outputs are always fp32)
    embedding_dim: int = 64  # name=none only: width of the fixed label embeddings
    seed: int = 0  # name=none only: seeds the fixed label embeddings


class TextConditioner:
    """Prompts -> (embeddings (B, L, dim) float32, mask (B, L) bool); `null` is the empty prompt."""

    dim: int
    max_length: int
    device: torch.device

    def encode(self, prompts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def null(
        self, batch: int, device: torch.device | None = None, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding and mask, repeated `batch` times.

        `length` matters only for label conditioners (see LabelConditioner.null); text encoders always
        give `max_length` tokens. The empty prompt is encoded once per device, then reused.
        """
        if length is not None and length != self.max_length:
            raise ValueError(f"{type(self).__name__} gives {self.max_length} tokens per prompt, not {length}")
        target = self.device if device is None else torch.device(device)
        nulls = self.__dict__.setdefault("_nulls", {})
        if target not in nulls:
            nulls[target] = self.encode([""], target)
        emb, mask = nulls[target]
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()


def _check_dtype(cfg: TextEncoderConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"text_encoder.dtype={cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[cfg.dtype]


def _encoder_folders(cfg: TextEncoderConfig) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for cfg.path: one folder holding both, or a pipeline root."""
    if not cfg.path:
        raise ConfigError(
            f"text_encoder.path is not set; text_encoder={cfg.name} needs a local folder with the model and its "
            "tokenizer (save_pretrained output, or a diffusers pipeline with text_encoder/ and tokenizer/)"
        )
    root = Path(cfg.path).expanduser()
    how = (
        "create one with T5EncoderModel / CLIPTextModel .save_pretrained(path) and tokenizer.save_pretrained(path), "
        "or point at a local diffusers pipeline that has text_encoder/ and tokenizer/ subfolders"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"text_encoder.path={cfg.path} does not exist; {how}")
    model_dir = root if (root / "config.json").is_file() else root / "text_encoder"
    tokenizer_dir = root if any((root / f).is_file() for f in _TOKENIZER_FILES) else root / "tokenizer"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"text_encoder.path={cfg.path} has no model config.json (looked in {root} and {root / 'text_encoder'}); "
            f"{how}"
        )
    if not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"text_encoder.path={cfg.path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {root} or "
            f"{root / 'tokenizer'}; {how}"
        )
    return model_dir, tokenizer_dir


def _read_model_config(cfg: TextEncoderConfig, name: str) -> dict:
    """config.json of cfg.path's model, checked to be a model that encoder `name` (t5 | clip) loads."""
    model_dir, _ = _encoder_folders(cfg)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES[name]:
        raise ConfigError(
            f"text_encoder.path={cfg.path} holds a {model_type!r} model, not one that text_encoder={name} loads "
            f"(model_type {' or '.join(_MODEL_TYPES[name])}); set text_encoder.name to match the folder"
        )
    return config


def _clip_text_config(config: dict) -> dict:
    # A full CLIPModel config nests the text tower's settings under text_config.
    return config.get("text_config", config) if config.get("model_type") == "clip" else config


def text_embedding_dim(cfg: TextEncoderConfig) -> int:
    """Width of the embeddings `cfg` gives, read from config.json only (no weights, no transformers import)."""
    if cfg.name not in TEXT_ENCODERS:
        raise ConfigError(f"text_encoder.name={cfg.name!r} is unknown; choose one of {list(TEXT_ENCODERS)}")
    if cfg.name == "none":
        return cfg.embedding_dim
    config = _read_model_config(cfg, cfg.name)
    if cfg.name == "t5":
        return config["d_model"]
    return _clip_text_config(config)["hidden_size"]


class _TransformersConditioner(TextConditioner):
    """Shared tokenization and loading for transformers text encoders; subclasses run the model."""

    name: str  # t5 | clip
    model_class: str  # the transformers class that loads it

    def __init__(self, cfg: TextEncoderConfig, device: torch.device):
        import transformers

        dtype = _check_dtype(cfg)
        model_dir, tokenizer_dir = _encoder_folders(cfg)
        self.config = _read_model_config(cfg, self.name)
        self.device = torch.device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model_cls = getattr(transformers, self.model_class)
        self.model = model_cls.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size if self.name == "clip" else self.model.config.d_model
        self.max_length = cfg.max_length

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, max_length), padded and truncated to max_length."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = self.tokenize(prompts)
        emb = self._hidden_states(input_ids, mask).float()
        target = self.device if device is None else torch.device(device)
        return emb.to(target), mask.bool().to(target)


class T5Conditioner(_TransformersConditioner):
    """transformers T5EncoderModel: last_hidden_state with the padding mask passed to attention."""

    name = "t5"
    model_class = "T5EncoderModel"

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


class CLIPConditioner(_TransformersConditioner):
    """transformers CLIPTextModel: last_hidden_state; max_length is capped at the model's positions (77).

    The model runs without the attention mask, as diffusers pipelines call it: CLIP attention is causal,
    so the real tokens do not see the padding either way; the returned mask marks them for the DiT.
    """

    name = "clip"
    model_class = "CLIPTextModel"

    def __init__(self, cfg: TextEncoderConfig, device: torch.device):
        super().__init__(cfg, device)
        self.max_length = min(cfg.max_length, self.model.config.max_position_embeddings)

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


class LabelConditioner(TextConditioner):
    """Class-label tokens -> fixed random embeddings (text_encoder=none).

    Token i (a word of `vocab`) maps to row i of a fixed table of unit-variance random vectors drawn
    from a torch.Generator seeded with `seed` (the same on every run and process, not trained: the
    model's caption projection learns from them). Row len(vocab) is the null token, the "empty prompt".

    `encode(prompts)` looks the prompt's words up in the vocabulary (case-insensitive; an entry of
    several words matches those words in sequence; other words are skipped), so "a 3 moving left" with
    vocab ("0", ..., "9", "left", "right", "up", "down") gives tokens [3, 10]. Prompts give exactly
    `max_length` tokens: shorter ones are padded with the null token and mask False, longer ones cut.
    `encode_tokens` takes token ids as the data gives them (item["label_tokens"]), all unmasked.
    """

    def __init__(
        self,
        vocab: tuple[str, ...],
        embedding_dim: int = 64,
        seed: int = 0,
        max_length: int = 300,
        device: torch.device | str = "cpu",
    ):
        if not vocab:
            raise ConfigError("LabelConditioner needs a non-empty label vocabulary")
        if max_length < 1 or embedding_dim < 1:
            raise ConfigError(f"max_length={max_length} and embedding_dim={embedding_dim} must be >= 1")
        self.vocab = tuple(vocab)
        self.dim = embedding_dim
        self.max_length = max_length
        self.seed = seed
        self.device = torch.device(device)
        self.null_id = len(self.vocab)
        self._phrases: dict[tuple[str, ...], int] = {}
        for index, entry in enumerate(self.vocab):
            words = tuple(_words(entry))
            if not words:
                raise ConfigError(f"label vocabulary entry {entry!r} has no word characters")
            if words in self._phrases:
                raise ConfigError(f"label vocabulary has {entry!r} twice (case-insensitive): {self.vocab}")
            self._phrases[words] = index
        self._longest = max(len(words) for words in self._phrases)
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(len(self.vocab) + 1, embedding_dim, generator=generator)
        self.table = table.to(self.device)

    def tokens(self, prompt: str) -> list[int]:
        """The vocabulary ids of the words of `prompt`, in order (greedy longest match)."""
        words = _words(prompt)
        ids, i = [], 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                index = self._phrases.get(tuple(words[i : i + n]))
                if index is not None:
                    ids.append(index)
                    i += n
                    break
            else:
                i += 1
        return ids

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids in [0, len(vocab)] -> ((B, L, dim) embeddings, (B, L) mask, all True)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 2:
            raise ValueError(f"label tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() > self.null_id):
            raise ValueError(
                f"label tokens must lie in [0, {self.null_id}] for a vocabulary of {len(self.vocab)} words, "
                f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        emb = self.table.to(tokens.device)[tokens]
        return emb, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)

    def encode(self, prompts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for prompt in prompts:
            ids = self.tokens(prompt)
            if not ids:
                raise ConfigError(
                    f"prompt {prompt!r} has no word of the label vocabulary {list(self.vocab)}; with "
                    "text_encoder=none a prompt must name labels the model was trained on"
                )
            ids = ids[: self.max_length]
            rows.append(ids + [self.null_id] * (self.max_length - len(ids)))
        target = self.device if device is None else torch.device(device)
        tokens = torch.tensor(rows, dtype=torch.long, device=target).view(len(prompts), self.max_length)
        emb, _ = self.encode_tokens(tokens)
        return emb, tokens != self.null_id

    def null(
        self, batch: int, device: torch.device | None = None, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The null token's vector repeated to `length` tokens (default max_length), mask all True.

        Pass the token length of the conditional batch (e.g. label_tokens.shape[1]) so that the two
        can be swapped (caption dropout) or stacked (classifier-free guidance).
        """
        target = self.device if device is None else torch.device(device)
        tokens = torch.full((batch, length or self.max_length), self.null_id, dtype=torch.long, device=target)
        return self.encode_tokens(tokens)


def build_text_conditioner(
    cfg: TextEncoderConfig, device: torch.device | str, label_vocab: tuple[str, ...] = ()
) -> TextConditioner:
    """The conditioner `cfg` names; every config and path check runs before any model is loaded."""
    if cfg.name not in TEXT_ENCODERS:
        raise ConfigError(f"text_encoder.name={cfg.name!r} is unknown; choose one of {list(TEXT_ENCODERS)}")
    if cfg.max_length < 1:
        raise ConfigError(f"text_encoder.max_length={cfg.max_length} must be >= 1")
    device = torch.device(device)
    if cfg.name == "none":
        if not label_vocab:
            raise ConfigError(
                "text_encoder=none conditions on label tokens, but the data gives no label vocabulary; "
                "use text_encoder=t5 (or clip) with text_encoder.path, or data with cached text embeddings"
            )
        return LabelConditioner(label_vocab, cfg.embedding_dim, cfg.seed, cfg.max_length, device)
    _check_dtype(cfg)
    _read_model_config(cfg, cfg.name)
    if cfg.name == "t5":
        return T5Conditioner(cfg, device)
    return CLIPConditioner(cfg, device)


class SharedTextEncoder(TextConditioner):
    """A text encoder whose work is done once per group of ranks that share their prompts: rank 0 of
    `comm` encodes and sends the embeddings to the others. Every rank of the group must call it
    together."""

    def __init__(self, inner: TextConditioner, comm: CommGroup, device: torch.device):
        self.inner, self.comm, self.transfer_device = inner, comm, device
        self.dim, self.max_length, self.device = inner.dim, inner.max_length, inner.device

    def encode(self, prompts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        local = None
        if self.comm.rank == 0:
            text, mask = self.inner.encode(prompts, self.transfer_device)
            local = {"text": text, "mask": mask}
        out = broadcast_tensors(local, self.comm, self.transfer_device)
        target = self.device if device is None else torch.device(device)
        return out["text"].to(target), out["mask"].to(target)


def encode_once_per_group(conditioner: TextConditioner | None, comm: CommGroup, device: torch.device):
    """Wrap a text encoder so that a group of ranks sharing their prompts encodes them once. Label
    conditioners (a table lookup) are left as they are."""
    if conditioner is None or comm.size == 1 or isinstance(conditioner, LabelConditioner):
        return conditioner
    return SharedTextEncoder(conditioner, comm, device)
