"""Every rule of docs/api.md, table-driven: a field, a value, and the code or normalized value."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from serve_app import errors
from serve_app.config import AppArgs, Limits
from serve_app.errors import ApiError
from serve_app.intake.request_rules import RANDOM_SEED_BOUND, build_work_items
from serve_app.schemas import InferenceRequest
from serve_app.workitems import lora_set_id

ARGS = AppArgs()


def request(prompt: dict | None = None, **top) -> dict:
    body = {"model": "flux", "prompts": [{"prompt": "a photo", **(prompt or {})}]}
    body.update(top)
    return body


def items_of(body: dict, args: AppArgs = ARGS):
    return build_work_items(InferenceRequest.model_validate(body), args, "req")


# (description, prompt fields, top-level fields, attribute of the first item, expected value)
NORMALIZED = [
    ("width default 1024", {}, {}, "key.width", 1024),
    ("height default 1024", {}, {}, "key.height", 1024),
    ("width floored to 16", {"width": 1000}, {}, "key.width", 992),
    ("height floored to 16", {"height": 1023}, {}, "key.height", 1008),
    ("minimum size kept", {"width": 64, "height": 79}, {}, "key.height", 64),
    ("maximum size kept", {"width": 4096}, {}, "key.width", 4096),
    ("steps default 25", {}, {}, "key.steps", 25),
    ("steps kept", {"sample_steps": 150}, {}, "key.steps", 150),
    ("guidance default 4.0", {}, {}, "key.guidance", 4.0),
    ("guidance 0 allowed", {"guidance_scale": 0}, {}, "key.guidance", 0.0),
    ("guidance int becomes float", {"guidance_scale": 20}, {}, "key.guidance", 20.0),
    ("seed default 42 + index", {}, {}, "seed", 42),
    ("seed kept", {"seed": 7}, {}, "seed", 7),
    ("seed 0 kept", {"seed": 0}, {}, "seed", 0),
    ("seed max kept", {"seed": 2**64 - 1}, {}, "seed", 2**64 - 1),
    ("neg default empty", {}, {}, "neg", ""),
    ("neg kept", {"neg": "blurry"}, {}, "neg", "blurry"),
    ("output format default jpeg", {}, {}, "output_format", "jpeg"),
    ("output format png", {}, {"output_format": "png"}, "output_format", "png"),
    ("trigger replaced", {"prompt": "[trigger] a dog"}, {"trigger_word": "sks"}, "prompt", "sks a dog"),
    ("every trigger replaced", {"prompt": "[trigger] and [trigger]"}, {"trigger_word": "x"}, "prompt", "x and x"),
    ("prompt trigger wins", {"prompt": "[trigger]", "trigger_word": "own"}, {"trigger_word": "top"}, "prompt", "own"),
    ("empty prompt trigger falls back", {"prompt": "[trigger]", "trigger_word": ""}, {"trigger_word": "top"}, "prompt", "top"),
    ("no trigger word: text kept", {"prompt": "[trigger] a dog"}, {}, "prompt", "[trigger] a dog"),
    ("trigger never prepended", {"prompt": "a dog"}, {"trigger_word": "sks"}, "prompt", "a dog"),
    ("[name] is not a trigger", {"prompt": "[name] a dog"}, {"trigger_word": "sks"}, "prompt", "[name] a dog"),
    ("unknown fields ignored", {"sampler": "euler", "ctrl_img": "x"}, {"hf_token": "t", "kv_cache": True}, "key.steps", 25),
    ("no loras: base model", {}, {}, "key.loras", ()),
    ("loras empty: base model", {}, {"loras": []}, "key.loras", ()),
]


@pytest.mark.parametrize("what,prompt,top,attr,expected", NORMALIZED, ids=[row[0] for row in NORMALIZED])
def test_normalized_values(what, prompt, top, attr, expected):
    item = items_of(request(prompt, **top))[0]
    value = item
    for part in attr.split("."):
        value = getattr(value, part)
    assert value == expected


# (description, body, field path that must be named)
SCHEMA_ERRORS = [
    ("model required", {"prompts": [{"prompt": "a"}]}, "model"),
    ("prompts required", {"model": "flux"}, "prompts"),
    ("prompts not empty", {"model": "flux", "prompts": []}, "prompts"),
    ("prompt required", request({"prompt": None}), "prompts.0.prompt"),
    ("width below 64", request({"width": 63}), "prompts.0.width"),
    ("width above 4096", request({"width": 4097}), "prompts.0.width"),
    ("height below 64", request({"height": 10}), "prompts.0.height"),
    ("width not integral", request({"width": 512.5}), "prompts.0.width"),
    ("width a word", request({"width": "wide"}), "prompts.0.width"),
    ("steps 0", request({"sample_steps": 0}), "prompts.0.sample_steps"),
    ("steps 151", request({"sample_steps": 151}), "prompts.0.sample_steps"),
    ("guidance negative", request({"guidance_scale": -0.1}), "prompts.0.guidance_scale"),
    ("guidance above 20", request({"guidance_scale": 20.5}), "prompts.0.guidance_scale"),
    ("guidance NaN", request({"guidance_scale": float("nan")}), "prompts.0.guidance_scale"),
    ("guidance infinite", request({"guidance_scale": float("inf")}), "prompts.0.guidance_scale"),
    ("seed below -1", request({"seed": -2}), "prompts.0.seed"),
    ("seed above 2^64-1", request({"seed": 2**64}), "prompts.0.seed"),
    ("multiplier above 2", request(loras=[{"path": "a.safetensors", "network_multiplier": 2.5}]), "loras.0.network_multiplier"),
    ("multiplier below -2", request(loras=[{"path": "a.safetensors", "network_multiplier": -3}]), "loras.0.network_multiplier"),
    ("multiplier NaN", request(loras=[{"path": "a.safetensors", "network_multiplier": float("nan")}]), "loras.0.network_multiplier"),
    ("lora path required", request(loras=[{"network_multiplier": 1}]), "loras.0.path"),
    ("output format unknown", request(output_format="gif"), "output_format"),
]


@pytest.mark.parametrize("what,body,field", SCHEMA_ERRORS, ids=[row[0] for row in SCHEMA_ERRORS])
def test_schema_violations_name_the_field(what, body, field):
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(body)
    paths = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert field in paths


TIGHT = AppArgs(
    limits=Limits(max_prompts_per_request=2, max_prompt_chars=10, max_pixels_per_image=512 * 512,
                  max_work_per_request=512 * 512 * 30, max_loras_per_request=2),
)

# (description, body, args, code, limit named)
CODES = [
    ("unknown model", {**request(), "model": "sdxl"}, ARGS, errors.MODEL_NOT_FOUND, None),
    ("too many prompts", {"model": "flux", "prompts": [{"prompt": "a"}] * 3}, TIGHT, errors.LIMIT_EXCEEDED, "max_prompts_per_request"),
    ("prompt too long", request({"prompt": "x" * 11}), TIGHT, errors.LIMIT_EXCEEDED, "max_prompt_chars"),
    ("too many pixels", request({"width": 528, "height": 512}), TIGHT, errors.LIMIT_EXCEEDED, "max_pixels_per_image"),
    ("too much work", request({"width": 512, "height": 512, "sample_steps": 31}), TIGHT, errors.LIMIT_EXCEEDED, "max_work_per_request"),
    ("too many loras", request(loras=[{"path": f"{i}.safetensors"} for i in range(3)]), TIGHT, errors.LIMIT_EXCEEDED, "max_loras_per_request"),
    ("strict: lora required", request(), AppArgs(strict_reference=True), errors.LORA_FILE_REQUIRED, None),
    ("strict: single lora", request(loras=[{"path": "a.safetensors"}, {"path": "b.safetensors"}]), AppArgs(strict_reference=True), errors.SINGLE_LORA_ONLY, None),
    ("same lora twice", request(loras=[{"path": "a.safetensors"}, {"path": "a.safetensors"}]), ARGS, errors.VALIDATION_ERROR, None),
]


@pytest.mark.parametrize("what,body,args,code,limit", CODES, ids=[row[0] for row in CODES])
def test_configured_rules_give_their_code(what, body, args, code, limit):
    with pytest.raises(ApiError) as info:
        items_of(body, args)
    assert info.value.code == code
    assert info.value.status_code == errors.HTTP_STATUS[code]
    if limit:
        assert info.value.details["limit"] == limit
        assert limit in info.value.message


def test_limits_just_under_pass():
    items = items_of(request({"prompt": "x" * 10, "width": 512, "height": 512, "sample_steps": 30}), TIGHT)
    assert len(items) == 1


def test_seed_defaults_follow_the_prompt_index():
    body = {"model": "flux", "prompts": [{"prompt": "a"}, {"prompt": "b", "seed": 5}, {"prompt": "c"}]}
    assert [item.seed for item in items_of(body)] == [42, 5, 44]


def test_random_seed_is_drawn_in_the_reference_range_and_recorded():
    seeds = {items_of(request({"seed": -1}))[0].seed for _ in range(20)}
    assert all(0 <= s < RANDOM_SEED_BOUND for s in seeds)
    assert len(seeds) > 1


def test_multiplier_defaults_to_one_and_is_part_of_the_batch_key():
    a = items_of(request(loras=[{"path": "a.safetensors"}]))[0]
    b = items_of(request(loras=[{"path": "a.safetensors", "network_multiplier": 0.5}]))[0]
    assert a.key.loras[0].multiplier == 1.0
    assert a.key != b.key  # different scales never share a call
    assert a.key.lora_set_id == b.key.lora_set_id  # but share the cached adapter set


TWO_MODELS = AppArgs(models=[{"id": "flux"}, {"id": "flux-fast", "default_steps": 8, "default_guidance_scale": 3.0}])


def test_each_model_applies_its_own_defaults_and_names_its_items():
    fast = items_of({**request(), "model": "flux-fast"}, TWO_MODELS)[0]
    flux = items_of(request(), TWO_MODELS)[0]
    assert (fast.key.model, fast.key.steps, fast.key.guidance) == ("flux-fast", 8, 3.0)
    assert (flux.key.model, flux.key.steps, flux.key.guidance) == ("flux", 25, 4.0)


def test_an_unknown_model_lists_the_models_served():
    with pytest.raises(ApiError) as info:
        items_of({**request(), "model": "sdxl"}, TWO_MODELS)
    assert info.value.code == errors.MODEL_NOT_FOUND
    assert info.value.details == {"model": "sdxl", "available": ["flux", "flux-fast"]}


def test_lora_set_id_names_the_files_not_their_order():
    assert lora_set_id(["b", "a"]) == lora_set_id(["a", "b", "a"])
    assert lora_set_id([]) == ""
    assert lora_set_id(["a"]) != lora_set_id(["b"])


def test_every_error_code_survives_pickling():
    for code in errors.HTTP_STATUS:
        exc = ApiError(code, f"message of {code}", {"field": "x"})
        back = pickle.loads(pickle.dumps(exc))
        assert (back.code, back.message, back.details, back.status_code) == (code, exc.message, {"field": "x"}, exc.status_code)


PREVIEWS = AppArgs(models=[{"id": "flux"}, {"id": "pq", "kind": "preview", "quantize": True},
                           {"id": "pb", "kind": "preview", "quantize": False}])


def preview_items(model: str, prompts: list[dict], loras=({"path": "a.safetensors"},), **top):
    body = {"model": model, "prompts": prompts, "loras": list(loras), **top}
    return items_of(body, PREVIEWS)


def test_a_preview_models_items_are_what_ai_toolkit_runs():
    item = preview_items("pq", [{"prompt": "[name] by [trigger] --w 120 --h 100 --cfg 3.5 --s 5 --m 0.75"}],
                         trigger_word="sks", job_name="job")[0]
    assert (item.prompt, item.key.width, item.key.height, item.key.steps, item.key.guidance) == (
        "job by sks", 112, 96, 5, 3.5)
    assert item.key.loras[0].multiplier == 0.75 and item.key.lora_mode == "hook"  # quantized: always a branch


@pytest.mark.parametrize("model,multipliers,mode", [("pb", [None, None], "merged"), ("pb", [0.5, None], "hook"),
                                                    ("pq", [None, None], "hook")])
def test_the_merge_is_decided_per_request_as_per_sample_grid(model, multipliers, mode):
    prompts = [{"prompt": "a", **({} if m is None else {"network_multiplier": m})} for m in multipliers]
    assert {item.key.lora_mode for item in preview_items(model, prompts)} == {mode}


def test_a_preview_without_a_lora_is_the_base_model():
    item = preview_items("pb", [{"prompt": "a"}], loras=())[0]
    assert item.key.loras == () and item.key.lora_mode == ""


@pytest.mark.parametrize("flag,field", [("--w 10000", "width"), ("--steps two", "sample_steps"),
                                        ("--l -1", "guidance_scale"), ("--network_multiplier 2.5", "network_multiplier")])
def test_a_flag_value_is_checked_like_its_field(flag, field):
    with pytest.raises(ApiError) as info:
        preview_items("pq", [{"prompt": f"a {flag}"}])
    assert info.value.code == errors.VALIDATION_ERROR
    assert info.value.details["errors"][0]["loc"] == ["body", "prompts", "0", field]


def test_a_preview_takes_one_lora():
    with pytest.raises(ApiError) as info:
        preview_items("pq", [{"prompt": "a"}], loras=({"path": "a.safetensors"}, {"path": "b.safetensors"}))
    assert info.value.code == errors.SINGLE_LORA_ONLY


def test_a_reference_model_keeps_flags_as_text():
    item = items_of(request({"prompt": "a cat --w 128"}), PREVIEWS)[0]
    assert item.prompt == "a cat --w 128" and item.key.width == 1024


def test_a_sample_section_becomes_one_request_seeded_as_the_trainer_seeds():
    from serve_app.intake.request_rules import preview_request
    from serve_app.schemas import PreviewRequest

    preview = PreviewRequest.model_validate({
        "model": "pb", "lora": "a.safetensors", "sample": {
            "prompts": ["one", "two"], "samples": [{"prompt": "three", "seed": 99, "width": 256}],
            "seed": 10, "walk_seed": True, "width": 128, "height": 96, "sample_steps": 4, "guidance_scale": 3}})
    items = items_of(preview_request(preview).model_dump(), PREVIEWS)
    assert [(i.prompt, i.seed, i.key.width, i.key.steps, i.key.guidance) for i in items] == [
        ("one", 10, 128, 4, 3.0), ("two", 11, 128, 4, 3.0), ("three", 99, 256, 4, 3.0)]
    defaults = PreviewRequest.model_validate({"model": "pb", "sample": {"prompts": ["x"]}}).sample
    assert (defaults.width, defaults.sample_steps, defaults.guidance_scale, defaults.seed) == (512, 20, 7.0, 0)
