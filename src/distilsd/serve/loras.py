"""LoRAs in serving: a folder of LoRA files, AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` prompt tags, and
adapters switched per request.

``distilsd serve --lora-dir DIR`` serves every LoRA in DIR by its file stem (a run folder
holding ``pytorch_lora_weights.safetensors`` by the folder's name). A prompt picks them as
AUTOMATIC1111 does: ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>`` (``<lora:NAME:TE:UNET>`` and the
named ``te=`` / ``unet=`` weigh the text encoder and the U-Net apart); the tags are cut out of
the text that is encoded and kept in the image's infotext.

Each LoRA is loaded into a model once, as a peft adapter of its own (diffusers'
``load_lora_weights(..., adapter_name=...)``). A request then activates its adapters with its
weights (``set_adapters``) or, without tags, turns them off (``disable_lora``): switching costs
no weight copies, and an adapter left off computes exactly the base layer, so nothing leaks into
the next request. Fusing per request instead would rewrite the base weights each time and
accumulate rounding. The adapters' state lives in modules every worker shares, so an
:class:`AdapterGate` lets jobs of the same LoRA mix run together and makes a job that needs
another mix wait until the running ones are done (in arrival order).

A run folder's trained token embeddings (``embeddings/<word>.safetensors``) are loaded by the
gate too, when a mix with that LoRA becomes active, into copies of the text encoder's
embedding matrix and of the tokenizer; switching to a mix without it puts the model's own
back (:class:`ModelWords`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilsd.errors import InputError

# distilsd.lora.files imports torch: it is imported where it is used, not with the server's modules.
from distilsd.lora.names import KOHYA_WEIGHTS, LORA_WEIGHTS

log = logging.getLogger(__name__)

# AUTOMATIC1111's extra-network syntax (modules/extra_networks.py: re_extra_net).
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_NETWORKS = ("lora", "lyco")  # A1111 reads <lyco:...> as <lora:...>
REFUSED_NETWORKS = {"hypernet": "hypernetworks are not served here"}


def _request_error(message: str, hint: str | None = None, field_name: str = "prompt"):
    from distilsd.errors import RequestError

    return RequestError(field_name, message, hint)


@dataclass(frozen=True)
class LoRATag:
    """One ``<lora:...>`` of a prompt: the LoRA's name and its text-encoder and U-Net weights."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    @property
    def weight(self) -> float | dict[str, float]:
        """The weight as diffusers' ``set_adapters`` takes it: one number, or one per component."""
        return self.unet if self.te == self.unet else {"unet": self.unet, "text_encoder": self.te}


def _number(text: str, tag: str, field_name: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise _request_error(f"{tag}: weight '{text}' is not a number", field_name=field_name) from None
    if not math.isfinite(value):
        raise _request_error(f"{tag}: weight '{text}' is not a finite number", field_name=field_name)
    return value


def parse_lora_tags(prompt: str, field_name: str = "prompt") -> tuple[str, list[LoRATag]]:
    """(the prompt without its LoRA tags, the tags), as A1111 reads ``<lora:NAME[:TE[:UNET]]>``.

    A1111's named arguments ``te=`` and ``unet=`` are read too; ``dyn=`` (LyCORIS' dynamic rank)
    and hypernetwork tags are refused. Other ``<word:text>`` stays in the prompt as text.
    """
    tags: list[LoRATag] = []

    def found(match: re.Match) -> str:
        kind, args, text = match.group(1), match.group(2), match.group(0)
        if kind in REFUSED_NETWORKS:
            raise _request_error(
                f"{text} cannot be honoured: {REFUSED_NETWORKS[kind]}", field_name=field_name
            )
        if kind not in LORA_NETWORKS:
            return text
        positional, named = [], {}
        for item in args.split(":"):
            key, sep, value = item.partition("=")
            if sep and key.strip() in ("te", "unet", "dyn"):
                named[key.strip()] = value.strip()
            else:
                positional.append(item.strip())
        if "dyn" in named:
            raise _request_error(
                f"{text}: dyn= (LyCORIS' dynamic rank) is not supported", field_name=field_name
            )
        if not positional or not positional[0]:
            raise _request_error(
                f"{text} names no LoRA", hint="write <lora:NAME:WEIGHT>", field_name=field_name
            )
        if len(positional) > 3:
            raise _request_error(
                f"{text} has {len(positional)} parts; expected <lora:NAME[:TE_WEIGHT[:UNET_WEIGHT]]>",
                field_name=field_name,
            )
        te = _number(positional[1], text, field_name) if len(positional) > 1 else 1.0
        te = _number(named["te"], text, field_name) if "te" in named else te
        unet = _number(positional[2], text, field_name) if len(positional) > 2 else te
        unet = _number(named["unet"], text, field_name) if "unet" in named else unet
        tags.append(LoRATag(positional[0], te, unet))
        return ""  # A1111 cuts the tag out of the text it encodes

    return EXTRA_NETWORK.sub(found, prompt), tags


def tag_text(name: str, weight: float) -> str:
    """The tag that asks for LoRA ``name`` at ``weight``: ``<lora:name:0.8>``."""
    return f"<lora:{name}:{weight:g}>"


# ---- the folder ------------------------------------------------------------------------------------


@dataclass
class LoRAFile:
    """One LoRA the server offers."""

    name: str  # the file stem (or run folder name): what <lora:NAME> takes
    path: Path  # the weights file
    metadata: dict[str, Any] = field(default_factory=dict)  # the safetensors header's metadata
    # What caches know the file's content by: path, size and modification time when scanned.
    key: tuple[str, int, int] = ("", 0, 0)
    # A run folder's trained token embeddings (embeddings/<word>.safetensors), found when scanned.
    embeddings: tuple[Path, ...] = ()

    def __post_init__(self):
        if self.key == ("", 0, 0):
            stat = self.path.stat()
            self.key = (str(self.path), stat.st_size, stat.st_mtime_ns)

    @property
    def alias(self) -> str:
        # A1111: the name kohya's trainer stored in the file, else the file's name.
        alias = self.metadata.get("ss_output_name")
        return alias if isinstance(alias, str) and alias else self.name

    @property
    def words(self) -> list[str]:
        """The words whose token embeddings the LoRA carries (each file's stem)."""
        return [path.stem for path in self.embeddings]


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's header metadata; values holding JSON objects decoded, as A1111 does."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        log.warning("skipping %s: not a readable safetensors file (%s)", path, exc)
        raise
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        metadata[key] = value
    return metadata


def addnet_hash(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor bytes (the header skipped): A1111's LoRA hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_length)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return addnet_hash(path)


class LoRALibrary:
    """The LoRAs of ``--lora-dir``, by name; :meth:`refresh` rescans the folder."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise InputError(f"--lora-dir {folder} is not a folder")
        self.allow_pickle = allow_pickle
        self.files: dict[str, LoRAFile] = {}
        self.pickled: dict[str, Path] = {}  # refused pickles by name, to say why a tag naming one fails
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.refresh()

    def _candidates(self) -> Iterator[tuple[str, Path]]:
        from distilsd.lora.files import PICKLED

        suffixes = (".safetensors", *PICKLED)
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix.lower() in suffixes:
                yield entry.stem, entry
            elif entry.is_dir():
                # A run folder (distilsd train / dreambooth -o FOLDER) goes by the folder's name.
                for weights in (LORA_WEIGHTS, KOHYA_WEIGHTS):
                    if (entry / weights).is_file():
                        yield entry.name, entry / weights
                        break

    def refresh(self) -> None:
        """Rescan the folder (A1111's /sdapi/v1/refresh-loras)."""
        from distilsd.lora.embeddings import embedding_files
        from distilsd.lora.files import PICKLED

        files: dict[str, LoRAFile] = {}
        pickled: dict[str, Path] = {}
        for name, path in self._candidates():
            if name in files or name in pickled:
                log.warning(
                    "two LoRAs are named %s; serving %s, not %s",
                    name,
                    files[name].path if name in files else pickled[name],
                    path,
                )
                continue
            if path.suffix.lower() in PICKLED:
                if not self.allow_pickle:
                    pickled[name] = path
                    continue
                files[name] = LoRAFile(name, path)
                continue
            try:
                files[name] = LoRAFile(
                    name, path, safetensors_metadata(path), embeddings=tuple(embedding_files(path))
                )
            except Exception:  # noqa: BLE001 (logged: one bad file must not hide the others)
                continue
        if pickled:
            log.warning(
                "not serving %d pickled LoRA(s) (%s): loading a pickle can run code; pass --allow-pickle if you trust them",
                len(pickled),
                ", ".join(sorted(pickled)),
            )
        with self._lock:
            self.files, self.pickled = files, pickled

    def find(self, name: str, field_name: str = "prompt") -> LoRAFile:
        """The LoRA a tag names (by name, or by the alias stored in the file); a 400 naming it if none."""
        with self._lock:
            files, pickled = self.files, self.pickled
        if name in files:
            return files[name]
        for lora in files.values():
            if lora.alias == name:
                return lora
        if name in pickled:
            raise _request_error(
                f"LoRA '{name}' ({pickled[name].name}) is a pickle, and loading a pickle can run arbitrary code",
                hint="convert it to .safetensors, or start the server with --allow-pickle if you trust its source",
                field_name=field_name,
            )
        raise _request_error(
            f"LoRA '{name}' is not served here",
            hint="served LoRAs (GET /sdapi/v1/loras): " + (", ".join(files) or "none"),
            field_name=field_name,
        )

    def served(self) -> list[LoRAFile]:
        """The LoRAs served now (the folder scan's order)."""
        with self._lock:
            return list(self.files.values())

    def listing(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras: name, alias, path and metadata of each (A1111 lists no words)."""
        return [
            {"name": lora.name, "alias": lora.alias, "path": str(lora.path), "metadata": lora.metadata}
            for lora in self.served()
        ]

    def shorthash(self, lora: LoRAFile) -> str:
        """The first 12 hex digits of A1111's hash of the file, computed once per file version."""
        key = lora.key
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = file_hash(lora.path)
            with self._lock:
                self._hashes[key] = known
        return known[:12]


def lora_hashes(library: LoRALibrary, used: list[tuple[LoRAFile, LoRATag]]) -> str:
    """A1111's ``Lora hashes`` infotext field: ``name: shorthash, ...`` (names as the prompt wrote them)."""
    seen: dict[str, str] = {}
    for lora, tag in used:
        alias = tag.name.replace(":", "").replace(",", "")
        seen.setdefault(alias, library.shorthash(lora))
    return ", ".join(f"{alias}: {short}" for alias, short in seen.items())


# ---- adapters of a loaded pipeline ----------------------------------------------------------------


# LoRAs a served model keeps loaded as adapters (serve --max-loaded-loras); beyond that the least
# recently used are deleted, so a server that sees many LoRAs does not keep them all in memory.
MAX_LOADED_LORAS = 8

# One entry per LoRA: (its file's key, text-encoder weight, U-Net weight); () is "no LoRA".
AdapterMix = tuple[tuple[tuple[str, int, int], float, float], ...]


def adapter_mix(used: list[tuple[LoRAFile, LoRATag]]) -> AdapterMix:
    """The canonical mix of ``used``: a LoRA named twice adds its weights (both tags apply in
    A1111); weight 0 everywhere is the same as no tag, so it is left out."""
    summed: dict[tuple, list[float]] = {}
    for lora, tag in used:
        weights = summed.setdefault(lora.key, [0.0, 0.0])
        weights[0] += tag.te
        weights[1] += tag.unet
    return tuple(sorted((key, te, unet) for key, (te, unet) in summed.items() if te != 0.0 or unet != 0.0))


def check_words_apart(used: list[tuple[LoRAFile, LoRATag]], field_name: str = "prompt") -> None:
    """A 400 naming both if two LoRAs of a prompt's mix carry token embeddings of the same word
    (a token takes one set of vectors)."""
    owners: dict[str, LoRAFile] = {}
    mixed = {key for key, _, _ in adapter_mix(used)}
    for lora, _ in used:
        if lora.key not in mixed:
            continue
        for word in lora.words:
            owner = owners.setdefault(word, lora)
            if owner.key != lora.key:
                raise _request_error(
                    f"LoRAs '{owner.name}' and '{lora.name}' both carry a trained token embedding of '{word}'; a prompt can use one of them",
                    hint="drop one of the two <lora:...> tags",
                    field_name=field_name,
                )


@dataclass
class ModelWords:
    """A model's own token-embedding matrix and tokenizer, kept to put back exactly.

    diffusers' ``unload_textual_inversion`` would rebuild the matrix as a new ``nn.Embedding``
    (a new object that wants gradients, holding on to the larger matrix's storage), leave the
    text encoder's ``config.vocab_size`` enlarged, rebuild the tokenizer, and could not undo a
    vocabulary word's overwritten row. Putting back the very objects is exact and free.
    """

    module: Any  # the text encoder's input embedding module
    data: Any  # its weight tensor (never written: words are loaded into a copy)
    vocab_size: int  # the text encoder's config.vocab_size
    tokenizer: Any  # the pipeline's tokenizer (words are added to a copy)


@dataclass
class MixWords:
    """The token embeddings of some LoRAs, loaded: the matrix and the tokenizer that hold them."""

    loras: tuple[tuple, ...] | None  # the file keys of the LoRAs whose words these are (None: half-way)
    data: Any  # the embedding matrix with the words (added rows, overwritten vocabulary rows)
    tokenizer: Any  # a copy of the model's tokenizer with the added words


class AdapterGate:
    """The adapters loaded into one pipeline's shared modules, and who is using which mix.

    Jobs with the mix that is active run together; a job that needs another mix waits until
    the running ones are done, and waiting jobs go in arrival order (no mix starves another).
    Loading adapters or token embeddings changes the modules, so it happens only while no job runs.
    """

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        # file key -> peft adapter name, least recently used first
        self.adapters: dict[tuple, str] = {}
        self.active: AdapterMix | None = ()  # None: unknown (a switch failed half-way)
        self.users = 0
        self._waiting: dict[int, AdapterMix] = {}
        self._tickets = itertools.count()
        self.cond = threading.Condition()
        self._modules: dict | None = None
        self._own: ModelWords | None = None  # the model's own matrix and tokenizer, once words load
        self.words: MixWords | None = None  # the token embeddings of the active mix's LoRAs
        self._kept: MixWords | None = None  # the last LoRAs' words, loaded (active or aside)
        # (file key, skip_unknown) -> why it does not fit (None: it does)
        self.fits: dict[tuple, BaseException | None] = {}

    def modules(self) -> dict:
        """The pipeline's adaptable modules as loaded (taken once, before any adapter changes them)."""
        from distilsd.lora.files import module_table

        if self._modules is None:
            with self.cond:  # not while a worker is adding adapters
                if self._modules is None:
                    self._modules = module_table(self.pipeline)
        return self._modules

    def check(self, lora: LoRAFile, allow_pickle: bool, skip_unknown: bool = False) -> None:
        """Raise a 400 if ``lora`` does not fit this pipeline (the first mismatching module), once per file.

        A module the pipeline does not have is refused too, unless ``skip_unknown``
        (``serve --lora-skip-unknown``): then only the modules it has are loaded.
        """
        from distilsd.lora.embeddings import cannot_load_embeddings, read_word_embedding
        from distilsd.lora.files import checked_lora_source

        key = (lora.key, skip_unknown)
        if key not in self.fits:
            try:
                checked_lora_source(
                    self.pipeline,
                    lora.path,
                    allow_pickle=allow_pickle,
                    skip_unknown=skip_unknown,
                    modules=self.modules(),
                )
                if lora.embeddings:
                    cannot_load_embeddings(self.pipeline, list(lora.embeddings))
                    tokenizer = self.model_tokenizer()
                    dim = self.pipeline.text_encoder.get_input_embeddings().weight.shape[1]
                    for path in lora.embeddings:
                        read_word_embedding(path, tokenizer, dim)
                self.fits[key] = None
            except InputError as exc:
                self.fits[key] = exc
        problem = self.fits[key]
        if problem is not None:
            raise _request_error(str(problem.message), getattr(problem, "hint", None))

    @contextmanager
    def use(
        self,
        mix: AdapterMix,
        loras: dict[tuple, LoRAFile],
        allow_pickle: bool,
        should_stop: Callable[[], None],
        skip_unknown: bool = False,
        max_loaded: int = MAX_LOADED_LORAS,
    ):
        """Hold ``mix`` active for the block; ``should_stop`` raises to give up waiting (cancel, deadline).

        ``skip_unknown``: a LoRA loaded now keeps only the modules the pipeline has.
        ``max_loaded``: adapters kept loaded; the least recently used others are deleted.
        """
        ticket = next(self._tickets)
        with self.cond:
            self._waiting[ticket] = mix
            try:
                while not self._may_enter(ticket, mix):
                    self.cond.wait(0.25)
                    should_stop()
            finally:
                del self._waiting[ticket]
            if self.active != mix:
                try:
                    self._switch(mix, loras, allow_pickle, skip_unknown, max_loaded)
                except BaseException:
                    self.active = None
                    self.cond.notify_all()
                    raise
                self.active = mix
            self.users += 1
        try:
            yield
        finally:
            with self.cond:
                self.users -= 1
                self.cond.notify_all()

    def _may_enter(self, ticket: int, mix: AdapterMix) -> bool:
        if self.users == 0:
            return ticket == min(self._waiting)
        # Join the running jobs only if nobody waits for another mix (they would wait for ever).
        return self.active == mix and all(waiting == mix for waiting in self._waiting.values())

    def _switch(
        self,
        mix: AdapterMix,
        loras: dict[tuple, LoRAFile],
        allow_pickle: bool,
        skip_unknown: bool,
        max_loaded: int,
    ) -> None:
        from distilsd.lora.files import checked_lora_source, load_lora_adapter, unique_adapter_name

        pipe = self.pipeline
        self._switch_words(tuple(key for key, _, _ in mix if loras[key].embeddings), loras)
        if not mix:
            if self.adapters:
                pipe.disable_lora()
            return
        self.modules()  # taken before the first adapter wraps the layers
        self._evict({key for key, _, _ in mix}, max_loaded)
        names, weights = [], []
        for key, te, unet in mix:
            if key in self.adapters:
                self.adapters[key] = self.adapters.pop(key)  # the most recently used now
            else:
                lora = loras[key]
                source = checked_lora_source(
                    pipe,
                    lora.path,
                    allow_pickle=allow_pickle,
                    skip_unknown=skip_unknown,
                    modules=self._modules,
                )
                name = unique_adapter_name(lora.name, set(self.adapters.values()))
                with warnings.catch_warnings():
                    # peft warns that a model gets a second adapter: holding several is the point here.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    load_lora_adapter(pipe, lora.path, name, source)
                self.adapters[key] = name
                log.info("loaded LoRA %s into %s as adapter %s", lora.path, type(pipe).__name__, name)
            names.append(self.adapters[key])
            weights.append(LoRATag("", te, unet).weight)
        # diffusers' set_adapters does not turn back on the layers disable_lora turned off.
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)

    def model_tokenizer(self) -> Any:
        """The model's own tokenizer: without the words a mix's token embeddings added."""
        with self.cond:  # not half-way through a switch
            return self._own.tokenizer if self._own is not None else self.pipeline.tokenizer

    def unchanged_tensors(self) -> dict[str, Any]:
        """The model's own tensors that loaded token embeddings stand in for, by state-dict name
        (``text_encoder.<module>.weight``): what the model's hash reads. Call with ``cond`` held."""
        if self.words is None:
            return {}
        for name, module in self.pipeline.text_encoder.named_modules():
            if module is self._own.module:
                return {f"text_encoder.{name}.weight": self._own.data}
        return {}

    def _switch_words(self, wanted: tuple[tuple, ...], loras: dict[tuple, LoRAFile]) -> None:
        """Make the token embeddings of the LoRAs ``wanted`` (file keys) the loaded ones, and only them.

        The last LoRAs' words stay loaded aside (one copy of the embedding matrix, 76 MB for SD
        v1.5 in fp16), so requests alternating between them and others switch without copying.
        """
        if self.words is not None and self.words.loras == wanted:
            return  # the same LoRAs at other weights: their words stay (they apply at full strength)
        if self.words is not None:
            self._show(None)
        if not wanted:
            return
        if self._kept is None or self._kept.loras != wanted:
            self._kept = None  # one copy aside at most
            self._kept = self._load_words(wanted, loras)
        self._show(self._kept)

    def _show(self, words: MixWords | None) -> None:
        """Put ``words``' matrix and tokenizer into the pipeline, or the model's own (None)."""
        own, pipe = self._own, self.pipeline
        data = own.data if words is None else words.data
        text_encoder = pipe.text_encoder
        text_encoder.set_input_embeddings(own.module)  # in case a loader swapped in another module
        own.module.weight.data = data
        own.module.num_embeddings = data.shape[0]
        text_encoder.config.vocab_size = own.vocab_size if words is None else data.shape[0]
        pipe.register_modules(tokenizer=own.tokenizer if words is None else words.tokenizer)
        self.words = words

    def _load_words(self, wanted: tuple[tuple, ...], loras: dict[tuple, LoRAFile]) -> MixWords:
        """Load the embeddings as ``generate --lora`` does (diffusers' ``load_textual_inversion``
        adds words, a vocabulary word's row is overwritten), into copies of the model's matrix and
        tokenizer: the model's own stay as they are, to be put back (:class:`ModelWords`)."""
        import copy

        from distilsd.lora.embeddings import load_word_embeddings

        pipe = self.pipeline
        text_encoder = pipe.text_encoder
        if self._own is None:
            module = text_encoder.get_input_embeddings()
            self._own = ModelWords(module, module.weight.data, text_encoder.config.vocab_size, pipe.tokenizer)
        # Marked loaded before anything changes: a load failing half-way is undone by the next switch.
        self.words = MixWords(None, None, None)
        self._own.module.weight.data = self._own.data.clone()
        pipe.register_modules(tokenizer=copy.deepcopy(self._own.tokenizer))
        words = load_word_embeddings(pipe, [path for key in wanted for path in loras[key].embeddings])
        log.info("loaded the token embeddings of %s into %s", ", ".join(words), type(pipe).__name__)
        return MixWords(wanted, text_encoder.get_input_embeddings().weight.data, pipe.tokenizer)

    def _evict(self, wanted: set[tuple], max_loaded: int) -> None:
        """Delete the adapters of replaced file versions, then the least recently used beyond ``max_loaded``.

        Each adapter holds its LoRA's weights on the model's device; without this a server that
        sees many LoRAs (or a LoRA file rewritten in place) would keep every one it ever loaded.
        A mix needing more than ``max_loaded`` LoRAs still gets them all.
        """
        wanted_paths = {key[0] for key in wanted}
        stale = [key for key in self.adapters if key[0] in wanted_paths and key not in wanted]
        room = max_loaded - len(wanted - set(self.adapters))
        unused = [key for key in self.adapters if key not in wanted and key not in stale]
        stale += unused[: max(0, len(self.adapters) - len(stale) - room)]
        if stale:
            names = [self.adapters.pop(key) for key in stale]
            with warnings.catch_warnings():
                # peft names the adapter it makes active instead; _switch sets the active ones next.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self.pipeline.delete_adapters(names)
            log.info("unloaded LoRA adapter(s) %s", ", ".join(names))


# The gate of each loaded pipeline, shared by every service over it (tests build several).
GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def gate_for(pipeline: Any) -> AdapterGate:
    with _GATES_LOCK:
        gate = GATES.get(pipeline)
        if gate is None:
            gate = GATES[pipeline] = AdapterGate(pipeline)
        return gate


def takes_loras(pipeline: Any) -> bool:
    """Whether ``pipeline`` is a PyTorch diffusers pipeline that loads LoRAs (not an ONNX / OpenVINO export)."""
    import torch

    return hasattr(pipeline, "load_lora_weights") and isinstance(
        getattr(pipeline, "unet", None), torch.nn.Module
    )
