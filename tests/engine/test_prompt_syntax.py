"""sdxl_engine.prompt_syntax: AUTOMATIC1111's prompt attention syntax, to the float."""

from __future__ import annotations

import pytest

from sdxl_engine.parameters import GenerationParams
from sdxl_engine.prompt_syntax import (
    PromptSyntaxError,
    parse_prompt,
    parse_prompt_attention,
)

# Each prompt with what AUTOMATIC1111's own parse_prompt_attention (modules/prompt_parser.py
# of AUTOMATIC1111/stable-diffusion-webui at commit 0674fabd0d82c69c02ff362762815c4536687b95)
# returned for it, run standalone (its lists shown as tuples; its BREAK weight -1 as -1.0).
# The weights are compared exactly: A1111's factors multiply in the order brackets close.
A1111_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("   ", [("   ", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((double))", [("double", 1.2100000000000002)]),
    ("(((triple)))", [("triple", 1.3310000000000004)]),
    ("[less]", [("less", 0.9090909090909091)]),
    ("[[much less]]", [("much less", 0.8264462809917354)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word:0.5)", [("word", 0.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:+2)", [("word", 2.0)]),
    ("(word:.5)", [("word", 0.5)]),
    ("(word:1.)", [("word", 1.0)]),
    ("(word:0)", [("word", 0.0)]),
    ("(word:1e-1)", [("word:1e-1", 1.1)]),
    ("(word: 1.2)", [("word: 1.2", 1.1)]),
    ("(word:1.2 )", [("word:1.2 ", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("((a) b (c:2)) d", [("a", 1.2100000000000002), (" b ", 1.1), ("c", 2.2), (" d", 1.0)]),
    ("([mixed])", [("mixed", 1.0)]),
    ("[(mixed)]", [("mixed", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
    ("((open (twice", [("open ", 1.2100000000000002), ("twice", 1.3310000000000004)]),
    ("([open both", [("open both", 1.0)]),
    ("closed only)", [("closed only)", 1.0)]),
    ("closed only]", [("closed only]", 1.0)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\(escaped\\) (real)", [("(escaped) ", 1.0), ("real", 1.1)]),
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("lone\\ backslash", [("lone backslash", 1.0)]),
    ("(\\(nested escape\\):1.3)", [("(nested escape)", 1.3)]),
    ("trailing \\\\", [("trailing \\", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a\nBREAK\tb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    (
        "a, (b:1.2) BREAK [c], d",
        [
            ("a, ", 1.0),
            ("b", 1.2),
            ("", 1.0),
            ("BREAK", -1.0),
            ("", 1.0),
            ("c", 0.9090909090909091),
            (", d", 1.0),
        ],
    ),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("ratio :0.5) here", [("ratio :0.5) here", 1.0)]),
    ("(a:1.1)(b)", [("ab", 1.1)]),
    ("(x:1.1) x", [("x", 1.1), (" x", 1.0)]),
    ("[(x:1.21)]", [("x", 1.0999999999999999)]),
    ("(a:2)(b:2) c", [("ab", 2.0), (" c", 1.0)]),
    ("((sks person:1.2), smiling)", [("sks person", 1.32), (", smiling", 1.1)]),
    ("<lora:name:0.8> (portrait:1.1)", [("<lora:name:0.8> ", 1.0), ("portrait", 1.1)]),
    ("(été:1.3) café", [("été", 1.3), (" café", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_TABLE)
def test_parses_as_automatic1111_does(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_attention(prompt)
    assert parsed == expected
    assert all(type(weight) is float for _, weight in parsed)


def test_the_table_covers_what_the_issue_names() -> None:
    prompts = [prompt for prompt, _ in A1111_TABLE]
    assert len(prompts) >= 35
    assert any("((" in p for p in prompts) and any("[[" in p for p in prompts)
    assert any("\\(" in p for p in prompts) and any("BREAK" in p for p in prompts)
    assert any(p.count("(") != p.count(")") for p in prompts)


# A1111 fails on these with float()'s ValueError; here they are the request's problem.
@pytest.mark.parametrize("prompt", ["(x:.)", "(x:1.2.3)", "(x:+.)", "a (b:..) c"])
def test_a_weight_that_is_not_a_number_is_a_problem(prompt: str) -> None:
    with pytest.raises(PromptSyntaxError):
        parse_prompt_attention(prompt)
    problems = GenerationParams(negative_prompt=prompt).problems()
    assert list(problems) == ["negative_prompt"]
    assert "not a weight" in problems["negative_prompt"]
    # Plain prompts have no weights to fail on.
    assert GenerationParams(negative_prompt=prompt, prompt_syntax="plain").problems() == {}
    # Without an open bracket the same characters are text, in A1111 too.
    assert parse_prompt_attention(prompt.replace("(", "")) == [(prompt.replace("(", ""), 1.0)]


def test_plain_reads_every_character_literally() -> None:
    prompt = "a (b:1.5) [c] BREAK \\(d"
    assert parse_prompt(prompt, "plain") == [(prompt, 1.0)]
    assert parse_prompt(prompt, None) == parse_prompt(prompt, "a1111")
    assert parse_prompt(prompt, None)[1] == ("b", 1.5)


def test_prompt_syntax_is_checked_and_recorded_only_when_given() -> None:
    assert GenerationParams(prompt_syntax="html").problems() == {
        "prompt_syntax": "must be one of: a1111, plain"
    }
    assert "prompt_syntax" not in GenerationParams().record()
    assert GenerationParams(prompt_syntax="plain").record()["prompt_syntax"] == "plain"
    # Not a request's own: requests of different syntaxes never share a batch.
    assert GenerationParams().batch_key() != GenerationParams(prompt_syntax="plain").batch_key()
