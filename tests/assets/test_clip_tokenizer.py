"""distilsd.assets: the CLIP tokenizer shipped with the package (no hub download)."""


def test_tokenizer_gives_standard_clip_ids():
    from distilsd.assets import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
