"""Token embeddings trained with the LoRA (pivotal tuning): only the words' vectors learn, the files
load in distilsd and in plain diffusers alike, and what cannot use them refuses in one line."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distilsd.distill import load_config, run_training
from distilsd.errors import InputError

from .conftest import generate_image, lora_overrides

WORDS = [
    "hexagon",
    "square",
]  # hex + agon</w>: two pieces, added as new tokens; square</w>: one, in the vocabulary


@pytest.fixture(scope="module")
def hexagon_data_dir(lora_data_dir, tmp_path_factory):
    """The LoRA data with its circles called hexagons (a word of two BPE pieces)."""
    data = tmp_path_factory.mktemp("hexagon-data") / "data"
    shutil.copytree(lora_data_dir, data)
    listing = data / "metadata.jsonl"
    listing.write_text(listing.read_text().replace("circle", "hexagon"))
    return data


def _overrides(model, data, run, **extra):
    values = {
        "lora.token_embeddings": WORDS,
        "lora.token_embedding_lr": 5e-2,
        "max_steps": 2,
        "checkpoint_every": 1,
    }
    return lora_overrides(model, data, run, **{**values, **extra})


@pytest.fixture(scope="module")
def embedding_run(tiny_pipeline_dir, hexagon_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("embedding-run") / "run"
    run_training(load_config(overrides=_overrides(tiny_pipeline_dir, hexagon_data_dir, run)))
    return run


def _encode(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_only_the_words_vectors_train_and_the_files_are_written(tiny_pipeline_dir, embedding_run):
    from diffusers import StableDiffusionPipeline

    from distilsd.lora.embeddings import word_pieces
    from distilsd.lora.files import LoRASpec, apply_loras

    info = json.loads((embedding_run / "lora_info.json").read_text())
    assert info["token_embeddings"] == {w: f"embeddings/{w}.safetensors" for w in WORDS}
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    matrix = base.text_encoder.get_input_embeddings().weight.detach().clone()
    vectors = {}
    for word in WORDS:
        tensors = load_file(str(embedding_run / "embeddings" / f"{word}.safetensors"))
        assert list(tensors) == ["emb_params"]
        ids = word_pieces(base.tokenizer, word)
        vectors[word] = tensors["emb_params"]
        assert vectors[word].shape == (len(ids), matrix.shape[1])
        assert (vectors[word] - matrix[ids]).abs().max() > 1e-3, f"the vectors of {word} must have trained"
    # A checkpoint keeps the words' vectors only (resumable), not the embedding matrix.
    (name,) = load_file(
        str(embedding_run / "checkpoints" / "checkpoint-2" / "text_encoder" / "model.safetensors")
    )
    assert name.endswith("token_embedding.vectors")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    apply_loras(pipe, [LoRASpec(embedding_run)])
    loaded = pipe.text_encoder.get_input_embeddings().weight.detach()
    # hexagon: new tokens hexagon, hexagon_1 after the vocabulary; square: its own row set.
    assert loaded.shape[0] == matrix.shape[0] + 2
    square = word_pieces(pipe.tokenizer, "square")
    hexagon = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("hexagon", "hexagon_1")]
    assert torch.equal(loaded[hexagon], vectors["hexagon"]) and torch.equal(loaded[square], vectors["square"])
    others = torch.ones(matrix.shape[0], dtype=torch.bool)
    others[square] = False
    assert torch.equal(loaded[: matrix.shape[0]][others], matrix[others]), (
        "every other row stays bit-identical"
    )
    # Prompts without the words encode as before.
    torch.testing.assert_close(
        _encode(pipe.text_encoder, pipe.tokenizer, "a red circle"),
        _encode(base.text_encoder, base.tokenizer, "a red circle"),
        rtol=0,
        atol=0,
    )


def test_the_loaded_words_encode_as_the_trained_text_encoder_did(tiny_pipeline_dir, tmp_path):
    """The trainer's WordEmbeddings and diffusers' load_textual_inversion give the same text embeddings."""
    from diffusers import StableDiffusionPipeline

    from distilsd.lora.embeddings import install_word_embeddings, load_word_embeddings, save_word_embeddings

    trained = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    module = install_word_embeddings(trained.text_encoder, trained.tokenizer, WORDS)
    with torch.no_grad():
        module.vectors.add_(torch.randn(module.vectors.shape, generator=torch.Generator().manual_seed(0)))
    written = save_word_embeddings(tmp_path, module)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    assert load_word_embeddings(loaded, [tmp_path / path for path in written.values()]) == WORDS
    for prompt in ("a red hexagon", "a hexagon beside a blue square", "a red circle"):
        torch.testing.assert_close(
            _encode(
                loaded.text_encoder, loaded.tokenizer, loaded.maybe_convert_prompt(prompt, loaded.tokenizer)
            ),
            _encode(trained.text_encoder, trained.tokenizer, prompt),
            msg=prompt,
        )


def _generate(run_cli, tmp_path, model, name, *extra) -> np.ndarray:
    return generate_image(run_cli, tmp_path / name, model, "a red hexagon", *extra)


def test_generate_uses_the_embeddings_as_plain_diffusers_does(
    tiny_pipeline_dir, embedding_run, run_cli, tmp_path
):
    from diffusers import StableDiffusionPipeline

    with_words = _generate(run_cli, tmp_path, tiny_pipeline_dir, "words", "--lora", str(embedding_run))
    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(embedding_run, adapter_only, ignore=shutil.ignore_patterns("checkpoints", "embeddings"))
    without = _generate(run_cli, tmp_path, tiny_pipeline_dir, "adapter", "--lora", str(adapter_only))
    assert np.abs(with_words - without).max() > 8, "the trained embedding must change the image"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(str(embedding_run), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(str(embedding_run / "embeddings" / "hexagon.safetensors"), token="hexagon")
    image = pipe(
        "a red hexagon", num_inference_steps=3, guidance_scale=5, generator=torch.Generator().manual_seed(5)
    ).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - with_words).max() <= 1


def _words_run(model, folder):
    """A LoRA run folder with a random U-Net adapter and a random two-vector embedding of "hexagon"."""
    from safetensors.torch import save_file

    from distilsd.testing import save_random_lora

    run = folder / "words-run"
    (run / "embeddings").mkdir(parents=True)
    save_random_lora(model, run / "pytorch_lora_weights.safetensors", seed=1)
    dim = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    save_file({"emb_params": torch.randn(2, dim)}, str(run / "embeddings" / "hexagon.safetensors"))
    return run


def test_token_embedding_settings_are_refused_in_one_line(
    tiny_pipeline_dir, hexagon_data_dir, tmp_path, expect_cli_error
):
    common = ["train", "--model", str(tiny_pipeline_dir), "--data", str(hexagon_data_dir), "--resolution", "64",
              "--max-steps", "1", "--no-progress", "validation.prompts=[]"]  # fmt: skip
    expect_cli_error(
        [*common, "-o", str(tmp_path / "a"), "--train-token-embedding", "hexagon"], "--lora-rank"
    )
    expect_cli_error(
        [*common, "-o", str(tmp_path / "b"), "--lora-rank", "2", "--train-token-embedding", "red hexagon"],
        "is not one word",
    )
    expect_cli_error(
        [*common, "-o", str(tmp_path / "c"), "--lora-rank", "2", "--train-token-embedding", "hexagon",
         "--token-embedding-lr", "0"],
        "--token-embedding-lr) must be more than 0",
    )  # fmt: skip
    expect_cli_error(
        ["dreambooth", "-m", str(tiny_pipeline_dir), "--instance-data", str(hexagon_data_dir),
         "--instance-prompt", "a hexagon", "--train-token-embeddings", "-o", str(tmp_path / "d")],
        "there is no class prompt", "--train-token-embedding WORD",
    )  # fmt: skip
    expect_cli_error(
        ["dreambooth", "-m", str(tiny_pipeline_dir), "--instance-data", str(hexagon_data_dir), "--full",
         "--instance-prompt", "a hexagon", "--train-token-embedding", "hexagon", "-o", str(tmp_path / "e")],
        "not with --full",
    )  # fmt: skip
    with pytest.raises(InputError, match="teacher's text embeddings"):
        load_config(
            overrides=_overrides(
                tiny_pipeline_dir, hexagon_data_dir, tmp_path / "g", teacher=str(tiny_pipeline_dir)
            )
        )


@pytest.mark.slow
def test_an_export_carries_the_words_and_draws_generate_loras_image(
    tiny_pipeline_dir, unet_lora_run, run_cli, tmp_path
):
    """`export --lora RUN` with token embeddings: the added tokens (hexagon, hexagon_1) and the
    replaced vocabulary row (square) go into the exported tokenizer and text encoder."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    # A trained adapter (a random one makes the tiny pipeline too sensitive to the rounding of fusing)
    # with random vectors for a word of two pieces and a word of the vocabulary.
    adapter_only, run = tmp_path / "adapter-only", tmp_path / "words-run"
    for folder in (adapter_only, run):
        folder.mkdir()
        shutil.copy(unet_lora_run / "pytorch_lora_weights.safetensors", folder)
    (run / "embeddings").mkdir()
    dim = json.loads((tiny_pipeline_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    for word, pieces in [("hexagon", 2), ("square", 1)]:
        vectors = torch.randn(pieces, dim, generator=generator)
        save_file({"emb_params": vectors}, str(run / "embeddings" / f"{word}.safetensors"))
    export = tmp_path / "onnx"
    code, _, err = run_cli(
        ["export", "-m", str(tiny_pipeline_dir), "--format", "onnx", "--lora", str(run), "-o", str(export)]
    )
    assert code == 0, err
    manifest = json.loads((export / "distilsd-export.json").read_text())
    assert manifest["source"]["token_embeddings"] == ["hexagon", "square"]
    prompt = "a red hexagon and a square"
    exported = generate_image(run_cli, tmp_path / "exported", export, prompt)
    with_words = generate_image(run_cli, tmp_path / "torch", tiny_pipeline_dir, prompt, "--lora", str(run))
    without_words = generate_image(run_cli, tmp_path / "adapter", tiny_pipeline_dir, prompt, "--lora", str(adapter_only))
    # fp32 ONNX Runtime: rounding only; the words' vectors move the image far more than that.
    assert np.abs(exported - with_words).mean() < 1.0
    assert np.abs(exported - with_words).mean() < np.abs(without_words - with_words).mean() / 4


def test_a_word_already_loaded_is_refused(tiny_pipeline_dir, embedding_run):
    from diffusers import StableDiffusionPipeline

    from distilsd.lora.files import LoRASpec, apply_loras

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    apply_loras(pipe, [LoRASpec(embedding_run)])
    with pytest.raises(InputError, match="already a token of this tokenizer"):
        apply_loras(pipe, [LoRASpec(embedding_run, name="again")])


def test_serve_loads_a_loras_token_embeddings_for_its_requests_only(tiny_pipeline_dir, run_cli, tmp_path):
    """A tagged request draws `generate --lora`'s image; the next one without the tag the base model's,
    with the matrix, the tokenizer and the prompt encodings exactly as before."""
    from fastapi.testclient import TestClient
    from safetensors.torch import save_file

    from distilsd.serve.api import create_app
    from distilsd.serve.loras import gate_for
    from distilsd.serve.service import ServeSettings, Service, load_models

    loras = tmp_path / "loras"
    words = _words_run(tiny_pipeline_dir, loras)
    square = loras / "square-run"  # "square" is one vocabulary token: its row is overwritten
    shutil.copytree(words, square, ignore=shutil.ignore_patterns("embeddings"))
    (square / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, 32) * 3}, str(square / "embeddings" / "square.safetensors"))
    with_words = generate_image(
        run_cli, tmp_path / "g-words", tiny_pipeline_dir, "a red hexagon", "--lora", str(words)
    )
    base = generate_image(run_cli, tmp_path / "g-base", tiny_pipeline_dir, "a red hexagon")
    assert np.abs(with_words - base).max() > 8

    pipelines = load_models(ServeSettings(models=[str(tiny_pipeline_dir)], device="cpu"))
    settings = ServeSettings(models=list(pipelines), device="cpu", ui=False, lora_dir=str(loras))
    service = Service(settings, pipelines=pipelines)
    pipe = next(iter(pipelines.values())).pipeline
    tokenizer, matrix = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight.data_ptr()
    texts = ("a red circle", "a blue square", "a red hexagon")
    encoded = {text: _encode(pipe.text_encoder, tokenizer, text) for text in texts}
    hash_before = service.model_hash(service.default_model)

    def unchanged():
        assert pipe.tokenizer is tokenizer and len(tokenizer) == 49408
        assert pipe.text_encoder.get_input_embeddings().weight.data_ptr() == matrix  # the very tensor
        assert pipe.text_encoder.config.vocab_size == 49408
        for text in texts:  # bit for bit
            assert torch.equal(_encode(pipe.text_encoder, pipe.tokenizer, text), encoded[text]), text

    service.start()
    try:
        with TestClient(create_app(service), raise_server_exceptions=False) as client:

            def image(prompt: str, endpoint: str = "/v1/txt2img") -> np.ndarray:
                body = {"prompt": prompt, "seed": 5, "num_inference_steps": 3, "guidance_scale": 5}
                if endpoint.startswith("/sdapi"):
                    body = {"prompt": prompt, "seed": 5, "steps": 3, "cfg_scale": 5}
                response = client.post(endpoint, json=body)
                assert response.status_code == 200, response.text
                images = response.json()["images"]
                b64 = images[0]["image"] if isinstance(images[0], dict) else images[0]
                png = Image.open(io.BytesIO(base64.b64decode(b64)))
                return np.asarray(png.convert("RGB"), dtype=np.int16)

            assert {item["name"]: item["words"] for item in client.get("/v1/loras").json()["loras"]} == {
                "square-run": ["square"], "words-run": ["hexagon"],
            }  # fmt: skip
            assert np.abs(image("a red hexagon <lora:words-run:1>") - with_words).max() <= 1
            gate = gate_for(pipe)
            loaded = gate.words
            assert "hexagon" in pipe.tokenizer.added_tokens_encoder and "hexagon" not in tokenizer.get_vocab()
            image("a red hexagon <lora:words-run:0.5>", "/sdapi/v1/txt2img")
            assert gate.words is loaded, "another weight of the same LoRA keeps its words loaded"
            service._hashes.clear()
            # The model's hash is the checkpoint's, not that of the matrix with the words.
            assert service.model_hash(service.default_model) == hash_before
            assert np.abs(image("a red hexagon", "/sdapi/v1/txt2img") - base).max() == 0
            unchanged()
            # Back to the LoRA: its words were kept aside, and draw the same image.
            assert np.abs(image("a red hexagon <lora:words-run:1>") - with_words).max() <= 1
            assert gate.words is loaded
            # From one LoRA's words straight to another's: the overwritten row is the mix's only.
            image("a blue square <lora:square-run:1>")
            assert "hexagon" not in pipe.tokenizer.added_tokens_encoder
            now = _encode(pipe.text_encoder, pipe.tokenizer, "a blue square")
            assert not torch.equal(now, encoded["a blue square"])
            assert np.abs(image("a red hexagon <lora:words-run:0>") - base).max() == 0  # weight 0: no tag
            unchanged()
    finally:
        service.shutdown(timeout=30)


def test_serve_refuses_two_loras_of_one_word_in_a_prompt(tiny_pipeline_dir, tmp_path):
    """A token takes one set of vectors: a 400 naming both LoRAs and the word."""
    from fastapi.testclient import TestClient

    from distilsd.serve.api import create_app
    from distilsd.serve.service import GenerationRequest, ServeSettings, Service, load_models

    words = _words_run(tiny_pipeline_dir, tmp_path)
    shutil.copytree(words, tmp_path / "twin-run")
    pipelines = load_models(ServeSettings(models=[str(tiny_pipeline_dir)], device="cpu"))
    settings = ServeSettings(models=list(pipelines), device="cpu", ui=False, lora_dir=str(tmp_path))
    service = Service(settings, pipelines=pipelines)
    service.start()
    try:
        with TestClient(create_app(service), raise_server_exceptions=False) as client:
            prompt = "a hexagon <lora:words-run:1> <lora:twin-run:0.5>"
            response = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2})
    finally:
        service.shutdown(timeout=30)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "LoRAs 'words-run' and 'twin-run' both carry a trained token embedding of 'hexagon'" in detail
    assert "\n" not in detail and response.json()["field"] == "prompt"
    # At weight 0 a tag is no tag (as in A1111): its words are not loaded, nothing clashes.
    request = GenerationRequest("a hexagon <lora:words-run:1> <lora:twin-run:0>")
    assert [lora.name for lora, _ in service.prompt_loras(request, service.default_model)[1]] == [
        "words-run", "twin-run",
    ]  # fmt: skip


def test_token_embeddings_resume_exactly(tiny_pipeline_dir, hexagon_data_dir, tmp_path):
    extra = {"max_steps": 4, "checkpoint_every": 2, "optim.lr_scheduler": "cosine", "lora.text_encoder": True}
    reference = tmp_path / "reference"
    run_training(load_config(overrides=_overrides(tiny_pipeline_dir, hexagon_data_dir, reference, **extra)))
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "lora_info.json", "embeddings"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    run_training(
        load_config(
            overrides=_overrides(tiny_pipeline_dir, hexagon_data_dir, resumed, resume="latest", **extra)
        )
    )
    for name in ("pytorch_lora_weights.safetensors", *(f"embeddings/{w}.safetensors" for w in WORDS)):
        want, got = load_file(str(reference / name)), load_file(str(resumed / name))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")
    # Other words cannot be resumed into the run.
    with pytest.raises(InputError):
        run_training(
            load_config(
                overrides=_overrides(
                    tiny_pipeline_dir, hexagon_data_dir, resumed, resume="latest",
                    **{**extra, "max_steps": 6, "lora.token_embeddings": ["hexagon"]},
                )
            )
        )  # fmt: skip


def test_dreambooth_trains_the_instance_tokens_embeddings(
    tiny_pipeline_dir, hexagon_data_dir, tmp_path, run_cli
):
    run, instances = tmp_path / "dreambooth", tmp_path / "instances"
    instances.mkdir()
    for name in ("0000.png", "0001.png"):  # captioned with the instance prompt
        shutil.copyfile(hexagon_data_dir / name, instances / name)
    code, out, err = run_cli(
        ["dreambooth", "-m", str(tiny_pipeline_dir), "--instance-data", str(instances),
         "--instance-prompt", "a hexagon", "--class-prompt", "a square", "--prior-loss-weight", "0",
         "--train-token-embeddings", "--token-embedding-lr", "5e-3", "--max-steps", "1", "--batch-size", "1",
         "--resolution", "64", "-q", "-o", str(run)]
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == ["hexagon.safetensors"]
    assert json.loads((run / "dreambooth_info.json").read_text())["token_embeddings"] == ["hexagon"]
    config = load_config(run / "config.yaml")
    assert config.lora.token_embeddings == ["hexagon"] and config.lora.token_embedding_lr == 5e-3


def test_two_phases_train_the_embeddings_first_then_the_adapters(
    tiny_pipeline_dir, hexagon_data_dir, tmp_path, expect_cli_error
):
    """lora.token_embedding_steps 2 of 4: steps 1-2 move only the words' vectors, steps 3-4 only the adapters."""
    run = tmp_path / "two-phase"
    extra = {"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 10, "lora.token_embedding_steps": 2}
    run_training(load_config(overrides=_overrides(tiny_pipeline_dir, hexagon_data_dir, run, **extra)))

    def state(step: int) -> tuple[dict, dict]:
        folder = run / "checkpoints" / f"checkpoint-{step}"
        words = load_file(str(folder / "text_encoder" / "model.safetensors"))
        adapters = {
            key: value
            for path in (folder / "unet").glob("*.safetensors")
            for key, value in load_file(str(path)).items()
            if "lora" in key
        }
        assert adapters, f"no adapter weights found in {sorted(p.name for p in folder.iterdir())}"
        return words, adapters

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    states = {step: state(step) for step in (1, 2, 3, 4)}
    for step in (2, 3, 4):
        words_before, adapters_before = states[step - 1]
        words_now, adapters_now = states[step]
        if step <= 2:
            assert not same(words_before, words_now) and same(adapters_before, adapters_now), step
        else:
            assert same(words_before, words_now) and not same(adapters_before, adapters_now), step

    common = ["--instance-data", str(hexagon_data_dir), "--instance-prompt", "a hexagon", "--resolution", "64"]
    expect_cli_error(
        ["dreambooth", "-m", str(tiny_pipeline_dir), *common, "--token-embedding-steps", "2", "-o", str(tmp_path / "a")],
        "no token embeddings train", "--train-token-embeddings",
    )  # fmt: skip
    expect_cli_error(
        ["train", "--model", str(tiny_pipeline_dir), "--data", str(hexagon_data_dir), "--resolution", "64",
         "--lora-rank", "2", "--train-token-embedding", "hexagon", "--token-embedding-steps", "5", "--max-steps", "5",
         "--no-progress", "-o", str(tmp_path / "b")],
        "token_embedding_steps (--token-embedding-steps) must be from 1 to max_steps (--max-steps) - 1 = 4",
    )  # fmt: skip
