"""Prompt sets by name or path: built-in lists, text files, or public lists cached through huggingface_hub."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from alignprop.errors import ConfigError, MissingWeightsError

# Our own list of simple animals for the aesthetic experiment. The published AlignProp list is
# a file; pass its path (prompts.train=/path/simple_animals.txt) to reproduce the paper exactly.
SIMPLE_ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
    "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
    "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "owl",
    "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "parrot", "penguin",
    "llama", "camel", "elephant", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip
EVAL_SIMPLE_ANIMALS = ("snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus")

# Counting (reward=object_count): "{count} {plural}" over our own animals, counts one to five;
# the eval set holds animals the train set never names.
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLURALS = {
    "cat": "cats", "dog": "dogs", "horse": "horses", "rabbit": "rabbits", "sheep": "sheep",
    "cow": "cows", "goat": "goats", "lion": "lions", "bear": "bears", "fox": "foxes",
    "wolf": "wolves", "frog": "frogs", "duck": "ducks", "goose": "geese", "pig": "pigs",
    "penguin": "penguins", "mouse": "mice", "owl": "owls", "turtle": "turtles",
    "butterfly": "butterflies", "elephant": "elephants", "parrot": "parrots",
    "zebra": "zebras", "deer": "deer", "fish": "fish",
}  # fmt: skip
COUNT_TRAIN_ANIMALS = tuple(PLURALS)[:20]
COUNT_EVAL_ANIMALS = tuple(PLURALS)[20:]


def count_prompt(n: int, animal: str) -> str:
    """ "one cat", "three foxes": the count in words (digits above ten), then the noun."""
    word = COUNT_WORDS[n - 1] if 1 <= n <= len(COUNT_WORDS) else str(n)
    return f"{word} {animal if n == 1 else PLURALS.get(animal, animal + 's')}"


def parse_count(prompt: str) -> tuple[int, str]:
    """(count, singular noun phrase) of a counting prompt: "three foxes" -> (3, "fox"), "2 red
    apples" -> (2, "red apple"), "a cat" -> (1, "cat"); a ConfigError when it names no count."""
    words = prompt.strip().rstrip(".").split()
    head = words[0].lower() if words else ""
    if head in ("a", "an"):
        n = 1
    elif head in COUNT_WORDS:
        n = COUNT_WORDS.index(head) + 1
    elif head.isdigit():
        n = int(head)
    else:
        raise ConfigError(
            f"reward object_count: the prompt {prompt!r} does not start with a count ('three cats', "
            "'3 cats', 'a cat'); use the count_animals prompt sets or prompts of that form"
        )
    if len(words) < 2:
        raise ConfigError(
            f"reward object_count: the prompt {prompt!r} names no object after its count"
        )
    *adjectives, noun = (w.lower() for w in words[1:])
    return n, " ".join([*adjectives, singular(noun)])


def singular(noun: str) -> str:
    """Our PLURALS table backwards, else English's regular rules (foxes, flies, cats)."""
    for one, many in PLURALS.items():
        if noun == many:
            return one
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "xes", "sses")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun[:-1]
    return noun


HPDV2_REPO = "zhwang/HPDv2"  # dataset repo with the HPSv2 benchmark prompts
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_EVAL_EVERY = 64  # every 64th benchmark prompt is held out (50 of 3200)


def _hpdv2(split: str) -> list[str]:
    from huggingface_hub import hf_hub_download

    prompts: list[str] = []
    for style in HPDV2_STYLES:
        try:
            path = hf_hub_download(
                HPDV2_REPO, f"{style}.json", subfolder="benchmark", repo_type="dataset"
            )
        except Exception as err:  # hub errors: offline, not cached, no network
            raise MissingWeightsError(
                "prompts",
                f"{HPDV2_REPO}/benchmark/{style}.json",
                f"The HPDv2 benchmark prompts are fetched through huggingface_hub. Online, run once "
                f"`hf download {HPDV2_REPO} --repo-type dataset --include 'benchmark/*'`; offline, pass a "
                "prompt file instead, e.g. --config.prompts.train=/path/hps_v2_all.txt",
                cause=err,
            ) from err
        prompts += json.loads(Path(path).read_text())
    held_out = set(range(0, len(prompts), HPDV2_EVAL_EVERY))
    keep = held_out if split == "eval" else set(range(len(prompts))) - held_out
    return [p for i, p in enumerate(prompts) if i in keep]


BUILTIN: dict[str, Callable[[], list[str]]] = {
    "simple_animals": lambda: list(SIMPLE_ANIMALS),
    "eval_simple_animals": lambda: list(EVAL_SIMPLE_ANIMALS),
    "count_animals": lambda: [count_prompt(n, a) for a in COUNT_TRAIN_ANIMALS for n in range(1, 6)],
    "eval_count_animals": lambda: [
        count_prompt(n, a) for a in COUNT_EVAL_ANIMALS for n in range(1, 6)
    ],
    "hpdv2_train": lambda: _hpdv2("train"),
    "hpdv2_eval": lambda: _hpdv2("eval"),
}


def read_prompt_file(path: str | os.PathLike, field: str = "prompts") -> list[str]:
    """One prompt per line; empty lines are skipped, a UTF-8 byte-order mark dropped.

    Unreadable files, and NUL bytes (a UTF-16 or binary file), raise ConfigError naming the field.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{field}={str(path)!r}: not UTF-8 text (byte {err.start}); save the prompt file as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{field}={str(path)!r}: cannot read it ({err.strerror or err})"
        ) from None
    for n, line in enumerate(lines, 1):
        if "\0" in line:
            raise ConfigError(
                f"{field}={str(path)!r}, line {n}: a NUL byte (a UTF-16 or binary file?); "
                "save the prompt file as UTF-8 text, one prompt per line"
            )
    return [line.strip() for line in lines if line.strip()]


def check_template(template: str, field: str = "prompts.template") -> None:
    """A template must hold exactly one `{}`, else every prompt would become the template (or fail later)."""
    if not template:
        return
    try:
        out = template.format("\0")
    except (IndexError, KeyError, ValueError) as err:
        raise ConfigError(
            f"{field}={template!r}: not a format string with one {{}} ({type(err).__name__}: {err}); "
            "e.g. 'a photo of a {}' (double literal braces: {{ }})"
        ) from None
    if out.count("\0") != 1:
        raise ConfigError(
            f"{field}={template!r} must contain {{}} exactly once (where the prompt goes), e.g. 'a photo of a {{}}'"
        )


def check_spec(spec: str, field: str = "prompts") -> bool:
    """Check a prompt-set spec without reading it; return True for a file path, False for a built-in name."""
    if spec in BUILTIN:
        return False
    if spec.endswith(".txt") or os.path.sep in spec:
        if Path(spec).is_dir():
            raise ConfigError(
                f"{field}={spec!r} is a folder; give a prompt file (one prompt per line)"
            )
        if not Path(spec).is_file():
            raise ConfigError(f"{field}={spec!r}: no such prompt file (one prompt per line)")
        return True
    raise ConfigError(
        f"{field}={spec!r} is not a known prompt set; valid: {sorted(BUILTIN)} or a path to a .txt file"
    )


def load_prompts(spec: str, template: str = "", field: str = "prompts") -> list[str]:
    """Resolve a prompt set: a built-in name, or a path to a text file; apply the optional template."""
    prompts = read_prompt_file(spec, field) if check_spec(spec, field) else BUILTIN[spec]()
    if not prompts:
        raise ConfigError(f"{field}={spec!r} holds no prompts (empty or blank lines only)")
    check_template(template)
    if template:
        prompts = [template.format(p) for p in prompts]
    return prompts


class PromptSampler:
    """Draws training prompts uniformly with replacement from the global torch RNG (saved with checkpoints)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __call__(self, n: int) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,))
        return [self.prompts[i] for i in idx.tolist()]
