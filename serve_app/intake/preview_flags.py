"""ai-toolkit's handling of one training-preview prompt: names, `--` flags, sizes (pure Python).

ostris/ai-toolkit does this in three places, reproduced here in the same order:
1. the job's config loader (`toolkit/config.py` `preprocess_config`) replaces `[name]` with the job
   name in the JSON text of the whole config;
2. `BaseSDTrainProcess.sample` replaces `[trigger]` and any `[name]` left by the trigger word
   (`prompt_utils.inject_trigger_into_prompt`, nothing prepended) when the job has one;
3. `GenerateImageConfig._process_prompt_string` splits the prompt on every `--` and lets the flags
   override the sample settings; the constructor then floors sizes to 8 (at least 64), and
   FluxPipeline floors them again to 16.

A flag value that is not a number, or is out of the bounds of the request field it overrides,
raises `PromptFlagError`: the server answers it like that field's own validation error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.states import LoraMode

PIPELINE_DIVISOR = 16  # FluxPipeline: latents are 1/8 of the image, packed 2x2
MIN_SIZE = 64
SEED_MODULUS = 2**64  # torch.manual_seed(-1) seeds as 2**64 - 1: two's complement of a uint64

# The request schema's bounds (schemas.PromptItem, schemas.LoraItem); a test keeps them in sync.
WIDTH_BOUNDS = HEIGHT_BOUNDS = (64, 4096)
STEPS_BOUNDS = (1, 150)
GUIDANCE_BOUNDS = (0.0, 20.0)
SEED_BOUNDS = (-1, 2**64 - 1)
MULTIPLIER_BOUNDS = (-2.0, 2.0)

# Flags GenerateImageConfig parses that change nothing in a FLUX.1-dev preview (second prompt,
# guidance rescale, adapters, refiner, video): accepted and reported, like unknown flags.
NO_EFFECT_FLAGS = frozenset(
    {"p2", "n2", "gr", "a", "ref", "ev", "extra_values", "frames", "num_frames", "fps", "ctrl_img", "ctrl_idx"}
)


def choose_lora_mode(quantized: bool, multipliers: Sequence[float]) -> LoraMode:
    """ai-toolkit's rule (`generate_images`): merged when unquantized and one multiplier for all images.

    ai-toolkit decides it per sample grid; the server decides it per request.

    Args:
        quantized: whether the transformer is quantized (quanto weights cannot be merged into).
        multipliers: the multiplier of every image of the request.

    Returns:
        `LoraMode.MERGED` or `LoraMode.HOOK`.
    """
    return LoraMode.MERGED if not quantized and len(set(multipliers)) == 1 else LoraMode.HOOK


class PromptFlagError(ValueError):
    """A prompt flag whose value ai-toolkit could not parse or the request schema would refuse.

    Args:
        flag: the flag as written, without `--` (e.g. `w`, `cfg`).
        value: the flag's text value.
        field: the request field the flag overrides (e.g. `width`, `guidance_scale`).
        reason: what is wrong, for a person.
    """

    def __init__(self, flag: str, value: str, field: str, reason: str):
        super().__init__(flag, value, field, reason)  # all four: the error survives pickling
        self.flag = flag
        self.value = value
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"prompt flag --{self.flag} {self.value!r} ({self.field}): {self.reason}"


@dataclass(frozen=True)
class PromptFlags:
    """The settings a prompt's flags override; None where the prompt has no such flag."""

    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    multiplier: float | None = None
    negative: str | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into its text and its flags.

    `ignored` lists the flags that change nothing in a FLUX.1-dev preview, as written: unknown
    flags and the ai-toolkit flags in NO_EFFECT_FLAGS (ai-toolkit drops unknown ones silently).
    """

    text: str
    flags: PromptFlags
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreviewSettings:
    """What ai-toolkit runs for one preview image: the effective values, sizes as the image has them."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    multiplier: float


def _integer(text: str) -> int:
    return int(text)  # Python's int(), as ai-toolkit: "+128", " 128", "1_28" pass; "128.0" does not


def _number(text: str) -> float:
    return float(text)  # Python's float(), as ai-toolkit: "1e1", "4." pass


# flag -> (PromptFlags attribute, request field, parser, bounds); later flags override earlier ones.
_VALUE_FLAGS: dict[str, tuple[str, str, Callable[[str], int | float], tuple]] = {
    "w": ("width", "width", _integer, WIDTH_BOUNDS),
    "h": ("height", "height", _integer, HEIGHT_BOUNDS),
    "d": ("seed", "seed", _integer, SEED_BOUNDS),
    "seed": ("seed", "seed", _integer, SEED_BOUNDS),
    "l": ("guidance", "guidance_scale", _number, GUIDANCE_BOUNDS),
    "cfg": ("guidance", "guidance_scale", _number, GUIDANCE_BOUNDS),
    "s": ("steps", "sample_steps", _integer, STEPS_BOUNDS),
    "steps": ("steps", "sample_steps", _integer, STEPS_BOUNDS),
    "m": ("multiplier", "network_multiplier", _number, MULTIPLIER_BOUNDS),
    "network_multiplier": ("multiplier", "network_multiplier", _number, MULTIPLIER_BOUNDS),
}


def substitute_names(prompt: str, trigger_word: str | None = None, job_name: str | None = None) -> str:
    """Replace `[name]` by the job name, then `[trigger]` and any `[name]` left by the trigger word.

    The job name goes in as ai-toolkit's config loader puts it: into the JSON text of the config,
    so JSON escapes in a name act as escapes. It reaches the trigger word too (a trigger word of
    `[name]` becomes the job name). With no trigger word (None) the tokens stay; an empty trigger
    word removes them, as ai-toolkit's `inject_trigger_into_prompt("")` does. Nothing is prepended.

    Args:
        prompt: the prompt as the request holds it.
        trigger_word: the job's trigger word, or None.
        job_name: the job name for `[name]`, or None.

    Returns:
        The prompt ai-toolkit passes to GenerateImageConfig.

    Raises:
        ValueError: the job name breaks the JSON text (ai-toolkit's loader fails on it too).
    """
    if job_name is not None:
        prompt = _replace_in_json_text(prompt, job_name)
        if trigger_word is not None:
            trigger_word = _replace_in_json_text(trigger_word, job_name)
    if trigger_word is None:
        return prompt
    return prompt.replace("[trigger]", trigger_word).replace("[name]", trigger_word)


def _replace_in_json_text(text: str, job_name: str) -> str:
    try:
        return json.loads(json.dumps(text).replace("[name]", job_name))
    except json.JSONDecodeError:
        raise ValueError(f"job_name {job_name!r} cannot replace [name]: it breaks the job config's JSON") from None


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split a prompt on every `--` and parse its flags as GenerateImageConfig does.

    The text is what precedes the first `--`, stripped. Each later piece is one flag: its name is
    the piece up to the first space (stripped), its value the rest (stripped). Unknown flags and
    text after a flag's value are not errors in ai-toolkit: an unknown flag is dropped with its
    text, while extra text after a numeric value makes the value unparsable (an error here).

    Args:
        prompt: a prompt after `substitute_names`.

    Returns:
        The text, the flags that matter for FLUX.1-dev, and the ignored flags.

    Raises:
        PromptFlagError: a numeric flag's value is not a number or is out of its field's bounds.
    """
    if not prompt:
        return ParsedPrompt(text=prompt, flags=PromptFlags())
    pieces = prompt.strip().split("--")
    values: dict[str, Any] = {}  # PromptFlags attribute -> its value (an int, float or str, per _VALUE_FLAGS)
    ignored: list[str] = []
    for piece in pieces[1:]:
        flag = piece.split(" ")[0].strip()
        content = piece[len(flag) :].strip()
        if flag in _VALUE_FLAGS:
            attribute, field, parse, bounds = _VALUE_FLAGS[flag]
            values[attribute] = _parse_value(flag, content, field, parse, bounds)
        elif flag == "n":
            values["negative"] = content
        else:
            ignored.append(flag)
    return ParsedPrompt(text=pieces[0].strip(), flags=PromptFlags(**values), ignored=tuple(ignored))


def _parse_value(flag: str, content: str, field: str, parse: Callable, bounds: tuple) -> int | float:
    try:
        value = parse(content)
    except ValueError:
        kind = "an integer" if parse is _integer else "a number"
        raise PromptFlagError(flag, content, field, f"is not {kind}") from None
    low, high = bounds
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptFlagError(flag, content, field, "must be a finite number")
    if not low <= value <= high:
        raise PromptFlagError(flag, content, field, f"must be within {low}..{high}")
    if field == "seed" and value < 0:
        value %= SEED_MODULUS  # the random draw for -1 happens before the flags: a flag -1 is a seed
    return value


def preview_size(size: int) -> int:
    """The image side ai-toolkit gets: floored to 8 (at least 64), then FluxPipeline floors to 16."""
    size = max(MIN_SIZE, size - size % 8)
    return size - size % PIPELINE_DIVISOR


def resolve_preview_settings(
    prompt: str,
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    multiplier: float,
    trigger_word: str | None = None,
    job_name: str | None = None,
) -> PreviewSettings:
    """The settings ai-toolkit runs for one preview prompt: request fields overridden by its flags.

    Args:
        prompt: the prompt as the request holds it (with `[name]`, `[trigger]`, flags).
        width, height, steps, guidance, seed, multiplier: the request's values for this prompt
            (defaults applied; a random seed already drawn).
        trigger_word: the trigger word, or None.
        job_name: the request's job name for `[name]`, or None.

    Returns:
        The effective settings; width and height are the size of the image that comes out.

    Raises:
        PromptFlagError: a flag value is invalid or out of bounds.
        ValueError: the job name breaks ai-toolkit's config JSON.
    """
    parsed = parse_prompt(substitute_names(prompt, trigger_word, job_name))
    flags = parsed.flags
    return PreviewSettings(
        prompt=parsed.text,
        width=preview_size(_pick(flags.width, width)),
        height=preview_size(_pick(flags.height, height)),
        steps=_pick(flags.steps, steps),
        guidance=_pick(flags.guidance, guidance),
        seed=_pick(flags.seed, seed),
        multiplier=_pick(flags.multiplier, multiplier),
    )


def _pick(flag_value, request_value):
    return request_value if flag_value is None else flag_value
