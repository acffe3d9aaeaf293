"""Token embeddings trained with the LoRA ("pivotal tuning"): a word's input vectors learn too.

The text encoder's embedding matrix stays as it is. :class:`WordEmbeddings` replaces its
``token_embedding`` module during training: where a prompt holds a trained word (the run of its
BPE pieces, ``hexagon`` = ``hex`` + ``agon</w>``), the word's own vectors take the place of the
pieces' rows. Only those vectors are parameters, so the optimizer state and each checkpoint
hold ``n_pieces x dim`` numbers per word (not SD's 49408 x 768 matrix), AdamW's decoupled weight
decay cannot move other rows, and prompts without the word encode exactly as before.

The learnt vectors are written per word as ``embeddings/<word>.safetensors`` holding
``{"emb_params": tensor[n_pieces, dim]}``: AUTOMATIC1111's embedding layout (the file name is the
trigger word), which diffusers' ``load_textual_inversion(path, token=word)`` reads too, adding
``word``, ``word_1``, ... as new tokens. A prompt with the word then gets the same vectors at the
same positions as in training, so the loaded pipeline computes what the trained one did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distilsd.errors import InputError, ModelLoadError

from .names import EMBEDDINGS_DIR, KOHYA_WEIGHTS, LORA_WEIGHTS, bad_embedding_word

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "emb_params"  # AUTOMATIC1111's key for a safetensors embedding


def check_words(words: list[str]) -> list[str]:
    """The words, lowercased and deduplicated in order; one-line refusal for what cannot be a word."""
    checked: list[str] = []
    for word in words:
        lowered = word.strip().lower()
        problem = bad_embedding_word(word)
        if problem:
            raise InputError(
                problem, hint="name single words of the prompts, e.g. --train-token-embedding hexagon"
            )
        if lowered not in checked:
            checked.append(lowered)
    return checked


def word_pieces(tokenizer, word: str) -> list[int]:
    """The BPE piece ids the tokenizer gives ``word`` in a prompt (no start or end token)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise InputError(f"the tokenizer gives the word {word!r} no tokens")
    return list(ids)


class WordEmbeddings(torch.nn.Module):
    """A token embedding whose listed words use trained vectors of their own (see the module doc)."""

    def __init__(self, base: torch.nn.Embedding, pieces: dict[str, list[int]]):
        super().__init__()
        self.base = base
        self.pieces = dict(pieces)
        self.offsets: dict[str, int] = {}
        rows = []
        for word, ids in self.pieces.items():
            self.offsets[word] = sum(len(r) for r in rows)
            rows.append(base.weight.detach()[ids].float().clone())
        self.vectors = torch.nn.Parameter(torch.cat(rows))  # float32 whatever the encoder runs in

    @property
    def weight(self) -> torch.Tensor:  # get_input_embeddings().weight: the (unchanged) matrix
        return self.base.weight

    def word_vectors(self, word: str) -> torch.Tensor:
        start = self.offsets[word]
        return self.vectors[start : start + len(self.pieces[word])]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        slot = torch.full_like(input_ids, -1)
        length = input_ids.shape[-1]
        for word, ids in self.pieces.items():
            n = len(ids)
            if n > length:
                continue
            # Windows where the word's pieces follow each other.
            found = torch.ones_like(input_ids[..., : length - n + 1], dtype=torch.bool)
            for k, piece in enumerate(ids):
                found &= input_ids[..., k : length - n + 1 + k] == piece
            for k in range(n):
                window = slot[..., k : length - n + 1 + k]
                window[found] = self.offsets[word] + k
        hit = slot >= 0
        if not bool(hit.any()):
            return embeds
        trained = self.vectors[slot.clamp(min=0)].to(embeds.dtype)
        return torch.where(hit.unsqueeze(-1), trained, embeds)


def install_word_embeddings(text_encoder, tokenizer, words: list[str]) -> WordEmbeddings:
    """Give ``text_encoder`` trainable vectors for ``words`` (its own weights stay frozen)."""
    pieces = {word: word_pieces(tokenizer, word) for word in check_words(words)}
    module = WordEmbeddings(text_encoder.get_input_embeddings(), pieces)
    text_encoder.set_input_embeddings(module)
    for word, ids in pieces.items():
        logger.info("token embedding of %r trains (%d pieces: %s)", word, len(ids), ids)
    return module


def find_word_embeddings(text_encoder) -> WordEmbeddings | None:
    module = text_encoder.get_input_embeddings()
    return module if isinstance(module, WordEmbeddings) else None


def save_word_embeddings(folder: Path, module: WordEmbeddings) -> dict[str, str]:
    """Write ``folder/embeddings/<word>.safetensors`` per word; return word -> relative path."""
    from safetensors.torch import save_file

    target = folder / EMBEDDINGS_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for word in module.pieces:
        vectors = module.word_vectors(word).detach().to("cpu", torch.float32).contiguous()
        save_file({EMBEDDING_KEY: vectors}, str(target / f"{word}.safetensors"), metadata={"format": "pt"})
        written[word] = f"{EMBEDDINGS_DIR}/{word}.safetensors"
    return written


def embedding_files(lora_path: Path) -> list[Path]:
    """The embedding files of a LoRA run folder (``lora_path`` the folder or its weights file)."""
    if not lora_path.is_dir() and lora_path.name not in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        return []  # a LoRA file of its own, not a run folder's
    folder = lora_path if lora_path.is_dir() else lora_path.parent
    target = folder / EMBEDDINGS_DIR
    return sorted(target.glob("*.safetensors")) if target.is_dir() else []


def read_word_embedding(path: Path, tokenizer, dim: int) -> tuple[str, torch.Tensor, list[int] | None]:
    """(the word, its vectors, the vocabulary row it replaces or None) of one embedding file.

    The file's stem is its word. A word the tokenizer has as one vocabulary token gets that row
    (``[id]``); any other word is added as new tokens (None). One-line refusal for a file that
    cannot be read, vectors of another width than ``dim``, or a vocabulary word of another
    number of vectors (or a word added already).
    """
    from safetensors.torch import load_file

    word = path.stem
    try:
        vectors = load_file(str(path))[EMBEDDING_KEY]
    except Exception as exc:  # safetensors raises several kinds for a broken file
        raise InputError(
            f"cannot read the token embedding {path}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InputError(
            f"token embedding {path} holds vectors of shape {tuple(vectors.shape)}; this text encoder takes {dim}-d vectors",
            hint="use a LoRA trained for this model",
        )
    if word not in tokenizer.get_vocab() and word not in tokenizer.added_tokens_encoder:
        return word, vectors, None
    ids = word_pieces(tokenizer, word)
    if len(ids) != len(vectors) or word in tokenizer.added_tokens_encoder:
        raise InputError(
            f"token embedding {path}: the word {word!r} is already a token of this tokenizer and takes {len(ids)} vectors, the file has {len(vectors)}",
            hint="load it into a fresh pipeline of the model it was trained on",
        )
    return word, vectors, ids


def cannot_load_embeddings(pipe, files: list[Path]) -> None:
    """Refuse in one line a pipeline without diffusers' textual-inversion loader."""
    if files and not hasattr(pipe, "load_textual_inversion"):
        raise InputError(
            f"{type(pipe).__name__} cannot load the token embeddings of {files[0].parent.parent}",
            hint="use a Stable Diffusion pipeline, or delete the run's embeddings/ folder to use the adapter alone",
        )


def load_word_embeddings(pipe, files: list[Path]) -> list[str]:
    """Load embedding files into ``pipe`` (each file's stem is its word); return the words.

    diffusers' ``load_textual_inversion`` adds the word (and ``word_1``, ... for more vectors)
    as new tokens. It refuses a word that already is a token of the vocabulary; such a word is
    one piece, which the trained text encoder replaced wherever it stood, so that row is set
    directly, which is the same thing (the pipeline's own matrix changes: no unloading here;
    ``distilsd serve`` restores the matrix it saved, see serve/loras.py).
    """
    cannot_load_embeddings(pipe, files)
    words = []
    for path in files:
        text_encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
        weight = text_encoder.get_input_embeddings().weight
        word, vectors, ids = read_word_embedding(path, tokenizer, weight.shape[1])
        if ids is not None:
            with torch.no_grad():
                weight[ids] = vectors.to(weight.device, weight.dtype)
        else:
            try:
                pipe.load_textual_inversion(str(path), token=word)
            except ValueError as exc:
                raise ModelLoadError(
                    f"diffusers could not load the token embedding {path}: {str(exc).splitlines()[0][:300]}"
                ) from None
        words.append(word)
    return words
