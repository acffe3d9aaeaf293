"""A live ``distilsd serve`` driven by the real AUTOMATIC1111 client (``webuiapi`` from PyPI), as a
user's existing script would; ``sd-parsers`` reads every PNG it gets back."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi", reason="needs the test extra: pip install -e '.[dev]'")
sd_parsers = pytest.importorskip("sd_parsers", reason="needs the test extra: pip install -e '.[dev]'")

SECOND_MODEL = "pipeline+unet:pipeline"


@pytest.fixture
def live(make_service):
    """(webuiapi client, service) over a server on a loopback port."""
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    service = make_service()
    with serve_in_thread(create_app(service), service, service.settings) as url:
        # Like a script: the client's defaults are Euler a, scheduler "automatic", 20 steps.
        yield webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", steps=2), service


def parsed(image: Image.Image):
    """sd-parsers' reading of a served PNG: it must recognise AUTOMATIC1111's format."""
    info = sd_parsers.ParserManager().parse(image)
    assert info is not None and info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    return info


def test_txt2img_and_img2img_through_webuiapi(live):
    api, _ = live
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, width=64, height=64, batch_size=2,
                         cfg_scale=4.5)  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [11, 12] and result.info["sampler_name"] == "Euler a"
    info = parsed(result.images[1])
    sampler = info.samplers[0]
    assert sampler.name == "Euler a" and sampler.parameters["seed"] == "12"
    assert [p.value for p in sampler.prompts] == ["a red circle"]
    assert [p.value for p in sampler.negative_prompts] == ["blue"]

    # Old-style sampler names carry the noise schedule; variation seeds change the image.
    karras = api.txt2img(prompt="a red circle", seed=11, width=64, height=64, sampler_name="DPM++ 2M Karras")
    assert parsed(karras.image).samplers[0].parameters["scheduler"] == "Karras"
    varied = api.txt2img(prompt="a red circle", seed=11, width=64, height=64, subseed=5, subseed_strength=0.5)
    assert varied.info["subseed"] == 5 and varied.info["subseed_strength"] == 0.5
    assert parsed(varied.image).metadata["Variation seed"] == "5"
    assert varied.image.tobytes() != result.images[0].tobytes()

    img2img = api.img2img(images=[result.image], prompt="a red circle", seed=3, denoising_strength=0.5, width=64,
                          height=64)  # fmt: skip
    assert img2img.image.size == (64, 64) and img2img.info["denoising_strength"] == 0.5
    assert parsed(img2img.image).metadata["Denoising strength"] == "0.5"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(
        images=[result.image], mask_image=mask, prompt="a square", seed=3, width=64, height=64
    )
    assert inpainted.image.size == (64, 64) and parsed(inpainted.image).metadata["Mask"] == "yes"


def test_hires_fix_through_webuiapi(live):
    api, _ = live
    result = api.txt2img(prompt="a red circle", seed=1, width=64, height=64, enable_hr=True, hr_scale=2,
                         hr_second_pass_steps=2, denoising_strength=0.5)  # fmt: skip
    assert result.image.size == (128, 128)
    fields = parsed(result.image).metadata
    assert (
        fields["Hires upscale"] == "2" and fields["Hires upscaler"] == "Latent" and fields["Size"] == "64x64"
    )
    lanczos = api.txt2img(prompt="a red circle", seed=1, width=64, height=64, enable_hr=True, hr_resize_x=96,
                          hr_resize_y=80, hr_upscaler="Lanczos")  # fmt: skip
    assert lanczos.image.size == (96, 80)  # scaled to cover 96x80, then centre-cropped, as A1111 does


def test_set_model_then_generate_on_it(live):
    api, service = live
    assert api.util_get_current_model() == "pipeline"
    assert sorted(api.util_get_model_names()) == ["pipeline", SECOND_MODEL]
    models = api.get_sd_models()
    assert all(len(m["sha256"]) == 64 and m["hash"] == m["sha256"][:10] for m in models)
    api.util_set_model(SECOND_MODEL)
    assert api.util_get_current_model() == SECOND_MODEL and service.default_model == SECOND_MODEL
    result = api.txt2img(prompt="x", seed=2, width=64, height=64)
    assert result.info["sd_model_name"] == SECOND_MODEL
    # A name with ':' is quoted, as A1111 quotes it (sd-parsers then leaves the model out).
    assert f'Model: "{SECOND_MODEL}"' in parsed(result.image).raw_parameters["parameters"]
    assert api.png_info(result.image).parameters["Model"] == SECOND_MODEL


def test_options_round_trip(live):
    api, _ = live
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "pipeline" and len(options["sd_checkpoint_hash"]) == 64
    answer = api.set_options(
        {"my_script_setting": [1, 2], "CLIP_stop_at_last_layers": 2, "samples_format": "png"}
    )
    assert set(answer["not_honoured"]) == {"my_script_setting", "CLIP_stop_at_last_layers"}
    options = api.get_options()
    assert options["my_script_setting"] == [1, 2] and options["CLIP_stop_at_last_layers"] == 1


def test_png_info_and_extras_through_webuiapi(live):
    api, _ = live
    image = api.txt2img(prompt="a green triangle", seed=9, width=64, height=64).image
    info = api.png_info(image)
    assert info.info.startswith("a green triangle\n") and "Seed: 9" in info.info
    assert info.parameters["Prompt"] == "a green triangle" and info.parameters["Seed"] == "9"
    assert (info.parameters["Size-1"], info.parameters["Size-2"]) == ("64", "64")

    upscaled = api.extra_single_image(image, upscaler_1="Lanczos", upscaling_resize=3)
    assert upscaled.image.size == (192, 192)
    nearest = api.extra_single_image(image, upscaler_1="Nearest", upscaling_resize=2)
    assert nearest.image.getpixel((0, 0)) == nearest.image.getpixel((1, 1)) == image.getpixel((0, 0))
    with pytest.raises(RuntimeError, match="400"):
        api.extra_single_image(image, upscaler_1="R-ESRGAN 4x+")
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [s["name"] for s in api.get_schedulers()][:2] == ["automatic", "karras"]
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_cmd_flags()["api"] is True and api.get_memory()["ram"]["total"] > 0
    with pytest.raises(RuntimeError, match="501"):
        api.interrogate(image)


@pytest.mark.timeout(120)
def test_interrupt_stops_a_long_job_with_its_images_so_far(live):
    api, service = live
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            api.txt2img(prompt="x", seed=4, width=128, height=128, steps=150, sampler_name="DDIM")
        ),  # fmt: skip
    )
    worker.start()
    deadline = time.monotonic() + 60
    while api.get_progress()["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.01)
    api.interrupt()
    worker.join(60)
    result = results[0]
    assert result.info["interrupted"] is True and len(result.images) == 1  # the partly denoised image
    assert service.counts["done"] >= 1 and parsed(result.image).samplers[0].parameters["seed"] == "4"


def test_a_request_over_the_time_limit_is_refused_at_once(make_service):
    """webuiapi's defaults (512x512, 20 steps) on a 64 px model: refused with the estimate, not run for minutes."""
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    service = make_service(timeout_s=1.0)
    with serve_in_thread(create_app(service), service, service.settings) as url:
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        start = time.monotonic()
        with pytest.raises(RuntimeError) as refused:
            api.txt2img(prompt="x", steps=150)
        assert time.monotonic() - start < 5
    status, text = refused.value.args
    assert status == 400 and "would take about" in text and "time limit is 1 s" in text
    assert service.counts["done"] == 0
