"""ai-toolkit's preview prompt handling: names, `--` flags, bounds and sizes (serve_app.intake.preview_flags)."""

from __future__ import annotations

import pickle

import pytest

from bench.preview_goldens import work_item
from serve_app.intake import preview_flags as pf
from serve_app.intake.preview_flags import PromptFlagError, PromptFlags, parse_prompt, preview_size, substitute_names
from serve_app.schemas import LoraItem, PromptItem
from tests.unit.preview_goldens import GOLDENS, load_golden, lora_mode_ran, needs_goldens


@needs_goldens
@pytest.mark.parametrize("name", GOLDENS)
def test_goldens_settings_are_what_ai_toolkit_ran(name):
    golden = load_golden(name)
    ran = golden["what_ai_toolkit_ran"]
    item = work_item(golden)
    key = item.key
    assert (item.prompt, key.width, key.height, item.seed, key.steps, key.guidance) == (
        ran["prompt"], ran["width"], ran["height"], ran["seed"], ran["steps"], ran["guidance"])
    if key.loras:
        assert key.loras[0].multiplier == ran["multiplier"]
    assert (key.lora_mode or "none") == lora_mode_ran(golden)


@pytest.mark.parametrize(
    ("flag", "attribute", "value"),
    [
        ("w", "width", 320),
        ("h", "height", 320),
        ("d", "seed", 320),
        ("seed", "seed", 320),
        ("l", "guidance", 3.25),
        ("cfg", "guidance", 3.25),
        ("s", "steps", 32),
        ("steps", "steps", 32),
        ("m", "multiplier", 0.5),
        ("network_multiplier", "multiplier", 0.5),
    ],
)
def test_every_flag_and_alias(flag, attribute, value):
    parsed = parse_prompt(f"a cat --{flag} {value}")
    assert parsed.text == "a cat"
    assert getattr(parsed.flags, attribute) == value
    others = {k: v for k, v in vars(parsed.flags).items() if k != attribute}
    assert all(v is None for v in others.values())


def test_no_flags_leaves_everything_none():
    parsed = parse_prompt("  a cat on a mat  ")
    assert parsed == pf.ParsedPrompt(text="a cat on a mat", flags=PromptFlags(), ignored=())


def test_negative_prompt_flag_takes_the_rest_of_its_piece():
    parsed = parse_prompt("a cat --n blurry, dark --w 256")
    assert parsed.flags.negative == "blurry, dark"
    assert parsed.flags.width == 256


def test_split_on_every_double_dash_even_inside_the_text():
    # ai-toolkit splits on "--" wherever it is: "state--of" cuts the prompt and "of the art" is a flag
    parsed = parse_prompt("a state--of the art car --w 256")
    assert parsed.text == "a state"
    assert parsed.ignored == ("of",)
    assert parsed.flags.width == 256


def test_unknown_and_no_effect_flags_are_ignored_with_their_text():
    parsed = parse_prompt("a cat --zoom 3 --gr 0.7 --p2 second prompt --g 5 --ctrl_img x.png")
    assert parsed.text == "a cat"
    assert parsed.ignored == ("zoom", "gr", "p2", "g", "ctrl_img")  # there is no --g in ai-toolkit
    assert parsed.flags == PromptFlags()


def test_flag_name_ends_at_the_first_space_only():
    # "--w\t256": the name is "w\t256" (ai-toolkit splits on " "), an unknown flag
    assert parse_prompt("a cat --w\t256").ignored == ("w\t256",)
    # "-- w 256": the name is empty, an unknown flag; nothing is set
    parsed = parse_prompt("a cat -- w 256")
    assert parsed.ignored == ("",)
    assert parsed.flags.width is None


def test_later_flags_override_earlier_ones():
    flags = parse_prompt("x --w 256 --d 3 --w 512 --seed 4").flags
    assert (flags.width, flags.seed) == (512, 4)


def test_values_parse_as_python_int_and_float():
    assert parse_prompt("x --w +1_024").flags.width == 1024
    assert parse_prompt("x --cfg 4.").flags.guidance == 4.0
    assert parse_prompt("x --cfg 1e1").flags.guidance == 10.0


@pytest.mark.parametrize(
    ("prompt", "flag", "field"),
    [
        ("x --w 256.0", "w", "width"),  # int() refuses a decimal point, as in ai-toolkit
        ("x --w 256 wide", "w", "width"),  # text after a value makes it unparsable
        ("x --h", "h", "height"),  # no value at all
        ("x --seed seven", "seed", "seed"),
        ("x --cfg high", "cfg", "guidance_scale"),
        ("x --s 4.5", "s", "sample_steps"),
        ("x --m one", "m", "network_multiplier"),
    ],
)
def test_unparsable_values_name_the_flag_and_value(prompt, flag, field):
    with pytest.raises(PromptFlagError) as caught:
        parse_prompt(prompt)
    assert (caught.value.flag, caught.value.field) == (flag, field)
    assert caught.value.value == prompt.split(f"--{flag}")[1].strip()
    assert f"--{flag}" in str(caught.value)


@pytest.mark.parametrize(
    "prompt",
    [
        "x --w 63",
        "x --w 4097",
        "x --h 32",
        "x --s 0",
        "x --steps 151",
        "x --cfg -0.5",
        "x --l 20.5",
        "x --cfg nan",
        "x --cfg inf",
        "x --m 2.5",
        "x --m -inf",
        "x --seed -2",
        f"x --seed {2**64}",
    ],
)
def test_values_out_of_the_request_bounds_are_refused(prompt):
    with pytest.raises(PromptFlagError):
        parse_prompt(prompt)


def test_bounds_are_accepted_at_their_edges():
    flags = parse_prompt(f"x --w 64 --h 4096 --s 150 --cfg 0 --m -2 --seed {2**64 - 1}").flags
    assert (flags.width, flags.height, flags.steps, flags.guidance, flags.multiplier) == (64, 4096, 150, 0.0, -2.0)
    assert flags.seed == 2**64 - 1


def test_a_seed_flag_of_minus_one_is_a_seed_not_a_random_draw():
    # ai-toolkit draws a random seed for -1 before reading the flags; torch.manual_seed(-1) seeds 2**64-1
    assert parse_prompt("x --seed -1").flags.seed == 2**64 - 1


def test_flag_errors_survive_pickling():
    error = PromptFlagError("w", "abc", "width", "is not an integer")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.flag, copy.value, copy.field, copy.reason, str(copy)) == (
        "w",
        "abc",
        "width",
        "is not an integer",
        str(error),
    )


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1024, 1024), (120, 112), (100, 96), (127, 112), (128, 128), (64, 64), (63, 64), (8, 64), (1000, 992)],
)
def test_sizes_floor_to_8_at_least_64_then_to_16(size, expected):
    assert preview_size(size) == expected


def test_trigger_and_name_substitution():
    assert substitute_names("[trigger] photo", "sks") == "sks photo"
    assert substitute_names("[name] photo", "sks") == "sks photo"  # [name] left over takes the trigger
    assert substitute_names("[name] and [trigger]", "sks", "job") == "job and sks"  # the job name goes first
    assert substitute_names("[name] [trigger]", None, "job") == "job [trigger]"
    assert substitute_names("[name] [trigger]", None) == "[name] [trigger]"  # no trigger word: they stay
    assert substitute_names("[trigger] photo", "") == " photo"  # an empty trigger word removes the token
    assert substitute_names("[trigger]", "[name]", "job") == "job"  # the job name reaches the trigger word
    assert substitute_names("photo", "sks") == "photo"  # nothing is prepended


def test_names_are_substituted_before_flags_are_split():
    # a trigger word with "--" in it splits the prompt, as in ai-toolkit
    settings = pf.resolve_preview_settings(
        "[trigger] cat --w 256",
        width=512,
        height=512,
        steps=4,
        guidance=4.0,
        seed=1,
        multiplier=1.0,
        trigger_word="a--b",
    )
    assert settings.prompt == "a"
    assert settings.width == 256


def test_a_job_name_goes_in_through_json_text():
    assert substitute_names("[name]", None, "a\\tb") == "a\tb"  # a JSON escape acts as one
    with pytest.raises(ValueError, match="job_name"):
        substitute_names("[name]", None, 'a"b')


def test_request_values_apply_where_no_flag_is_given():
    settings = pf.resolve_preview_settings(
        "a cat --s 3", width=1000, height=300, steps=20, guidance=3.5, seed=42, multiplier=0.8
    )
    assert settings == pf.PreviewSettings(
        prompt="a cat", width=992, height=288, steps=3, guidance=3.5, seed=42, multiplier=0.8
    )


def test_bounds_match_the_request_schema():
    def bounds(model, field):
        metadata = model.model_fields[field].metadata
        return next(m.ge for m in metadata if hasattr(m, "ge")), next(m.le for m in metadata if hasattr(m, "le"))

    assert bounds(PromptItem, "width") == pf.WIDTH_BOUNDS
    assert bounds(PromptItem, "height") == pf.HEIGHT_BOUNDS
    assert bounds(PromptItem, "sample_steps") == pf.STEPS_BOUNDS
    assert bounds(PromptItem, "guidance_scale") == pf.GUIDANCE_BOUNDS
    assert bounds(PromptItem, "seed") == pf.SEED_BOUNDS
    assert bounds(LoraItem, "network_multiplier") == pf.MULTIPLIER_BOUNDS
